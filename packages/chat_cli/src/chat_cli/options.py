"""Command-line options shared by generate, chat and serve, turned into Engine and SamplingParams arguments."""

from __future__ import annotations

import argparse
from typing import Any

from chat_core import DEFAULT_MODEL, SamplingParams


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=DEFAULT_MODEL, help=f"directory, .gguf file or alias (default: {DEFAULT_MODEL})")
    group.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    group.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    group.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's, at most 8192)")
    group.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks")
    group.add_argument("--pp", type=int, default=1, help="pipeline-parallel stages")
    group.add_argument(
        "--control-plane", default="broadcast", choices=["broadcast", "spmd"], help="how ranks get each step's inputs"
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
        "enable_prefix_caching": args.prefix_caching,
    }
    if args.max_model_len is not None:
        kwargs["max_model_len"] = args.max_model_len
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
