"""Weight-only quantization: formats within their rounding bounds, kernels against plain float math, GGUF
Q4 tensors repacked exactly, whole models against their dense selves, and one copy of every weight."""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys

import pytest
import safetensors.torch
import torch
from gguf_writer import write_gguf
from hypothesis import given, settings
from hypothesis import strategies as st

from chat_core import Engine, SamplingParams, open_checkpoint
from chat_core.checkpoint.tensor_source import InMemoryTensor
from chat_core.layers.attention import AttentionMetadata
from chat_core.layers.linear import ColumnParallelLinear, RowParallelLinear
from chat_core.layers import native_kernels
from chat_core.layers.linear_methods import Int4Method, Int8Method, NativeBf16Method
from chat_core.layers.weight_formats import INT4_GROUP_SIZES, Int8Groups, quantize_int4, quantize_int8
from chat_core.layers.weight_kernels import Int4Kernel, Int8Kernel
from chat_core.models.llama import LlamaForCausalLM
from chat_core.quantization import QuantizationPlan
from native_marks import needs_native_kernels
from tiny_models import make_tiny_checkpoint

CPU = torch.device("cpu")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def random_weight(rows: int, cols: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    # A heavy-ish tail, as real weights have: a few large values per row stretch the ranges.
    return torch.randn(rows, cols, generator=generator) * torch.rand(rows, 1, generator=generator) + torch.randn(
        rows, cols, generator=generator
    ).pow(3) * 0.05


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 80),
    groups=st.integers(1, 6),
    group_size=st.sampled_from(INT4_GROUP_SIZES),
    kernel_dtype=st.sampled_from(list(DTYPES)),
    seed=st.integers(0, 2**16),
)
def test_int4_groups_are_within_half_a_step_of_the_weights(rows, groups, group_size, kernel_dtype, seed):
    weight = random_weight(rows, groups * group_size, seed)
    quantized = quantize_int4(weight, group_size, round_to=DTYPES[kernel_dtype])
    error = (quantized.dequantize() - weight).abs().view(rows, groups, group_size)
    step = quantized.scale.unsqueeze(-1)
    # Half a step, plus (kernel in bfloat16) the rounding of the scale and zero the kernel stores: 2^-8 relative.
    slack = 0.0 if kernel_dtype == "float32" else 2**-8 * (8 * step + quantized.zero.abs().unsqueeze(-1))
    assert bool((error <= 0.5 * step * (1 + 1e-5) + slack + 1e-6).all())
    assert int(quantized.q.max()) <= 15


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 80), cols=st.integers(1, 200), kernel_dtype=st.sampled_from(list(DTYPES)), seed=st.integers(0, 2**16))
def test_int8_channels_are_within_half_a_step_of_the_weights(rows, cols, kernel_dtype, seed):
    weight = random_weight(rows, cols, seed)
    quantized = quantize_int8(weight, round_to=DTYPES[kernel_dtype])
    error = (quantized.dequantize() - weight).abs()
    step = quantized.scale.unsqueeze(1)
    # A bfloat16 scale may be up to 2^-8 short of absmax / 127: the largest value clips by at most 127 of that.
    slack = 0.0 if kernel_dtype == "float32" else 127 * 2**-8 * step
    assert bool((error <= 0.5 * step * (1 + 1e-5) + slack + 1e-7).all())


@settings(max_examples=25, deadline=None)
@given(
    out_blocks=st.integers(1, 5),
    extra_rows=st.integers(0, 63),
    groups=st.integers(1, 4),
    group_size=st.sampled_from(INT4_GROUP_SIZES),
    batch=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_the_int4_kernel_multiplies_by_the_stored_weights_and_reads_rows_back(out_blocks, extra_rows, groups, group_size, batch, seed):
    rows = 16 * out_blocks + extra_rows  # any row count: the kernel's row blocks are padded
    weight = random_weight(rows, groups * group_size, seed)
    kernel = Int4Kernel(CPU, compute_dtype=torch.float32)  # exact products: compare with float math
    quantized = quantize_int4(weight, group_size)
    packed = kernel.pack(quantized)
    dense = quantized.dequantize()
    x = torch.randn(batch, weight.shape[1], generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(kernel.matmul(x, packed), x @ dense.T, atol=1e-4, rtol=1e-5)
    assert kernel.can_read_rows
    row_ids = torch.randint(0, rows, (7,), generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(kernel.read_rows(packed, row_ids, torch.float32), dense[row_ids], atol=1e-6, rtol=0)
    # And the fast kernel (bfloat16 products) stays within bfloat16's rounding of the same result.
    fast = Int4Kernel(CPU)
    y = fast.matmul(x, fast.pack(quantized))
    reference = x @ dense.T
    assert float((y - reference).abs().max()) <= 2**-6 * float(reference.abs().max()) + 1e-3


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 150),
    groups=st.integers(1, 5),
    group=st.sampled_from([0, 32, 16]),
    with_low=st.booleans(),
    compute=st.sampled_from(list(DTYPES)),
    batch=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_the_int8_kernel_multiplies_by_the_stored_weights_and_reads_rows_back(rows, groups, group, with_low, compute, batch, seed):
    """Per row (group 0: quantized from floats) and per 32 or 16 inputs (GGUF Q8_0, Q6_K; with minima: Q5_1, Q5_K),
    through the native kernel (float32) or torch's (bfloat16; per row only); rows read back are exactly
    q x scale (+ low)."""
    generator = torch.Generator().manual_seed(seed)
    cols = 32 * groups
    kernel = Int8Kernel(CPU, compute_dtype=DTYPES[compute])
    if group:
        if not kernel.supports_groups:
            with pytest.raises(ValueError, match="needs the native CPU kernel"):
                kernel.pack(Int8Groups(torch.zeros(rows, cols, dtype=torch.int8), torch.ones(rows, cols // group)))
            return
        quantized = Int8Groups(
            torch.randint(-128, 128, (rows, cols), dtype=torch.int8, generator=generator),
            torch.rand(rows, cols // group, generator=generator).half().float(),  # GGUF's scales: float16 (times int8)
            -torch.rand(rows, cols // group, generator=generator).half().float() * 64 if with_low else None,
        )
    else:
        quantized = quantize_int8(random_weight(rows, cols + seed % 7, seed), round_to=DTYPES[compute])
    packed = kernel.pack(quantized)
    dense = quantized.dequantize()
    x = torch.randn(batch, dense.shape[1], generator=generator)
    reference = x @ dense.T
    if kernel.native or compute == "float32":
        # float32 sums of K terms (each weight q x scale rounded once): within (K + 2) units of 2^-24 of the
        # sum of their magnitudes (cancellation makes a relative bound on the result itself fail)
        bound = (dense.shape[1] + 2) * 2**-24 * (x.double().abs() @ dense.double().abs().T)
        assert bool(((kernel.matmul(x, packed).double() - x.double() @ dense.double().T).abs() <= bound).all())
    else:  # bfloat16 products: within bfloat16's rounding of the same result
        assert float((kernel.matmul(x, packed) - reference).abs().max()) <= 2**-6 * float(reference.abs().max()) + 1e-3
    row_ids = torch.randint(0, rows, (7,), generator=generator)
    assert torch.equal(kernel.read_rows(packed, row_ids, torch.float32), dense[row_ids])


@needs_native_kernels
@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 130), batch=st.integers(2, 11), seed=st.integers(0, 2**16))
def test_the_native_kernels_give_a_row_the_same_bits_whatever_it_is_batched_with(rows, batch, seed):
    """What `batch_invariant` rests on: each row of x is reduced alone, in the same order for any batch."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 96, generator=generator)
    int4, int8 = Int4Kernel(CPU, torch.float32), Int8Kernel(CPU, torch.float32)
    packed = [
        (int4, int4.pack(quantize_int4(random_weight(rows, 96, seed), 32))),
        (int8, int8.pack(quantize_int8(random_weight(rows, 96, seed + 1)))),
        (int8, int8.pack(Int8Groups(torch.randint(-128, 128, (rows, 96), dtype=torch.int8, generator=generator), torch.rand(rows, 3)))),
        (int8, int8.pack(Int8Groups(torch.randint(-32, 32, (rows, 96), dtype=torch.int8, generator=generator), torch.rand(rows, 6)))),
        (int8, int8.pack(Int8Groups(torch.randint(0, 32, (rows, 96), dtype=torch.int8, generator=generator), torch.rand(rows, 3), -torch.rand(rows, 3)))),
    ]
    products = [functools.partial(kernel.matmul, packed=weight) for kernel, weight in packed]
    blocks = -(-rows // 64) * 64
    bf16 = native_kernels.pack_bf16(torch.nn.functional.pad(random_weight(rows, 96, seed + 2).bfloat16(), (0, 0, 0, blocks - rows)))
    products.append(functools.partial(native_kernels.bf16_matmul, packed=bf16))
    for product in products:
        together = product(x)
        for i in range(batch):
            assert torch.equal(together[i : i + 1], product(x[i : i + 1]))
        assert torch.equal(together[1:], product(x[1:]))


@needs_native_kernels
@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 150), min_size=1, max_size=3),
    cols=st.integers(1, 300),
    batch=st.integers(1, 9),
    activations=st.sampled_from(list(DTYPES)),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_the_bfloat16_kernel_multiplies_exact_products_in_float32(sizes, cols, batch, activations, bias, seed):
    """A dense bfloat16 layer on the native kernel (fused outputs of any count, padded to blocks of 64; any
    width): float32 sums of the exact products of x and the bfloat16 weights, rounded to the activations'
    dtype; rows read back are the weights themselves; the plain weight is not kept beside the blocks."""
    generator = torch.Generator().manual_seed(seed)
    weights = [torch.randn(size, cols, generator=generator).bfloat16() for size in sizes]
    layer = ColumnParallelLinear(cols, sizes, bias=bias, dtype=torch.bfloat16, method=NativeBf16Method(torch.bfloat16, CPU))
    for shard, weight in enumerate(weights):
        layer.load_shard("weight", InMemoryTensor(weight), shard)
        if bias:
            layer.load_shard("bias", InMemoryTensor(torch.randn(sizes[shard], generator=generator).bfloat16()), shard)
    dense = torch.cat(weights)
    x = torch.randn(batch, cols, generator=generator).to(DTYPES[activations])
    reference = x.double() @ dense.double().T
    if bias:
        reference += layer.bias.double()
    y = layer(x)
    assert y.dtype == x.dtype and y.shape == (batch, dense.shape[0])
    # float32 sums of K exact products (within K units of 2^-24 of the sum of their magnitudes), then (the
    # bias, and) the activations' rounding
    magnitude = x.double().abs() @ dense.double().abs().T + (layer.bias.double().abs() if bias else 0)
    rounding = (2.01 if bias else 1.0) * 2**-8 if activations == "bfloat16" else 0.0  # one rounding, or two with a bias
    assert bool(((y.double() - reference).abs() <= ((cols + 1) * 2**-24 + rounding) * magnitude).all())
    row_ids = torch.randint(0, dense.shape[0], (7,), generator=generator)
    assert torch.equal(layer.method.read_rows(layer, row_ids), dense[row_ids])
    assert layer.weight is None and layer.bf16_weight.dtype == torch.bfloat16


@pytest.mark.parametrize("method_name", ["int8", "int4"])
def test_a_quantized_layer_is_within_the_rounding_bound_of_the_dense_one(method_name):
    torch.manual_seed(0)
    weights = [random_weight(48, 128, seed) for seed in (1, 2)]  # two fused outputs, like gate/up
    method = (
        Int8Method(torch.float32, CPU, compute_dtype=torch.float32)
        if method_name == "int8"
        else Int4Method(torch.float32, CPU, 32, compute_dtype=torch.float32)
    )
    layer = ColumnParallelLinear(128, [48, 48], method=method)
    for shard, weight in enumerate(weights):
        layer.load_shard("weight", InMemoryTensor(weight), shard)
    x = torch.randn(6, 128)
    dense = torch.cat(weights)
    if method_name == "int8":
        step = (dense.abs().amax(dim=1) / 127).unsqueeze(1).expand_as(dense)
    else:
        groups = dense.view(96, -1, 32)
        step = ((groups.amax(-1) - groups.amin(-1)) / 15).repeat_interleave(32, dim=1)
    bound = x.abs() @ (0.5 * step).T * (1 + 1e-4) + 1e-4  # |sum_k x_k e_k| <= sum_k |x_k| |e_k|
    assert bool(((layer(x) - x @ dense.T).abs() <= bound).all())
    assert not [name for name, _ in layer.named_parameters() if name == "weight"], "the float weight is not kept"


def test_int4_groups_may_not_straddle_a_tensor_parallel_split():
    class TwoRanks:  # only the layer's slice arithmetic is exercised: no collective runs
        rank, size = 0, 2

        def all_reduce(self, tensor):
            return tensor

        def all_gather(self, tensor, dim=-1):
            return tensor

    # 384 inputs hold 3 groups of 128, but half of them (192) would cut the second group in two.
    with pytest.raises(ValueError, match="int4 groups of 128 do not divide this rank's 192 input features .* cut groups"):
        RowParallelLinear(384, 64, tp=TwoRanks(), method=Int4Method(torch.float32, CPU, 128))
    RowParallelLinear(384, 64, tp=TwoRanks(), method=Int4Method(torch.float32, CPU, 64))  # 192 = 3 x 64: fine
    # Without a split, inputs that are not a multiple of the group size take the largest group that fits.
    layer = ColumnParallelLinear(160, [32], method=Int4Method(torch.float32, CPU, 128))
    assert layer.method.group_size == 32


def stored_down_projection(tmp_path, tiny_checkpoints, qtype: str):
    """A tiny model's GGUF in `qtype` (rows of 256 inputs for the K-quants' blocks): one layer's down projection as
    a tensor of the file, and its weights as `gguf` dequantizes them (the reference)."""
    import numpy as np
    from gguf.quants import dequantize

    path = str(tmp_path / f"tiny-{qtype}.gguf")
    if qtype.endswith("_K"):
        model = make_tiny_checkpoint(str(tmp_path / "wide"), "llama_tied", hidden_size=256, intermediate_size=512)
    else:
        model = tiny_checkpoints("llama_tied")[1]
    write_gguf(path, model, qtype)
    tensor = dict(open_checkpoint(path).tensors())["model.layers.1.mlp.down_proj.weight"]
    expected = dequantize(np.ascontiguousarray(tensor._tensor.data), tensor._tensor.tensor_type).reshape(tensor.shape)
    return tensor, torch.from_numpy(np.ascontiguousarray(expected))


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q4_K"])
def test_gguf_q4_tensors_are_repacked_not_requantized(tmp_path, tiny_checkpoints, qtype):
    tensor, expected = stored_down_projection(tmp_path, tiny_checkpoints, qtype)
    groups = tensor.read_int4_groups(None)
    if qtype == "Q4_0":  # w = d (q - 8): the same float operations as gguf's
        assert torch.equal(groups.dequantize(), expected)
    else:  # gguf computes d q + m (Q4_K: d sc q - dmin m), we d (q - 8) + (m + 8 d): equal up to float32 rounding
        torch.testing.assert_close(groups.dequantize(), expected, atol=0, rtol=2**-22)
    kernel = Int4Kernel(CPU, compute_dtype=torch.float32)
    packed = kernel.pack(groups)
    rows = torch.arange(tensor.shape[0])
    if kernel.native:  # scale q + low, as stored: gguf's own arithmetic (d q + m), bit for bit
        # Q4_0/Q4_1's float16 numbers stay float16; Q4_K's products d sc and dmin m need float32.
        assert packed.scales_and_zeros.dtype == (torch.float32 if qtype == "Q4_K" else torch.float16)
        assert torch.equal(kernel.read_rows(packed, rows, torch.float32), expected)
    else:
        assert torch.equal(kernel.read_rows(packed, rows, torch.float32), groups.dequantize())
    # Slices along either dimension read the same groups as the whole (Q4_K: also inside its blocks of 256).
    top = tensor.read_int4_groups(0, 8, 16)
    assert torch.equal(top.q, groups.q[8:24]) and torch.equal(top.scale, groups.scale[8:24])
    right = tensor.read_int4_groups(1, 32, 64)
    assert torch.equal(right.q, groups.q[:, 32:96]) and torch.equal(right.zero, groups.zero[:, 1:3])
    assert tensor.read_int4_groups(1, 16, 32) is None  # not on a group boundary: not readable as groups


def test_gguf_q6_k_tensors_are_kept_as_8_bit_groups_of_16_exactly(tmp_path, tiny_checkpoints):
    tensor, expected = stored_down_projection(tmp_path, tiny_checkpoints, "Q6_K")
    groups = tensor.read_int8_groups(None)
    assert groups.group_size == 16 and int(groups.q.min()) >= -32 and int(groups.q.max()) <= 31
    assert torch.equal(groups.dequantize(), expected)  # (d sc) q: gguf's own float operations
    kernel = Int8Kernel(CPU, compute_dtype=torch.float32)
    if kernel.supports_groups:
        packed = kernel.pack(groups)
        assert torch.equal(kernel.read_rows(packed, torch.arange(tensor.shape[0]), torch.float32), expected)
    # Slices: rows, whole blocks of 256 inputs, and groups inside them (a tensor-parallel rank's inputs).
    top = tensor.read_int8_groups(0, 8, 16)
    assert torch.equal(top.q, groups.q[8:24]) and torch.equal(top.scale, groups.scale[8:24])
    for start, length in ((256, 256), (16, 32), (128, 128)):
        part = tensor.read_int8_groups(1, start, length)
        assert torch.equal(part.q, groups.q[:, start : start + length])
        assert torch.equal(part.scale, groups.scale[:, start // 16 : (start + length) // 16])
    assert tensor.read_int8_groups(1, 8, 16) is None  # not on a group boundary


@pytest.mark.parametrize("qtype", ["Q5_0", "Q5_1", "Q5_K"])
def test_gguf_5_bit_tensors_are_kept_as_8_bit_groups_exactly(tmp_path, tiny_checkpoints, qtype):
    """Q5_0: d (q - 16); Q5_1: d q + m; Q5_K: (d sc) q - (dmin m): int8 groups of 32 (with minima for the last
    two), the same float operations as gguf's, read back from the packed kernel weight bit for bit."""
    tensor, expected = stored_down_projection(tmp_path, tiny_checkpoints, qtype)
    groups = tensor.read_int8_groups(None)
    values = (-16, 15) if qtype == "Q5_0" else (0, 31)
    assert groups.group_size == 32 and (groups.low is None) == (qtype == "Q5_0")
    assert values[0] <= int(groups.q.min()) and int(groups.q.max()) <= values[1]
    assert torch.equal(groups.dequantize(), expected)
    kernel = Int8Kernel(CPU, compute_dtype=torch.float32)
    if kernel.supports_groups:
        packed = kernel.pack(groups)
        assert torch.equal(kernel.read_rows(packed, torch.arange(tensor.shape[0]), torch.float32), expected)
    right = tensor.read_int8_groups(1, 32, 64)
    assert torch.equal(right.q, groups.q[:, 32:96]) and torch.equal(right.scale, groups.scale[:, 1:3])
    if groups.low is not None:
        assert torch.equal(right.low, groups.low[:, 1:3])
    assert tensor.read_int8_groups(1, 16, 32) is None  # not on a group boundary


def all_position_logits(directory: str, tokens: list[int], plan: QuantizationPlan) -> torch.Tensor:
    """Teacher-forced logits at every position of `tokens` (one prefill), for the model built with `plan`."""
    checkpoint = open_checkpoint(directory)
    model = LlamaForCausalLM(checkpoint.config, max_positions=512, quantization=plan)
    model.load_weights(checkpoint.tensors())
    n, block_size = len(tokens), 16
    blocks = -(-n // block_size)
    caches = [torch.zeros(2, blocks * block_size, model.num_kv_heads_per_rank, checkpoint.config.head_dim) for _ in model.layers]
    metadata = AttentionMetadata.build(
        query_start_loc=torch.tensor([0, n]),
        seq_lens=torch.tensor([n]),
        block_tables=torch.arange(blocks).view(1, -1),
        slot_mapping=torch.arange(n),
        block_size=block_size,
        max_query_len=n,
        max_seq_len=n,
    )
    with torch.no_grad():
        return model.compute_logits(model(torch.tensor(tokens), torch.arange(n), caches, metadata)).float()


# Measured on these tiny random models and this text (float32 activations, bfloat16 quantized products):
# teacher-forced top-1 agreement with the dense model 97-98% (int8), 69-77% (int4: a random model's logits
# are nearly flat, median top-1/top-2 gap 0.03, so near-ties flip); perplexity within 0.1% (int8) and
# 0.5% (int4) of the dense model's (~320).
MARGINS = {"int8": (0.9, 0.01), "int4": (0.6, 0.02)}


@pytest.mark.parametrize("family", ["llama", "llama3"])
@pytest.mark.parametrize("mode", list(MARGINS))
def test_quantized_model_agrees_with_its_dense_self_on_a_fixed_text(tiny_checkpoints, family, mode):
    directory, _ = tiny_checkpoints(family)
    text = [(37 * i * i + 11 * i + 5) % 310 + 5 for i in range(200)]  # a fixed pseudo-random text
    dense = all_position_logits(directory, text, QuantizationPlan())
    quantized = all_position_logits(directory, text, QuantizationPlan(mode=mode))
    agreement = float((dense.argmax(-1) == quantized.argmax(-1)).float().mean())

    def perplexity(logits: torch.Tensor) -> float:
        return math.exp(float(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(text[1:]))))

    min_agreement, max_ppl_change = MARGINS[mode]
    assert agreement >= min_agreement, agreement
    assert abs(perplexity(quantized) / perplexity(dense) - 1) <= max_ppl_change, (perplexity(quantized), perplexity(dense))


def test_quantization_is_chosen_per_layer_and_the_engine_generates(tiny_checkpoints):
    directory, _ = tiny_checkpoints("llama_tied")
    prompt = {"prompt_token_ids": list(range(5, 40))}
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    with Engine.from_pretrained(directory, quantization="int4", quantization_group_size=32) as engine:
        model = engine.executor.worker.model_runner.model
        assert engine.config.quantization == "int4" and engine.config.dtype == "float32"
        assert model.embed_tokens is model.lm_head and model.lm_head.method.name == "int8"  # tied: one int8 table
        assert {layer.mlp.down_proj.method.name for layer in model.layers} == {"int4"}
        tokens = engine.generate(prompt, params)[0].token_ids
    assert len(tokens) == 12 and all(0 <= t < 320 for t in tokens)  # quality: see the perplexity test above


def test_the_default_model_keeps_one_copy_of_each_weight(smollm2_path):
    """Q4_1 matrices stay 4-bit (0.5 byte a weight, plus two numbers per 32: a bfloat16 scale and zero for
    torch's kernels, GGUF's own float16 scale and minimum for the native one), the Q8_0 table stays 8-bit
    where the native kernels run (plus a float32 scale per 32), everything else is dense float32; nothing
    is kept twice (no float copy beside a packed one)."""
    native = native_kernels.available()
    with Engine.from_pretrained(smollm2_path) as engine:
        model = engine.executor.worker.model_runner.model
        formats = engine.checkpoint.tensor_formats()
        shapes = {name: tensor.shape for name, tensor in engine.checkpoint.tensors()}
        held = {id(t): t for t in [*model.parameters(), *model.buffers()] if t is not None}
        rotary = {id(model.rotary.cos_cache), id(model.rotary.signed_sin_cache)}
        weight_bytes = sum(t.numel() * t.element_size() for key, t in held.items() if key not in rotary)
        assert model.lm_head.method.name == ("q8_0" if native else "dense")
        int4_scale_bytes = 2 * model.layers[0].mlp.down_proj.packed_int4.scales_and_zeros.element_size()  # two per 32
    expected = 0
    for name, shape in shapes.items():
        numel = math.prod(shape)
        if formats[name] in ("Q4_0", "Q4_1"):
            expected += numel // 2 + numel // 32 * int4_scale_bytes
        elif formats[name] == "Q8_0" and native:
            expected += numel + numel // 32 * 4
        else:
            expected += numel * 4
    # The only slack: int4 rows padded to the kernel's blocks of 64 (q/k/v fused: 960 rows -> 1024).
    padding = sum(64 * layer.self_attn.qkv_proj.input_size * (0.5 + int4_scale_bytes / 32) for layer in model.layers)
    assert expected <= weight_bytes <= expected + padding, (weight_bytes, expected)
    assert sum(formats[name] == "Q4_1" for name in shapes) == 210  # every Q4_1 matrix of the file was kept packed


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/self/maps (Linux)")
def test_the_checkpoint_file_is_not_kept_mapped_once_loaded(smollm2_path):
    """A mapped file's pages count as resident memory: the GGUF is unmapped once its weights are in the model."""
    script = (
        "import sys; from chat_core import Engine, SamplingParams\n"
        "engine = Engine.from_pretrained(sys.argv[1])\n"
        "print(sum(sys.argv[1] in line for line in open('/proc/self/maps')))\n"
        "print(engine.generate('The capital of France is', SamplingParams(temperature=0, max_tokens=4))[0].text)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, smollm2_path], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    mapped, text = result.stdout.split("\n", 1)
    assert mapped == "0" and "Paris" in text


def _resident_bytes_of_mapping(path: str) -> int:
    """This process's resident bytes of every mapping of `path` (from /proc/self/smaps)."""
    total, in_mapping = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's header line
                in_mapping = fields[-1] == os.path.realpath(path)
            elif in_mapping and fields[0] == "Rss:":
                total += int(fields[1]) * 1024
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads /proc/self/smaps (Linux)")
def test_a_gguf_tensor_leaves_resident_memory_once_loaded(smollm2_path):
    """While a GGUF loads, the pages of the tensors already loaded are not kept resident (at load's peak they
    were as much memory again as the weights); a tensor read again afterwards reads the same values."""
    checkpoint = open_checkpoint(smollm2_path)
    size = os.path.getsize(smollm2_path)
    first_reads, most_resident = {}, 0
    for name, tensor in checkpoint.tensors():
        values = tensor.read()  # every byte of it is read
        if name in ("model.norm.weight", "model.layers.29.mlp.down_proj.weight"):
            first_reads[name] = values
        most_resident = max(most_resident, _resident_bytes_of_mapping(smollm2_path))
    left = _resident_bytes_of_mapping(smollm2_path)
    assert most_resident > 0, "the file is read through its memory map"
    # At most the metadata (the vocabulary) and the pages of the tensor being read: far from the whole file.
    assert most_resident < size / 3 and left < size / 10, (most_resident, left, size)
    tensors = dict(checkpoint.tensors())
    for name, values in first_reads.items():
        torch.testing.assert_close(tensors[name].read(), values, rtol=0, atol=0)


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads /proc/self/smaps (Linux)")
def test_a_safetensors_tensor_leaves_resident_memory_once_dropped(tiny_checkpoints):
    """Quantized as it is read, a Hugging Face checkpoint must not stay resident whole: once a tensor read is
    dropped, none of the file's pages stay in the process (one mapping held through the load kept every page
    read: a float32 SmolLM2 quantized to int8 peaked at 928 MiB, 575 without it). Whole tensors and slices read right."""
    directory, _ = tiny_checkpoints("llama")
    path = os.path.join(directory, "model.safetensors")
    expected = {name: tensor.clone() for name, tensor in safetensors.torch.load_file(path).items()}
    tensors = dict(open_checkpoint(directory).tensors())
    assert tensors.keys() == expected.keys()
    for name, tensor in tensors.items():
        values = tensor.read()
        assert _resident_bytes_of_mapping(path) > 0, "read through a memory map"
        torch.testing.assert_close(values, expected[name], rtol=0, atol=0)
        del values
        assert _resident_bytes_of_mapping(path) == 0, name
        if len(tensor.shape) == 2:
            torch.testing.assert_close(tensor.read(1, 3, 5), expected[name][:, 3:8], rtol=0, atol=0)
            torch.testing.assert_close(tensor.read(0, 2, 4), expected[name][2:6], rtol=0, atol=0)
    assert _resident_bytes_of_mapping(path) == 0


def test_a_large_weight_is_quantized_a_slice_of_rows_at_a_time_to_the_same_numbers():
    """Quantizing rows in slices (float temporaries of a slice, not of a whole LM head) changes no number: the
    whole-tensor formulas, on a weight whose rows span three slices."""
    from chat_core.layers.weight_formats import QUANTIZE_ROWS_AT_ONCE

    generator = torch.Generator().manual_seed(3)
    w = torch.randn(2 * QUANTIZE_ROWS_AT_ONCE + 5, 64, generator=generator) * torch.rand(2 * QUANTIZE_ROWS_AT_ONCE + 5, 1, generator=generator)
    for round_to in (torch.float32, torch.bfloat16):
        scale = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny).to(round_to).float()
        channels = quantize_int8(w, round_to)
        assert torch.equal(channels.scale, scale)
        assert torch.equal(channels.q, torch.round(w / scale.unsqueeze(1)).clamp(-128, 127).to(torch.int8))
        groups = w.view(w.shape[0], 2, 32)
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)
        scale = ((high - low) / 15).clamp(min=torch.finfo(torch.float32).tiny).to(round_to).float()
        zero = (low + 8 * scale).to(round_to).float()
        q = torch.round((groups - zero.unsqueeze(-1)) / scale.unsqueeze(-1) + 8).clamp(0, 15).to(torch.uint8)
        int4 = quantize_int4(w, 32, round_to)
        assert torch.equal(int4.scale, scale) and torch.equal(int4.zero, zero) and torch.equal(int4.q, q.view(w.shape))
