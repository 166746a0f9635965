"""Matrix products with weights pre-packed for oneDNN, where that beats the default CPU GEMM.

On CPU, `F.linear` with a small batch of rows (a decode step) is slow for wide weights: at 8 rows
the LM head takes more than twice as long as with the weight reordered once for oneDNN. The packed
copy is made once after loading; where the ops are missing (another build of torch) or the device
is not a CPU, nothing is packed and `F.linear` is used. Inside a compiled graph (the compiled CPU decode
step) the packed product is one opaque op, `chat_core::packed_linear`: inductor cannot lower oneDNN's op
with a weight that is a graph input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_PACKABLE_DTYPES = (torch.float32, torch.bfloat16)


def pack_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's packed copy of a [out, in] weight, or None where packing does not apply."""
    if weight.device.type != "cpu" or weight.dtype not in _PACKABLE_DTYPES or not torch.backends.mkldnn.is_available():
        return None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
        # One call proves the op works in this build, before we rely on it.
        probe = torch.zeros(1, weight.shape[1], dtype=weight.dtype)
        torch.ops.mkldnn._linear_pointwise(probe, packed, None, "none", [], "")
    except (RuntimeError, AttributeError, NotImplementedError):
        return None
    return packed


def linear(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T, through the packed weight when there is one."""
    if packed is None:
        return F.linear(x, weight)
    rows = x.reshape(-1, x.shape[-1])
    if torch.compiler.is_compiling():
        return torch.ops.chat_core.packed_linear(rows, packed).view(*x.shape[:-1], -1)
    return _packed_linear(rows, packed).view(*x.shape[:-1], -1)


def _packed_linear(rows: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(rows, packed, None, "none", [], "")


_LIBRARY = torch.library.Library("chat_core", "FRAGMENT")
_LIBRARY.define("packed_linear(Tensor rows, Tensor packed) -> Tensor")
_LIBRARY.impl("packed_linear", _packed_linear, "CompositeExplicitAutograd")


@torch.library.register_fake("chat_core::packed_linear")
def _(rows, packed):  # type: ignore[no-untyped-def]
    return rows.new_empty(rows.shape[0], packed.shape[0])
