"""Our own CPU kernels, built and loaded at run time: the weight-only products (`native/quant_kernels.c`,
here) and the decoder layer's small ops (`native/decode_kernels.c`, called through `native_ops`).

torch's weight-only kernels on CPU are fast only in bfloat16 (their float32 versions are reference loops),
and GGUF's Q8_0 has none at all (its scale per 32 inputs fits no torch op). `quant_kernels.c` multiplies
4-bit groups and 8-bit weights (a scale per 32 inputs or per row) by float32 activations, in float32, with
the weights' 64 rows of a block in the lanes of four vectors and software prefetching; bfloat16 weights the
same way (widened exactly, so the products are those of oneDNN's bfloat16 kernel with x kept in float32). Measured here
(SmolLM2's 120 int4 layers at batch 1, caches flushed first): 5.2-5.4 ms against 5.9-6.5 ms for torch's
bfloat16 kernel; its 8-bit LM head 1.0-1.4 ms a step against 4.9 ms for the float32 table it replaces.

The sources are compiled once per machine with the system C compiler (`$CC`, else `cc`; about half a second)
into `$CHAT_CORE_CACHE_DIR` (default `~/.cache/chat-core`), named by a digest of the sources and the flags,
and loaded with ctypes; a one-off check of each kernel against float64 arithmetic guards the result. Where
this is not possible (a CPU without AVX-512, no compiler, `CHAT_CORE_NATIVE_KERNELS=0`) `available()` is
False, the reason is logged once, and `weight_kernels` uses torch's kernels instead. Building a library
removes those of other sources (older versions) that no start has used for 30 days.

Inside a compiled graph the products are torch ops (`chat_core::int4_mm`, `chat_core::int8_mm`,
`chat_core::bf16_mm`) that the compiler calls as they are.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from chat_core.layers import native_ops

logger = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name("native") / name for name in ("quant_kernels.c", "decode_kernels.c"))
FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma", "-fopenmp", "-shared", "-fPIC")
LIBRARIES = ("-lm",)
INT4_BLOCK_ROWS = INT8_BLOCK_ROWS = BF16_BLOCK_ROWS = 64  # output rows per block of the three layouts


def cache_dir() -> Path:
    root = os.environ.get("CHAT_CORE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "chat-core"
    )
    return Path(root) / "native"


def available() -> bool:
    """Whether the native kernels are built, loaded and checked on this machine (decided once)."""
    return library() is not None


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded and checked library, or None where the native kernels are not available (the reason logged)."""
    if os.environ.get("CHAT_CORE_NATIVE_KERNELS", "1") == "0":
        logger.info("native CPU kernels turned off (CHAT_CORE_NATIVE_KERNELS=0): using torch's")
        return None
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX512", "AVX512_BF16", "AMX"):  # torch names AVX-512 F, BW, VL and DQ so
        logger.info("native CPU kernels need AVX-512; this CPU offers %s: using torch's", capability)
        return None
    try:
        loaded = _load(_build())
        _check(loaded)
        native_ops.check(loaded)
    except (OSError, RuntimeError, subprocess.SubprocessError, AssertionError) as exc:
        logger.warning("native CPU kernels unavailable (%s): using torch's, which are slower here", exc)
        return None
    return loaded


def _build() -> Path:
    """The library for these sources and flags: from the cache, else compiled into it."""
    digest = hashlib.sha256(repr((FLAGS, LIBRARIES, platform.machine())).encode())
    for source in SOURCES:
        digest.update(source.read_bytes())
    target = cache_dir() / f"chat_kernels-{digest.hexdigest()[:16]}.so"
    if target.exists():
        try:
            os.utime(target)  # its modification time is its last use: what `_prune` goes by
        except OSError:  # a read-only cache still serves
            pass
        return target
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C compiler {compiler!r} on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed: processes starting together (ranks) never load half a file.
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        command = [compiler, *FLAGS, *map(str, SOURCES), "-o", str(built), *LIBRARIES]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            names = " ".join(source.name for source in SOURCES)
            raise RuntimeError(f"{compiler} exited with {result.returncode} compiling {names}: {result.stderr.strip()[-500:]}")
        os.replace(built, target)
    _prune(target)
    return target


UNUSED_LIBRARY_DAYS = 30  # a library no start has loaded for this long is removed when another is built


def _prune(keep: Path) -> None:
    """Remove the libraries of other sources (older versions of this package) that no start has used for
    `UNUSED_LIBRARY_DAYS`; a version still in use touches its library at every start, so it stays."""
    cutoff = time.time() - UNUSED_LIBRARY_DAYS * 86400
    for library_path in keep.parent.glob("*_kernels-*.so"):  # ours, and the quant_kernels-* of earlier versions
        try:
            if library_path != keep and library_path.stat().st_mtime < cutoff:
                library_path.unlink()
        except OSError:  # removed meanwhile by another process, or not ours to remove: leave it
            continue


def _load(path: Path) -> ctypes.CDLL:
    loaded = ctypes.CDLL(str(path))
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    loaded.chat_int4_matmul.argtypes = [pointer] * 3 + [ctypes.c_int, pointer] + [size] * 4 + [ctypes.c_int]
    loaded.chat_int4_matmul.restype = ctypes.c_int
    loaded.chat_int8_matmul.argtypes = [pointer] * 4 + [size, pointer] + [size] * 3 + [ctypes.c_int]
    loaded.chat_int8_matmul.restype = ctypes.c_int
    loaded.chat_bf16_matmul.argtypes = [pointer] * 3 + [size] * 3 + [ctypes.c_int]
    loaded.chat_bf16_matmul.restype = ctypes.c_int
    native_ops.declare(loaded)
    return loaded


def _check(library: ctypes.CDLL) -> None:
    """One small product of each kind against float64 arithmetic, rows 1 to 5 (a whole and a partial tile)."""
    generator = torch.Generator().manual_seed(0)
    rows, cols = 2 * INT4_BLOCK_ROWS, 96
    x = torch.randn(5, cols, generator=generator)
    q4 = torch.randint(0, 16, (rows, cols), dtype=torch.uint8, generator=generator)
    groups = cols // 32
    scale_low = torch.stack((torch.rand(groups, rows, generator=generator) + 0.5, torch.randn(groups, rows, generator=generator)))

    def int4_weight(scale_low: torch.Tensor) -> torch.Tensor:
        scale, low = scale_low.float().transpose(1, 2).repeat_interleave(32, 2)
        return q4.float() * scale + low

    q8 = torch.randint(-128, 128, (rows, cols), dtype=torch.int8, generator=generator)
    scales_per_32, scales_per_16 = (torch.rand(cols // group, rows, generator=generator) for group in (32, 16))
    row_scale = torch.rand(rows, generator=generator)
    low_per_32 = torch.randn(cols // 32, rows, generator=generator)
    weight16 = torch.randn(rows, cols, generator=generator).bfloat16()
    for count in (1, 5):
        rows_x = x[:count].contiguous()
        checks = [
            (_int4(library, rows_x, pack_int4(q4), scale_low, 32), int4_weight(scale_low)),
            (_int4(library, rows_x, pack_int4(q4), scale_low.half(), 32), int4_weight(scale_low.half())),
            (_int8(library, rows_x, pack_int8(q8), scales_per_32), q8.float() * scales_per_32.t().repeat_interleave(32, 1)),
            (_int8(library, rows_x, pack_int8(q8), scales_per_16), q8.float() * scales_per_16.t().repeat_interleave(16, 1)),
            (
                _int8(library, rows_x, pack_int8(q8), scales_per_32, low_per_32),
                q8.float() * scales_per_32.t().repeat_interleave(32, 1) + low_per_32.t().repeat_interleave(32, 1),
            ),
            (_int8(library, rows_x, pack_int8(q8), row_scale), q8.float() * row_scale.unsqueeze(1)),
            (_bf16(library, rows_x, pack_bf16(weight16)), weight16.float()),
        ]
        for got, dense in checks:
            want = rows_x.double() @ dense.double().t()
            # float32 sums of these terms: a few units of 2^-24 of the sum of their magnitudes
            bound = 1e-5 * (rows_x.double().abs() @ dense.double().abs().t())
            if not bool(((got.double() - want).abs() <= bound).all()):
                raise AssertionError(f"the built kernels disagree with float64 arithmetic by {(got.double() - want).abs().max():.3g}")


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """4-bit values q [rows (a multiple of 64), cols] uint8 in `chat_int4_matmul`'s layout, [rows, cols // 2] bytes."""
    rows, cols = q.shape
    halves = q.view(rows // INT4_BLOCK_ROWS, 2, INT4_BLOCK_ROWS // 2, cols)  # byte j: row j low, row j + 32 high
    return (halves[:, 0] | halves[:, 1] << 4).transpose(1, 2).contiguous().view(rows, cols // 2)


def unpack_int4_rows(packed: torch.Tensor, row_ids: torch.Tensor, cols: int) -> torch.Tensor:
    """The 4-bit values of rows `row_ids` of a `pack_int4` weight, [len(row_ids), cols] uint8."""
    blocks = packed.view(-1, cols, INT4_BLOCK_ROWS // 2)
    within = row_ids % INT4_BLOCK_ROWS
    data = blocks[row_ids // INT4_BLOCK_ROWS, :, within % (INT4_BLOCK_ROWS // 2)]
    return torch.where((within >= INT4_BLOCK_ROWS // 2).unsqueeze(1), data >> 4, data & 15)


def pack_blocks(weight: torch.Tensor) -> torch.Tensor:
    """An int8 or bfloat16 weight [rows (a multiple of 64), cols] in the layout `chat_int8_matmul` and
    `chat_bf16_matmul` share: 64-row blocks, input-major (entry j of input k of block b: row 64 b + j)."""
    rows, cols = weight.shape
    return weight.view(rows // INT8_BLOCK_ROWS, INT8_BLOCK_ROWS, cols).transpose(1, 2).contiguous().view(rows, cols)


def unpack_block_rows(packed: torch.Tensor, row_ids: torch.Tensor) -> torch.Tensor:
    """Rows `row_ids` of a `pack_blocks` weight, [len(row_ids), cols], in its element type."""
    cols = packed.shape[1]
    return packed.view(-1, cols, INT8_BLOCK_ROWS)[row_ids // INT8_BLOCK_ROWS, :, row_ids % INT8_BLOCK_ROWS]


# One layout, two element types: the names say which kernel a weight is packed for.
pack_int8 = pack_bf16 = pack_blocks
unpack_int8_rows = unpack_bf16_rows = unpack_block_rows


def _int4(library: ctypes.CDLL, x: torch.Tensor, packed: torch.Tensor, scale_low: torch.Tensor, group: int) -> torch.Tensor:
    rows, cols = x.shape
    out_features = packed.shape[0]
    y = torch.empty(rows, out_features)
    if rows:
        status = library.chat_int4_matmul(
            x.data_ptr(), packed.data_ptr(), scale_low.data_ptr(), int(scale_low.dtype == torch.float16), y.data_ptr(),
            rows, out_features, cols, group, torch.get_num_threads(),
        )  # fmt: skip
        if status:
            raise MemoryError(f"chat_int4_matmul could not allocate scratch for {rows} rows")
    return y


def _int8(library: ctypes.CDLL, x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, low: torch.Tensor | None = None) -> torch.Tensor:
    rows, cols = x.shape
    out_features = packed.shape[0]
    y = torch.empty(rows, out_features)
    if rows:
        group = cols // scale.shape[0] if scale.dim() == 2 else 0  # [cols // group, out]; else [out]: one per row
        if low is not None and (group == 0 or low.shape != scale.shape):
            raise ValueError(f"int8 minima {tuple(low.shape)} need scales per group of the same shape, got {tuple(scale.shape)}")
        status = library.chat_int8_matmul(
            x.data_ptr(), packed.data_ptr(), scale.data_ptr(), low.data_ptr() if low is not None else None, group,
            y.data_ptr(), rows, out_features, cols, torch.get_num_threads(),
        )  # fmt: skip
        if status:
            raise MemoryError(f"chat_int8_matmul could not allocate scratch for {rows} rows")
    return y


def _bf16(library: ctypes.CDLL, x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    rows, cols = x.shape
    out_features = packed.shape[0]
    y = torch.empty(rows, out_features)
    if rows:
        library.chat_bf16_matmul(x.data_ptr(), packed.data_ptr(), y.data_ptr(), rows, out_features, cols, torch.get_num_threads())
    return y


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scale_low: torch.Tensor, group: int) -> torch.Tensor:
    """x [rows, cols] float32 @ W.T for a `pack_int4` weight [out, cols // 2] whose value is
    scale_low[0][g, n] * q + scale_low[1][g, n] (contiguous float32 or float16, [2, cols // group, out]) -> [rows, out]."""
    if torch.compiler.is_compiling():
        return torch.ops.chat_core.int4_mm(x, packed, scale_low, group)
    return _int4_op(x, packed, scale_low, group)


def int8_matmul(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, low: torch.Tensor | None = None) -> torch.Tensor:
    """x [rows, cols] float32 @ W.T for a `pack_int8` weight q [out, cols] times `scale`: float32 [cols // group, out]
    (one scale per `group` inputs: 32 for GGUF's Q8_0, 16 for Q6_K) or [out] (one per row), plus `low` (float32
    [cols // group, out], the value of q = 0: GGUF's Q5_1 and Q5_K minima) where given -> [rows, out]."""
    if torch.compiler.is_compiling():
        return torch.ops.chat_core.int8_mm(x, packed, scale, low)
    return _int8_op(x, packed, scale, low)


def bf16_matmul(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x [rows, cols] float32 @ W.T for a `pack_bf16` weight [out, cols] -> [rows, out], in float32."""
    if torch.compiler.is_compiling():
        return torch.ops.chat_core.bf16_mm(x, packed)
    return _bf16_op(x, packed)


def _loaded() -> ctypes.CDLL:
    loaded = library()
    assert loaded is not None, "native kernels are not available; check available() first"
    return loaded


def _int4_op(x: torch.Tensor, packed: torch.Tensor, scale_low: torch.Tensor, group: int) -> torch.Tensor:
    return _int4(_loaded(), x.contiguous(), packed, scale_low, group)


def _int8_op(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, low: torch.Tensor | None = None) -> torch.Tensor:
    return _int8(_loaded(), x.contiguous(), packed, scale, low)


def _bf16_op(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return _bf16(_loaded(), x.contiguous(), packed)


_LIBRARY = torch.library.Library("chat_core", "FRAGMENT")
_LIBRARY.define("int4_mm(Tensor x, Tensor packed, Tensor scale_low, int group) -> Tensor")
_LIBRARY.impl("int4_mm", _int4_op, "CompositeExplicitAutograd")
_LIBRARY.define("int8_mm(Tensor x, Tensor packed, Tensor scale, Tensor? low=None) -> Tensor")
_LIBRARY.impl("int8_mm", _int8_op, "CompositeExplicitAutograd")
_LIBRARY.define("bf16_mm(Tensor x, Tensor packed) -> Tensor")
_LIBRARY.impl("bf16_mm", _bf16_op, "CompositeExplicitAutograd")


@torch.library.register_fake("chat_core::int4_mm")
def _(x, packed, scale_low, group):  # type: ignore[no-untyped-def]
    return x.new_empty(x.shape[0], packed.shape[0])


@torch.library.register_fake("chat_core::int8_mm")
def _(x, packed, scale, low=None):  # type: ignore[no-untyped-def]
    return x.new_empty(x.shape[0], packed.shape[0])


@torch.library.register_fake("chat_core::bf16_mm")
def _(x, packed):  # type: ignore[no-untyped-def]
    return x.new_empty(x.shape[0], packed.shape[0])
