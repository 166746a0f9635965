"""Command-line options shared by generate, chat and serve, turned into Engine and SamplingParams arguments."""

from __future__ import annotations

import argparse
from typing import Any

from chat_core import DEFAULT_MODEL, SamplingParams


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=DEFAULT_MODEL, help=f"directory, .gguf file or alias (default: {DEFAULT_MODEL})")
    group.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="activations (auto: float32 on CPU, bfloat16 on CUDA)"
    )
    group.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    group.add_argument(
        "--quantize",
        default="auto",
        choices=["auto", "none", "int8", "int4", "gguf"],
        help="weight-only quantization (auto: a GGUF's quantized tensors stay as stored, other checkpoints dense)",
    )
    group.add_argument("--group-size", type=int, default=None, choices=[32, 64, 128], help="int4 group size (default 32)")
    group.add_argument("--enforce-eager", action="store_true", help="decode steps op by op: no CUDA graphs, no recorded native CPU step (nor --compile)")
    group.add_argument(
        "--compile",
        action="store_true",
        help="CPU: compile the decode step with torch.compile (faster decoding; the first start compiles for a minute, later ones reuse the cache)",
    )
    group.add_argument(
        "--batch-invariant",
        action="store_true",
        help="CPU: each request's answer is exactly the one it gets alone, whatever it is batched with (slower)",
    )
    group.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's, at most 8192)")
    group.add_argument("--max-num-seqs", type=int, default=None, help="the most sequences in one batch (default: 64)")
    group.add_argument(
        "--kv-cache-memory", type=float, default=None, metavar="GIB", help="memory for the KV cache on each rank, in GiB (default: 1)"
    )
    group.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="what the KV cache holds keys and values in (auto: the activations' dtype; bfloat16 halves a float32 model's cache)",
    )
    group.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks")
    group.add_argument("--pp", type=int, default=1, help="pipeline-parallel stages")
    group.add_argument(
        "--control-plane", default="broadcast", choices=["broadcast", "spmd"], help="how ranks get each step's inputs"
    )
    group.add_argument(
        "--model-runner-cls",
        default=None,
        metavar="MODULE:CLASS",
        help="your own ModelRunnerBase subclass, imported on every rank (default: the built-in Llama runner)",
    )
    group.add_argument(
        "--prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse the KV cache of prompt prefixes seen before: earlier chat turns, shared system prompts (default: on)",
    )


def add_sampling_options(parser: argparse.ArgumentParser, *, max_tokens: int) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-tokens", type=int, default=max_tokens)
    group.add_argument("--temperature", type=float, default=0.7, help="0 for greedy")
    group.add_argument("--top-p", type=float, default=1.0)
    group.add_argument("--top-k", type=int, default=0)
    group.add_argument("--min-p", type=float, default=0.0)
    group.add_argument("--seed", type=int, default=None)
    group.add_argument("--repetition-penalty", type=float, default=1.0)
    group.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "dtype": args.dtype,
        "device": args.device,
        "tensor_parallel_size": args.tp,
        "pipeline_parallel_size": args.pp,
        "control_plane": args.control_plane,
        "quantization": args.quantize,
        "quantization_group_size": args.group_size,
        "enforce_eager": args.enforce_eager,
        "compile_decode": args.compile,
        "batch_invariant": args.batch_invariant,
        "enable_prefix_caching": args.prefix_caching,
        "kv_cache_dtype": args.kv_cache_dtype,
    }
    if args.max_model_len is not None:
        kwargs["max_model_len"] = args.max_model_len
    if args.max_num_seqs is not None:
        kwargs["max_num_seqs"] = args.max_num_seqs
    if args.kv_cache_memory is not None:
        kwargs["kv_cache_memory_gib"] = args.kv_cache_memory
    if args.model_runner_cls is not None:
        kwargs["model_runner_cls"] = args.model_runner_cls
    return kwargs


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        seed=args.seed,
        repetition_penalty=args.repetition_penalty,
        stop=tuple(args.stop),
    )
