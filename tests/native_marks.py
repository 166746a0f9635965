"""The mark of tests that exercise our native CPU kernels themselves: they need what building them needs (an
x86-64 CPU with AVX-512 and a C compiler); elsewhere the engine runs on torch's kernels, tested by the rest."""

from __future__ import annotations

import pytest

from chat_core.layers import native_kernels

needs_native_kernels = pytest.mark.skipif(
    not native_kernels.available(), reason="the native kernels need an x86-64 CPU with AVX-512 and a C compiler"
)
