"""Our engine against Hugging Face transformers on SmolLM2-135M-Instruct, in the same run.

Each (implementation, dtype) runs in its own process so load time and peak memory are its own.
Reports load time, time to first token (32-token prompt), decode tokens/s at batch 1 and batch 8
(128 new tokens, median of several passes), and peak resident memory; prints a table and writes
JSON to benchmarks/results/generate.json.

    python benchmarks/bench_generate.py [--passes 3] [--new-tokens 128] [--dtypes float32 bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

PROMPT_TOKENS = 32
PROMPT_TEXT = (
    "The history of the printing press begins in the fifteenth century, when movable type changed how "
    "books were made, how ideas travelled across Europe, and how people learned to read and write."
)


def smollm2_path() -> str:
    from chat_core.checkpoint.aliases import resolve_alias

    return resolve_alias("smollm2-135m-instruct")


def prompt_ids() -> list[int]:
    from chat_core import open_checkpoint

    ids = open_checkpoint(smollm2_path()).load_tokenizer().encode(PROMPT_TEXT)
    assert len(ids) >= PROMPT_TOKENS, len(ids)
    return ids[:PROMPT_TOKENS]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class OurEngine:
    def __init__(self, dtype: str) -> None:
        from chat_core import Engine

        self.engine = Engine.from_pretrained(smollm2_path(), dtype=dtype)

    def run(self, ids: list[int], batch: int, new_tokens: int) -> None:
        from chat_core import SamplingParams

        params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
        outputs = self.engine.generate([{"prompt_token_ids": ids}] * batch, params)
        assert all(len(o.token_ids) == new_tokens for o in outputs)


class Transformers:
    def __init__(self, dtype: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        directory, name = os.path.split(smollm2_path())
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=getattr(torch, dtype)).eval()

    def run(self, ids: list[int], batch: int, new_tokens: int) -> None:
        input_ids = self.torch.tensor([ids] * batch)
        with self.torch.no_grad():
            out = self.model.generate(
                input_ids,
                attention_mask=self.torch.ones_like(input_ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        assert out.shape[1] == len(ids) + new_tokens


def measure(impl: str, dtype: str, passes: int, new_tokens: int) -> dict[str, float]:
    ids = prompt_ids()
    start = time.perf_counter()
    runner = OurEngine(dtype) if impl == "chat" else Transformers(dtype)
    load_s = time.perf_counter() - start
    runner.run(ids, 1, 4)  # warm-up

    def timed(batch: int, tokens: int) -> float:
        t = time.perf_counter()
        runner.run(ids, batch, tokens)
        return time.perf_counter() - t

    result: dict[str, float] = {"load_s": load_s}
    result["ttft_ms"] = statistics.median(timed(1, 1) for _ in range(passes)) * 1000
    for batch in (1, 8):
        first = statistics.median(timed(batch, 1) for _ in range(passes))
        total = statistics.median(timed(batch, new_tokens) for _ in range(passes))
        result[f"decode_tok_s_b{batch}"] = batch * (new_tokens - 1) / (total - first)
    result["peak_rss_mib"] = peak_rss_mib()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--impls", nargs="+", default=["chat", "transformers"])
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.worker[0], args.worker[1], args.passes, args.new_tokens)))
        return

    rows = []
    for dtype in args.dtypes:
        for impl in args.impls:
            cmd = [sys.executable, __file__, "--worker", impl, dtype, "--passes", str(args.passes), "--new-tokens", str(args.new_tokens)]
            print(f"running {impl} {dtype} ...", file=sys.stderr, flush=True)
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            rows.append({"impl": impl, "dtype": dtype, **json.loads(out)})

    columns = ["load_s", "ttft_ms", "decode_tok_s_b1", "decode_tok_s_b8", "peak_rss_mib"]
    print(f"{'impl':<13}{'dtype':<10}" + "".join(f"{c:>17}" for c in columns))
    for row in rows:
        print(f"{row['impl']:<13}{row['dtype']:<10}" + "".join(f"{row[c]:>17.2f}" for c in columns))
    ratios = {}
    for dtype in args.dtypes:
        ours = next((r for r in rows if r["impl"] == "chat" and r["dtype"] == dtype), None)
        ref = next((r for r in rows if r["impl"] == "transformers" and r["dtype"] == dtype), None)
        if ours and ref:
            ratios[dtype] = {c: ours[c] / ref[c] for c in columns}
            print(f"chat / transformers ({dtype}): " + ", ".join(f"{c} x{v:.2f}" for c, v in ratios[dtype].items()))
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    path = os.path.join(os.path.dirname(__file__), "results", "generate.json")
    with open(path, "w") as f:
        json.dump({"settings": vars(args) | {"prompt_tokens": PROMPT_TOKENS}, "rows": rows, "ratios": ratios}, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
