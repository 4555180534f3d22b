"""The interpreter's out-of-bounds check (tests/interpreter_bounds.py) that the kernel tests run under: it must flag
an unmasked access one element past a tensor, and pass the same access masked."""

import pytest
import torch
import triton
import triton.language as tl
from interpreter_bounds import checked_accesses

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the interpreter (CPU); GPUs use memcheck")


@triton.jit
def _shift_kernel(x, y, n, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    """y[i] = x[i + 1] for i < n: the last element reads one past x unless MASKED."""
    i = tl.arange(0, BLOCK)
    if MASKED:
        values = tl.load(x + i + 1, mask=i + 1 < n, other=0.0)
    else:
        values = tl.load(x + i + 1, mask=i < n, other=0.0)
    tl.store(y + i, values, mask=i < n)


@pytest.mark.parametrize("masked", [False, True])
def test_flags_an_access_past_the_tensor(masked):
    x, y = torch.randn(16), torch.empty(16)  # the bounds are each tensor's storage: 16 floats here
    with checked_accesses() as violations:
        _shift_kernel[(1,)](x, y, 16, MASKED=masked, BLOCK=16)
    if masked:
        assert violations == []
    else:
        assert violations == [("_shift_kernel", "load", 1)]
