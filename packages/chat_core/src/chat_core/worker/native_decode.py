"""CPU decode steps as one native call: the decoder layers' operations recorded once over fixed buffers and
run in order for each step (`chat_run_decoder`, layers/native/decode_kernels.c). The CPU's counterpart of
replaying a CUDA graph (`cuda_graphs`), with no compiler and nothing to warm up.

Why: eagerly, a decode step is ten or so Python calls per layer (norms, products, rotary, attention, the
activation), each a few microseconds of interpreter and dispatcher around a few microseconds of work; for a
small model at batch 1 that is as long as the products themselves. Recorded, the step is the embedding lookup,
the rotary table lookup and this one call; the LM head and sampling follow in Python as before.

The operations are the ones the eager path calls where the native kernels apply (`native_ops`, the int4, int8
and bfloat16 products of `native_kernels`), in the same order on the same numbers: for a float32 model a
replayed step gives the same bits as an eager one (tested). A bfloat16 model (bfloat16 activations and KV cache)
is recorded too: its step runs in float32 between the bfloat16 weights, keys and values (the residual stream,
norms and attention unrounded; keys and values rounded to bfloat16 as they are cached), so it is closer to the
float32 model than the eager bfloat16 step, not equal to it (tested against both). It applies where every
operation has such a kernel:
- the model is our `LlamaForCausalLM` (not a subclass), of a single rank (no tensor or pipeline parallel);
- the KV cache is float32 or bfloat16 on a CPU whose native kernels are built;
- every linear layer's weight is on a native kernel (a GGUF's quantized tensors kept as stored,
  `quantization="int4"/"int8"`, or dense bfloat16) with a multiple of 64 outputs (no padded rows); a fused
  layer of parts on different kernels (`PartsMethod`) multiplies each part into a buffer of its own, whose
  columns are then copied into place.
Otherwise (dense float32 weights, a custom model) decode steps run eagerly; `enforce_eager=True` and
`compile_decode=True` also turn it off, as does `batch_invariant=True` (whose attention is another kind).
"""

from __future__ import annotations

import ctypes
import logging
from typing import TYPE_CHECKING

import torch

from chat_core.layers import native_kernels
from chat_core.layers.linear_methods import Int4Method, Int8Method, LinearMethod, NativeBf16Method, PartsMethod
from chat_core.layers.norm import RMSNorm
from chat_core.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP

if TYPE_CHECKING:
    from chat_core.worker.model_runner import LlamaModelInput, LlamaModelRunner

logger = logging.getLogger(__name__)

# Operation kinds of `chat_run_decoder` (decode_kernels.c).
RMS_NORM, INT4, INT8, ROPE, ATTENTION, SILU_MUL, BF16, COLUMNS = 1, 2, 3, 4, 5, 6, 7, 8


class _Op(ctypes.Structure):
    """`chat_op`: what each field holds depends on the kind (decode_kernels.c documents each case)."""

    _fields_ = [
        ("kind", ctypes.c_int64),
        ("input", ctypes.c_void_p),
        ("output", ctypes.c_void_p),
        ("a", ctypes.c_void_p),
        ("b", ctypes.c_void_p),
        ("c", ctypes.c_void_p),
        ("d", ctypes.c_void_p),
        ("n", ctypes.c_int64 * 8),
        ("f", ctypes.c_float),
    ]


class _Step(ctypes.Structure):
    """`chat_step`: what changes from one step to the next."""

    _fields_ = [
        ("rows", ctypes.c_int64),
        ("cos", ctypes.c_void_p),
        ("signed_sin", ctypes.c_void_p),
        ("slot_mapping", ctypes.c_void_p),
        ("block_tables", ctypes.c_void_p),
        ("max_blocks", ctypes.c_int64),
        ("seq_lens", ctypes.c_void_p),
    ]


class Unsupported(Exception):
    """Why a model's decode step cannot be recorded (it then runs eagerly)."""


class NativeDecoder:
    """The recorded decode step of one model over its KV caches, for up to `max_rows` sequences a step."""

    def __init__(self, model: LlamaForCausalLM, kv_caches: list[torch.Tensor], max_rows: int, block_size: int, dtype: torch.dtype) -> None:
        _check_model(model, kv_caches)
        if dtype not in _DTYPES:
            raise Unsupported(f"its activations are {dtype}, not float32 or bfloat16")
        self.model = model
        # The model's activations: what the step takes in and gives back (the KV cache may hold another dtype,
        # `kv_cache_dtype`: a float32 model's step with a bfloat16 cache stays float32 but for the cached keys and values).
        self.dtype = dtype
        self.max_rows = max_rows
        self.library = native_kernels.library()  # available: `_check_model` asked
        config = model.config
        attention: LlamaAttention = model.layers[0].self_attn
        heads, kv_heads, head_dim = attention.num_heads, attention.num_kv_heads, attention.head_dim
        qkv_width = (heads + 2 * kv_heads) * head_dim
        intermediate = model.layers[0].mlp.down_proj.input_size_per_rank

        def buffer(width: int) -> torch.Tensor:
            return torch.empty(max_rows, width)  # pages are committed as rows are first used

        hidden = config.hidden_size
        self.hidden, self.residual, self.normed = buffer(hidden), buffer(hidden), buffer(hidden)
        qkv, rotated, attended = buffer(qkv_width), buffer((heads + kv_heads) * head_dim), buffer(heads * head_dim)
        projected, gate_up, activated, mlp_out = buffer(hidden), buffer(2 * intermediate), buffer(intermediate), buffer(hidden)
        self.final = buffer(hidden)
        self._buffers = (qkv, rotated, attended, projected, gate_up, activated, mlp_out)  # kept alive for the pointers

        # A bfloat16 model's norm weights and biases, widened once (a few KiB a layer): the step runs in float32.
        self._widened: list[torch.Tensor] = []
        ops: list[_Op] = []
        for index, (layer, cache) in enumerate(zip(model.layers, kv_caches)):
            # The first layer's residual is its input; later layers add to the running residual.
            layer_input, residual_in = (self.hidden, None) if index == 0 else (mlp_out, self.residual)
            ops.append(self._norm(layer.input_layernorm, layer_input, residual_in, self.normed, self.residual if residual_in is not None else None))
            ops.extend(self._linear(layer.self_attn.qkv_proj, self.normed, qkv))
            ops.append(_op(ROPE, qkv, rotated, n=(qkv_width, heads + kv_heads, head_dim)))
            ops.append(
                _op(
                    ATTENTION, rotated, attended,
                    a=qkv.data_ptr() + (heads + kv_heads) * head_dim * qkv.element_size(),  # the values in each qkv row
                    c=cache[0].data_ptr(), d=cache[1].data_ptr(),
                    n=((heads + kv_heads) * head_dim, qkv_width, heads, kv_heads, head_dim, block_size, config.sliding_window or 0,
                       int(cache.dtype == torch.bfloat16)),
                    f=layer.self_attn.attn.scale,
                )  # fmt: skip
            )
            ops.extend(self._linear(layer.self_attn.o_proj, attended, projected))
            ops.append(self._norm(layer.post_attention_layernorm, projected, self.hidden if index == 0 else self.residual, self.normed, self.residual))
            ops.extend(self._linear(layer.mlp.gate_up_proj, self.normed, gate_up))
            ops.append(_op(SILU_MUL, gate_up, activated, n=(intermediate,)))
            ops.extend(self._linear(layer.mlp.down_proj, activated, mlp_out))
        ops.append(self._norm(model.norm, mlp_out, self.residual, self.final, self.residual))
        self.ops = (_Op * len(ops))(*ops)
        # The operations hold raw pointers: keep every tensor they point into alive for as long as they are
        # (weights loaded again later would leave this step reading the old ones, never freed memory).
        names = ("packed_int4", "packed_int8", "bf16_weight")
        packed = [getattr(m, name) for m in model.modules() for name in names if getattr(m, name, None) is not None]
        self._kept = (packed, list(model.parameters()), list(kv_caches))
        self.steps = 0  # decode steps run

    @classmethod
    def for_runner(cls, runner: LlamaModelRunner, kv_caches: list[torch.Tensor]) -> NativeDecoder | None:
        """The runner's recorded decode step, or None (with the reason logged) where its model cannot be recorded."""
        try:
            return cls(runner.model, kv_caches, runner.engine_config.max_num_seqs, runner.block_size, runner.dtype)
        except Unsupported as reason:
            logger.info("decode steps run eagerly: %s", reason)
            return None

    def can_run(self, model_input: LlamaModelInput) -> bool:
        """A pure decode step (one new token per sequence) of at most `max_rows` sequences."""
        rows = model_input.seq_lens.shape[0]
        return 0 < rows <= self.max_rows and model_input.max_query_len == 1 and model_input.input_ids.shape[0] == rows

    def run(self, model_input: LlamaModelInput) -> torch.Tensor:
        """The step's final hidden states [rows, hidden] (after the model's last norm), its keys and values cached."""
        rows = model_input.input_ids.shape[0]
        self.hidden[:rows].copy_(self.model.embed_tokens(model_input.input_ids))  # widened exactly if bfloat16
        cos, signed_sin = self.model.rotary.lookup(model_input.positions, torch.float32)
        tables, lens, slots = model_input.block_tables, model_input.seq_lens, model_input.slot_mapping
        for name, index in (("block_tables", tables), ("seq_lens", lens), ("slot_mapping", slots)):
            if index.dtype != torch.int64 or not index.is_contiguous():
                raise ValueError(f"a native decode step needs {name} as contiguous int64, got {index.dtype}")
        step = _Step(rows, cos.data_ptr(), signed_sin.data_ptr(), slots.data_ptr(), tables.data_ptr(), tables.shape[1], lens.data_ptr())
        status = self.library.chat_run_decoder(self.ops, len(self.ops), ctypes.byref(step), torch.get_num_threads())
        if status:
            raise RuntimeError(f"native decode step: operation {-status} of {len(self.ops)} failed")
        self.steps += 1
        return self.final[:rows].to(self.dtype, copy=True)  # the buffer is overwritten by the next step

    def _norm(self, norm: RMSNorm, source: torch.Tensor, residual: torch.Tensor | None, target: torch.Tensor,
              residual_out: torch.Tensor | None) -> _Op:  # fmt: skip
        """norm(source + residual) into target (the sum into residual_out), or norm(source) without a residual."""
        weight = self._float32(norm.weight)
        return _op(
            RMS_NORM, source, target, a=weight.data_ptr(), b=residual.data_ptr() if residual is not None else 0,
            c=residual_out.data_ptr() if residual_out is not None else 0, n=(weight.shape[0],), f=norm.eps,
        )  # fmt: skip

    def _float32(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dtype == torch.float32:
            return tensor
        self._widened.append(tensor.float())
        return self._widened[-1]

    def _linear(self, layer: torch.nn.Module, source: torch.Tensor, target: torch.Tensor) -> list[_Op]:
        """The layer's product on a native kernel (its bias added after), or Unsupported. A layer of parts
        (`PartsMethod`): each part's product into a buffer of its own, then copied into its columns of `target`."""
        bias = self._float32(layer.bias) if layer.bias is not None else None
        if not isinstance(layer.method, PartsMethod):
            return [_product(layer.method, layer, source, target, bias.data_ptr() if bias is not None else 0)]
        ops, start = [], 0
        for method, part, size in zip(layer.method.methods, layer.parts, layer.local_sizes):
            products = torch.empty(self.max_rows, size)
            self._buffers += (products,)
            bias_pointer = bias.data_ptr() + start * bias.element_size() if bias is not None else 0
            ops.append(_product(method, part, source, products, bias_pointer))
            ops.append(_op(COLUMNS, products, target[:, start : start + size], n=(size, target.shape[1])))
            start += size
        return ops


def _check_model(model: LlamaForCausalLM, kv_caches: list[torch.Tensor]) -> None:
    if not native_kernels.available():
        raise Unsupported("the native CPU kernels are not available")
    if type(model) is not LlamaForCausalLM:
        raise Unsupported(f"{type(model).__name__} is not chat_core's LlamaForCausalLM")
    if not (model.stage.is_first and model.stage.is_last):
        raise Unsupported("the model is one stage of a pipeline")
    first = model.layers[0] if len(model.layers) else None
    if first is None or first.self_attn.qkv_proj.tp.size != 1:
        raise Unsupported("the model is split across tensor-parallel ranks")
    for layer in model.layers:
        if type(layer) is not LlamaDecoderLayer or type(layer.self_attn) is not LlamaAttention or type(layer.mlp) is not LlamaMLP:
            raise Unsupported(f"{type(layer).__name__} is not chat_core's Llama decoder layer")
    norms = [model.norm, *(n for layer in model.layers for n in (layer.input_layernorm, layer.post_attention_layernorm))]
    if any(type(norm) is not RMSNorm or norm.weight.dtype not in _DTYPES for norm in norms):
        raise Unsupported("its norms are not float32 or bfloat16 RMSNorms")
    if first.self_attn.head_dim > 512:
        raise Unsupported(f"head_dim {first.self_attn.head_dim} is over 512")
    for cache in kv_caches:
        if cache.dtype not in _DTYPES or cache.device.type != "cpu" or not cache.is_contiguous():
            raise Unsupported(f"the KV cache is {cache.dtype} on {cache.device}, not contiguous float32 or bfloat16 on the CPU")
    if len({cache.dtype for cache in kv_caches}) > 1:
        raise Unsupported("the layers' KV caches differ in dtype")


_DTYPES = (torch.float32, torch.bfloat16)  # of the activations and KV cache a step can take


def _op(kind: int, source: torch.Tensor, target: torch.Tensor, *, a: int = 0, b: int = 0, c: int = 0, d: int = 0,
        n: tuple[int, ...] = (), f: float = 0.0) -> _Op:  # fmt: skip
    return _Op(kind, source.data_ptr(), target.data_ptr(), a or None, b or None, c or None, d or None, (ctypes.c_int64 * 8)(*n), f)


def _product(method: LinearMethod, layer: torch.nn.Module, source: torch.Tensor, target: torch.Tensor, bias_pointer: int) -> _Op:
    """The product of `layer`'s weight (held as `method` holds it) on the native int4, int8 or bfloat16 kernel,
    or Unsupported."""
    if isinstance(method, Int4Method) and method.kernel.native:
        packed = layer.packed_int4
        if packed.weight.shape[0] != packed.out_features or packed.out_features != target.shape[1]:
            raise Unsupported(f"an int4 layer has {packed.out_features} outputs, not a multiple of 64")
        half = int(packed.scales_and_zeros.dtype == torch.float16)
        return _op(
            INT4, source, target, a=packed.weight.data_ptr(), b=packed.scales_and_zeros.data_ptr(), c=bias_pointer,
            n=(packed.out_features, packed.in_features, packed.group_size, half),
        )  # fmt: skip
    if isinstance(method, Int8Method) and method.kernel.native:
        packed = layer.packed_int8
        if packed.weight.shape[0] != packed.out_features or packed.out_features != target.shape[1]:
            raise Unsupported(f"an int8 layer has {packed.out_features} outputs, not a multiple of 64")
        group = packed.in_features // packed.scale.shape[0] if packed.scale.dim() == 2 else 0  # 0: a scale per row
        return _op(
            INT8, source, target, a=packed.weight.data_ptr(), b=packed.scale.data_ptr(), c=bias_pointer,
            d=packed.low.data_ptr() if packed.low is not None else 0, n=(packed.out_features, packed.in_features, group),
        )  # fmt: skip
    if isinstance(method, NativeBf16Method):
        weight = layer.bf16_weight
        if weight.shape[0] != method.out_features or method.out_features != target.shape[1]:
            raise Unsupported(f"a bfloat16 layer has {method.out_features} outputs, not a multiple of 64")
        return _op(BF16, source, target, a=weight.data_ptr(), c=bias_pointer, n=(method.out_features, weight.shape[1]))
    raise Unsupported(f"a linear layer's weights are {method.name}, which no native kernel multiplies here")
