"""What each weight format costs in accuracy on SmolLM2-135M-Instruct: perplexity of a fixed English text and
teacher-forced top-1 agreement with the dense model, per quantization mode and int4 group size.

The dense reference is the packaged GGUF dequantized to float32. `gguf` keeps its Q4_1 matrices as they
are (same weights, bfloat16 products); `int8` and `int4` re-quantize those float weights. This is the
measurement behind the defaults in chat_core.quantization (int4 groups of 32, an int8 LM head under int4).
Prints a table and writes JSON to benchmarks/results/quality.json.

    python benchmarks/bench_quality.py
"""

from __future__ import annotations

import math

import torch
from bench_results import results_path, write_results

TEXT = (
    "The history of the printing press begins in the fifteenth century, when movable type changed how books were "
    "made, how ideas travelled across Europe, and how people learned to read and write. Before it, every book was "
    "copied by hand, usually by monks working in monasteries, and a single Bible could take a year to finish. "
    "Johannes Gutenberg, a goldsmith from Mainz, combined several existing technologies: the screw press used to "
    "make wine and olive oil, oil-based inks, and a hand mould that could cast letters quickly and accurately. "
    "Within fifty years, printing shops had opened in more than two hundred cities, and millions of books had been printed."
)
MODES = [("gguf", 32), ("int8", None), ("int4", 32), ("int4", 64), ("int4", 128)]


def all_position_logits(path: str, tokens: list[int], plan) -> torch.Tensor:
    from chat_core import open_checkpoint
    from chat_core.layers.attention import AttentionMetadata
    from chat_core.models.llama import LlamaForCausalLM

    checkpoint = open_checkpoint(path)
    model = LlamaForCausalLM(checkpoint.config, max_positions=1024, quantization=plan)
    model.load_weights(checkpoint.tensors())
    n, block_size = len(tokens), 16
    blocks = -(-n // block_size)
    caches = [torch.zeros(2, blocks * block_size, model.num_kv_heads_per_rank, checkpoint.config.head_dim) for _ in model.layers]
    metadata = AttentionMetadata.build(
        query_start_loc=torch.tensor([0, n]), seq_lens=torch.tensor([n]), block_tables=torch.arange(blocks).view(1, -1),
        slot_mapping=torch.arange(n), block_size=block_size, max_query_len=n, max_seq_len=n,
    )  # fmt: skip
    with torch.no_grad():
        return model.compute_logits(model(torch.tensor(tokens), torch.arange(n), caches, metadata)).float()


def main() -> None:
    from chat_core import open_checkpoint
    from chat_core.checkpoint.aliases import resolve_alias
    from chat_core.quantization import DEFAULT_INT4_GROUP_SIZE, QuantizationPlan

    path = resolve_alias("smollm2-135m-instruct")
    checkpoint = open_checkpoint(path)
    tokens = checkpoint.load_tokenizer().encode(TEXT)
    formats = checkpoint.tensor_formats()

    def perplexity(logits: torch.Tensor) -> float:
        return math.exp(float(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(tokens[1:]))))

    dense = all_position_logits(path, tokens, QuantizationPlan())
    rows = [{"mode": "dense float32", "perplexity": perplexity(dense), "top1_agreement": 1.0, "max_logit_diff": 0.0}]
    for mode, group_size in MODES:
        plan = QuantizationPlan(mode=mode, group_size=group_size or DEFAULT_INT4_GROUP_SIZE, tensor_formats=formats)
        logits = all_position_logits(path, tokens, plan)
        name = f"{mode}" + (f" g{group_size}" if mode == "int4" else "")
        rows.append({
            "mode": name,
            "perplexity": perplexity(logits),
            "top1_agreement": float((logits.argmax(-1) == dense.argmax(-1)).float().mean()),
            "max_logit_diff": float((logits - dense).abs().max()),
        })  # fmt: skip
    print(f"SmolLM2-135M-Instruct, {len(tokens)} tokens of English text")
    print(f"{'mode':<16}{'perplexity':>12}{'top-1 agree':>13}{'max |dlogit|':>14}")
    for row in rows:
        print(f"{row['mode']:<16}{row['perplexity']:>12.3f}{row['top1_agreement']:>13.3f}{row['max_logit_diff']:>14.3f}")
    write_results(results_path("quality.json"), {"tokens": len(tokens), "rows": rows})


if __name__ == "__main__":
    main()
