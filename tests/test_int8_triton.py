"""The CUDA int8 weight-only kernel (`int8_matmul_triton`) against the exact product: under Triton's CPU
interpreter (TRITON_INTERPRET=1, set before the kernel module is imported) and, where there is one, on a GPU."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from chat_core.layers.int8_matmul_triton import int8_weight_matmul  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def case(rows: int, out_features: int, in_features: int, dtype: torch.dtype, seed: int, device: str = "cpu"):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=generator).to(dtype)
    q = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8, generator=generator)
    scale = (torch.rand(out_features, generator=generator) * 0.02).to(dtype)
    exact = (x.double() @ q.double().T) * scale.double()  # what the kernel rounds once, to x's dtype
    return x.to(device), q.to(device), scale.to(device), exact


def assert_rounded_from(y: torch.Tensor, exact: torch.Tensor) -> None:
    """y is the exact product rounded to its dtype, up to float32 sums (a relative 1e-6 of the terms' size)."""
    assert y.shape == exact.shape
    step = torch.finfo(y.dtype).eps  # one unit in the last place, relative
    torch.testing.assert_close(y.double().cpu(), exact, rtol=step, atol=1e-3)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 40),  # both tilings: up to 16 rows (decode) and more
    out_features=st.integers(1, 80),
    in_features=st.integers(1, 300),  # K past one tile, and not a multiple of it
    dtype=st.sampled_from(list(DTYPES)),
    seed=st.integers(0, 2**16),
)
def test_the_int8_kernel_gives_the_exact_product_rounded(rows, out_features, in_features, dtype, seed):
    x, q, scale, exact = case(rows, out_features, in_features, DTYPES[dtype], seed)
    y = int8_weight_matmul(x, q, scale)
    assert y.dtype == x.dtype
    assert_rounded_from(y, exact)


def test_the_int8_kernel_refuses_what_it_does_not_multiply():
    x, q, scale, _ = case(2, 8, 16, torch.bfloat16, 0)
    with pytest.raises(ValueError, match="float32"):
        int8_weight_matmul(x.float(), q, scale)
    with pytest.raises(ValueError, match="do not fit"):
        int8_weight_matmul(x, q[:, :8], scale)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh runs these)")
@pytest.mark.parametrize("rows", [1, 7, 16, 64, 300])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_the_int8_kernel_on_a_gpu_gives_the_exact_product_rounded(rows, dtype):
    """Compiled for the GPU (TRITON_INTERPRET=0): its tensor-core products in x's dtype, at real widths."""
    for out_features, in_features in [(2048, 2048), (8192, 2048), (2048, 8192), (1000, 200)]:
        x, q, scale, exact = case(rows, out_features, in_features, DTYPES[dtype], rows, device="cuda")
        assert_rounded_from(int8_weight_matmul(x, q, scale), exact)
