"""One native call for each small operation of a decoder layer (`native/decode_kernels.c`): RMSNorm with its
residual add, SiLU-and-multiply, rotary embedding, and decode attention over the paged cache.

Eagerly each of these is several torch ops of a few microseconds each (RMSNorm on CPU is seven), and at
batch 1 a small model's decode step is mostly such overhead: measured on SmolLM2 before these, 9 of the
step's 17 ms were ops other than the matrix products. The layers call these where `applies` says so
(float32 activations on a CPU whose native kernels are built, outside `torch.compile`, which fuses the same
ops itself), and torch's ops otherwise; both compute the same function in float32 (tests compare them).
The library is the one `native_kernels` builds and checks.
"""

from __future__ import annotations

import ctypes

import torch

from chat_core.layers import native_kernels


def applies(x: torch.Tensor) -> bool:
    """Whether the native ops run for activations `x`: float32 on a CPU with the native kernels, run eagerly."""
    if torch.compiler.is_compiling():  # first: the compiler must not trace into the library's loading
        return False
    return x.dtype == torch.float32 and x.device.type == "cpu" and native_kernels.available()


def declare(library: ctypes.CDLL) -> None:
    """Argument types of the library's decode kernels (called by `native_kernels` when it loads it)."""
    pointer, size, integer, real = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    library.chat_rms_norm.argtypes = [pointer] * 5 + [size, size, real, integer]
    library.chat_rms_norm.restype = None
    library.chat_silu_mul.argtypes = [pointer, pointer, size, size, integer]
    library.chat_silu_mul.restype = None
    library.chat_rope.argtypes = [pointer, size, pointer, pointer, pointer, size, size, size, integer]
    library.chat_rope.restype = None
    library.chat_decode_attention.argtypes = (
        [pointer, size, pointer, size, pointer, size, pointer, pointer, pointer, pointer, size, pointer, size, size, real, pointer]
        + [size] * 4 + [integer, integer]
    )  # fmt: skip
    library.chat_decode_attention.restype = ctypes.c_int
    library.chat_run_decoder.argtypes = [pointer, size, pointer, integer]
    library.chat_run_decoder.restype = ctypes.c_int


def _library() -> ctypes.CDLL:
    library = native_kernels.library()
    assert library is not None, "native kernels are not available; check applies() first"
    return library


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`x / sqrt(mean(x^2) + eps) * weight` over the last dimension; with a residual, of `x + residual`,
    returned as `(normed, x + residual)`."""
    return _rms_norm(_library(), x, weight, eps, residual)


def _rms_norm(library, x, weight, eps, residual):  # type: ignore[no-untyped-def]
    x = x.contiguous()
    dim = x.shape[-1]
    out = torch.empty_like(x)
    if residual is None:
        library.chat_rms_norm(x.data_ptr(), None, weight.data_ptr(), out.data_ptr(), None, x.numel() // dim, dim, eps, torch.get_num_threads())
        return out
    residual = residual.contiguous()
    total = torch.empty_like(x)
    library.chat_rms_norm(
        x.data_ptr(), residual.data_ptr(), weight.data_ptr(), out.data_ptr(), total.data_ptr(), x.numel() // dim, dim, eps,
        torch.get_num_threads(),
    )  # fmt: skip
    return out, total


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` for `gate_up` = [..., 2 * width] holding gate then up -> [..., width]."""
    return _silu_mul(_library(), gate_up)


def _silu_mul(library, gate_up):  # type: ignore[no-untyped-def]
    gate_up = gate_up.contiguous()
    width = gate_up.shape[-1] // 2
    out = gate_up.new_empty(*gate_up.shape[:-1], width)
    library.chat_silu_mul(gate_up.data_ptr(), out.data_ptr(), gate_up.numel() // (2 * width), width, torch.get_num_threads())
    return out


def rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """`x * cos + roll(x, head_dim / 2) * signed_sin` for x [tokens, heads, head_dim] whose heads are contiguous
    (rows may be a view into a wider tensor) and cos, signed_sin [tokens, 1, head_dim] -> a new contiguous tensor."""
    return _rope(_library(), x, cos, signed_sin)


def _rope(library, x, cos, signed_sin):  # type: ignore[no-untyped-def]
    tokens, heads, dim = x.shape
    if x.stride(2) != 1 or x.stride(1) != dim:
        x = x.contiguous()
    cos, signed_sin = cos.contiguous(), signed_sin.contiguous()
    out = x.new_empty(tokens, heads, dim)
    library.chat_rope(
        x.data_ptr(), x.stride(0), cos.data_ptr(), signed_sin.data_ptr(), out.data_ptr(), tokens, heads, dim, torch.get_num_threads()
    )
    return out


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor | None,
    v: torch.Tensor | None,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
    sliding_window: int | None,
    scale: float,
) -> torch.Tensor:
    """One new token per sequence: writes k, v [batch, kv_heads, head_dim] (unless None) to the cache slots of
    `slot_mapping`, then attends q [batch, heads, head_dim] to each sequence's `seq_lens` keys through its
    row of `block_tables`. Caches [slots, kv_heads, head_dim] contiguous, float32 or bfloat16 (widened as read, the
    new keys and values rounded to it as written); q, k, v float32; every index int64. -> [batch, heads * head_dim]."""
    batch, heads, dim = q.shape
    kv_heads = key_cache.shape[1]
    for name, tensor in (("key_cache", key_cache), ("value_cache", value_cache)):
        if tensor.dtype not in (torch.float32, torch.bfloat16) or tensor.dtype != key_cache.dtype or not tensor.is_contiguous():
            raise ValueError(
                f"native decode attention needs contiguous float32 or bfloat16 caches of one dtype, got {name} "
                f"{tensor.dtype} (key_cache {key_cache.dtype}) with strides {tensor.stride()}"
            )
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if tensor is not None and tensor.dtype != torch.float32:
            raise ValueError(f"native decode attention takes float32 {name}, got {tensor.dtype}")
    for name, index in (("slot_mapping", slot_mapping), ("block_tables", block_tables), ("seq_lens", seq_lens)):
        if index.dtype != torch.int64 or not index.is_contiguous():
            raise ValueError(f"native decode attention needs {name} as contiguous int64, got {index.dtype}")
    rows = [t if t.stride(2) == 1 and t.stride(1) == dim else t.contiguous() for t in (q, k, v) if t is not None]
    q, (k, v) = rows[0], (rows[1], rows[2]) if k is not None else (None, None)
    out = q.new_empty(batch, heads * dim)
    status = _library().chat_decode_attention(
        q.data_ptr(), q.stride(0),
        None if k is None else k.data_ptr(), 0 if k is None else k.stride(0),
        None if v is None else v.data_ptr(), 0 if v is None else v.stride(0),
        key_cache.data_ptr(), value_cache.data_ptr(), slot_mapping.data_ptr(), block_tables.data_ptr(), block_tables.shape[1],
        seq_lens.data_ptr(), block_size, sliding_window or 0, scale, out.data_ptr(), batch, heads, kv_heads, dim,
        torch.get_num_threads(), int(key_cache.dtype == torch.bfloat16),
    )  # fmt: skip
    if status:
        raise ValueError(f"native decode attention takes a head_dim of at most 512, got {dim}")
    return out


def check(library: ctypes.CDLL) -> None:
    """Each op once against torch's arithmetic in float64 (called by `native_kernels` before first use)."""
    generator = torch.Generator().manual_seed(1)
    x, residual = torch.randn(3, 40, generator=generator), torch.randn(3, 40, generator=generator)
    weight = torch.rand(40, generator=generator)
    out, total = _rms_norm(library, x, weight, 1e-5, residual)
    wide = (x + residual).double()
    _expect_close(out, wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + 1e-5) * weight.double(), "rms_norm")
    _expect_close(total, wide, "rms_norm's residual")
    gate_up = torch.randn(3, 2 * 40, generator=generator) * 4
    gate, up = gate_up.double().chunk(2, dim=-1)
    _expect_close(_silu_mul(library, gate_up), torch.nn.functional.silu(gate) * up, "silu_mul")
    heads = torch.randn(3, 2, 48, generator=generator)
    angles = torch.rand(3, 1, 24, generator=generator).double() * 6
    cos, sin = torch.cat((angles.cos(), angles.cos()), -1), torch.cat((-angles.sin(), angles.sin()), -1)
    expected = heads.double() * cos + heads.double().roll(24, -1) * sin
    _expect_close(_rope(library, heads, cos.float(), sin.float()), expected, "rope")


def _expect_close(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    error = (got.double() - want).abs().max().item()
    if not error <= 1e-5 * max(1.0, want.abs().max().item()):
        raise AssertionError(f"the built {name} kernel disagrees with float64 arithmetic by {error:.3g}")
