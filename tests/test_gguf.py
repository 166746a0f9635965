"""GGUF files of every supported type, written the way llama.cpp writes them, against transformers."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from gguf_writer import write_gguf
from tiny_models import make_tiny_checkpoint

from chat_core import Engine, SamplingParams, open_checkpoint
from chat_core.layers import native_kernels

QTYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]


@pytest.fixture(scope="module")
def tiny_llama(tiny_checkpoints):
    return tiny_checkpoints("llama_tied")[1]


# Dequantized at load, and (for Q4_0/Q4_1/Q4_K, and Q6_K/Q5_0 with the native kernels) kept packed as int4 and multiplied exactly (float32 kernels).
PATHS = {
    "dequantized": {"quantization": None},
    "kept-quantized": {"quantization": "gguf", "quantization_compute_dtype": "float32"},
    "default": {},  # quantization="auto": a GGUF whose tensors a kernel takes as stored loads them so
}


CASES = (
    [(qtype, "dequantized") for qtype in QTYPES]
    + [(qtype, "kept-quantized") for qtype in ("Q4_0", "Q4_1", "Q4_K", "Q6_K", "Q5_0", "Q5_1", "Q5_K")]
    + [(qtype, "default") for qtype in ("Q8_0", "Q6_K", "Q5_0", "Q5_K")]
)


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory):
    """Rows of 256 inputs or more, as the K-quants' blocks need (the tiny models have 64)."""
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("wide-llama")), "llama_tied", hidden_size=256, intermediate_size=512)


@pytest.mark.parametrize(("qtype", "path_name"), CASES)
def test_gguf_types_load_and_match_transformers_on_the_same_weights(tmp_path, request, qtype, path_name):
    model = request.getfixturevalue("wide_llama" if qtype.endswith("_K") else "tiny_llama")
    path = str(tmp_path / f"tiny-{qtype}.gguf")
    stored = write_gguf(path, model, qtype)
    layers = assert_answers_as_transformers(path, model, stored, PATHS[path_name], wide=qtype.endswith("_K"))
    if path_name != "dequantized" and qtype in ("Q8_0", "Q6_K", "Q5_0", "Q5_1", "Q5_K"):  # 8-bit groups where the native kernels run
        assert layers[0].mlp.down_proj.method.name == (qtype.lower() if native_kernels.available() else "dense")


@pytest.mark.parametrize("base", ["Q4_K", "Q5_K"])
def test_a_k_m_mix_keeps_each_layer_as_stored_where_a_kernel_takes_it(tmp_path, wide_llama, base):
    """As llama.cpp's Q4_K_M and Q5_K_M mix types (v and down projections in Q6_K): Q4_K layers stay 4-bit,
    Q5_K and Q6_K ones 8-bit where the native kernels run, and a fused layer of parts on different kernels keeps
    each part as it is stored."""
    path = str(tmp_path / f"tiny-{base}_m.gguf")
    stored = write_gguf(path, wide_llama, base, overrides={"attn_v.weight": "Q6_K", "ffn_down.weight": "Q6_K"})
    engine_layers = assert_answers_as_transformers(path, wide_llama, stored, {}, wide=True)
    native = native_kernels.available()
    kept = "int4" if base == "Q4_K" else ("q5_k" if native else "dense")
    for layer in engine_layers:
        assert layer.mlp.gate_up_proj.method.name == kept and layer.self_attn.o_proj.method.name == kept
        assert layer.mlp.down_proj.method.name == ("q6_k" if native else "dense")
        assert layer.self_attn.qkv_proj.method.name == f"{kept} | {kept} | {'q6_k' if native else 'dense'}"


def test_where_k_quants_do_not_fit_llama_cpp_falls_back_to_q5_0_and_q8_0_which_are_kept_too(tmp_path, tiny_llama):
    """Rows of 64 inputs (SmolLM2's 576 likewise) cannot hold K-quant blocks of 256: llama.cpp's Q4_K_M writes Q5_0
    and Q8_0 there. Both are int8 groups of 32, so even a fused layer mixing them (q/k Q5_0, v Q8_0) stays 8-bit."""
    path = str(tmp_path / "tiny-q5_0-q8_0.gguf")
    stored = write_gguf(path, tiny_llama, "Q5_0", overrides={"attn_v.weight": "Q8_0", "ffn_down.weight": "Q8_0"})
    layers = assert_answers_as_transformers(path, tiny_llama, stored, {})
    if native_kernels.available():
        assert {layer.self_attn.qkv_proj.method.name for layer in layers} == {"q5_0+q8_0"}
        assert {layer.mlp.gate_up_proj.method.name for layer in layers} == {"q5_0"}
        assert {layer.mlp.down_proj.method.name for layer in layers} == {"q8_0"}


def assert_answers_as_transformers(path: str, model, stored: dict, options: dict, wide: bool = False):
    """The engine on the GGUF at `path` answers greedily as transformers on the weights the file holds
    (`stored`), with the same log-probabilities (float32 sums in another order: within 1e-4 for rows of 64
    inputs, 4e-4 for `wide` rows of 256-512); returns the engine's decoder layers."""
    reference = copy.deepcopy(model)
    reference.load_state_dict(stored)

    checkpoint = open_checkpoint(path)
    assert checkpoint.config.tie_word_embeddings
    assert checkpoint.config.num_kv_heads == model.config.num_key_value_heads
    prompt = list(range(7, 47))
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=5)
    with Engine.from_pretrained(path, dtype="float32", **options) as engine:
        assert engine.tokenizer is None  # the file carries no vocabulary: token ids only
        output = engine.generate({"prompt_token_ids": prompt}, params)[0]
        layers = engine.executor.worker.model_runner.model.layers
    with torch.no_grad():
        expected = reference.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
        logits = reference(torch.tensor([prompt + output.token_ids])).logits[0, len(prompt) - 1 : -1]
    assert output.token_ids == expected[0, len(prompt) :].tolist()
    ours = torch.tensor([lp.logprob for lp in output.outputs[0].logprobs])
    theirs = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(output.token_ids)[:, None])[:, 0]
    torch.testing.assert_close(ours, theirs, atol=4e-4 if wide else 1e-4, rtol=0)
    return layers


def test_gguf_slices_read_only_what_is_asked(tmp_path, tiny_llama):
    path = str(tmp_path / "tiny-q8.gguf")
    write_gguf(path, tiny_llama, "Q8_0")
    tensors = dict(open_checkpoint(path).tensors())
    q = tensors["model.layers.0.self_attn.q_proj.weight"]
    full = q.read()
    torch.testing.assert_close(q.read(0, 16, 32), full[16:48], atol=0, rtol=0)
    torch.testing.assert_close(q.read(1, 32, 32), full[:, 32:64], atol=0, rtol=0)
    torch.testing.assert_close(q.read(1, 8, 8), full[:, 8:16], atol=0, rtol=0)  # not block-aligned


scalars = st.one_of(
    st.integers(-(2**31), 2**31 - 1),
    st.floats(allow_nan=False, width=32),
    st.booleans(),
    st.text(max_size=12),
)
metadata_values = st.one_of(
    scalars,
    st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=20),  # (gguf's writer refuses empty arrays)
    st.lists(st.floats(allow_nan=False, width=32), min_size=1, max_size=20),
    st.lists(st.text(max_size=12), min_size=1, max_size=20),  # a vocabulary's shape: short strings, any unicode
    st.lists(st.lists(st.integers(0, 100), min_size=1, max_size=3), min_size=1, max_size=3),  # arrays of arrays
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.from_regex(r"test\.[a-z]{1,8}", fullmatch=True), metadata_values, max_size=6))
def test_gguf_metadata_reads_as_the_gguf_package_reads_it(tmp_path, values):
    """Our reader parses arrays in bulk; every field's contents must equal the stock reader's."""
    import gguf

    from chat_core.checkpoint.gguf_file import GGUFFile

    path = str(tmp_path / "metadata.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    for key, value in values.items():
        writer.add_key_value(key, value, _value_type(value))
    writer.add_tensor("weight", np.zeros((2, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    stock = {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if not k.startswith("GGUF.")}
    ours = GGUFFile(path)
    assert ours.metadata == stock
    assert list(ours.tensors) == ["weight"]


def _value_type(value):
    import gguf

    kinds = {bool: gguf.GGUFValueType.BOOL, int: gguf.GGUFValueType.INT32, float: gguf.GGUFValueType.FLOAT32, str: gguf.GGUFValueType.STRING}
    return gguf.GGUFValueType.ARRAY if isinstance(value, list) else kinds[type(value)]
