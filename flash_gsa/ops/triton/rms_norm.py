"""RMSNorm over the last dimension (`flash_gsa.layers.RMSNorm` on CUDA): one pass forward, one backward, fp32 math.

Per row x (D values): rstd = 1 / sqrt(mean(x^2) + eps), y = x * rstd * w. Backward, with xhat = x * rstd and
dyw = dy * w: dx = rstd * (dyw - xhat * mean(dyw * xhat)), dw = sum over rows of dy * xhat.
The output may be of another dtype than x (the model asks for the autocast dtype: its consumers are linear layers,
which would cast it anyway), so a float32 residual stream is read once and a bf16 copy written once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import config
from .function import device_guard, empty
from .launch import launch


@triton.jit
def rms_norm_fwd_kernel(x, w, y, rstd, n_rows, eps, D: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
    """ROWS rows per program. Reads x[rows, :] and w; writes y[rows, :] (y's dtype) and rstd[rows] (fp32)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < n_rows)[:, None] & (cols < D)[None, :]
    offsets = rows.to(tl.int64)[:, None] * D + cols[None, :]
    xv = tl.load(x + offsets, mask=mask, other=0.0).to(tl.float32)
    r = tl.rsqrt(tl.sum(xv * xv, axis=1) / D + eps)
    wv = tl.load(w + cols, mask=cols < D, other=0.0).to(tl.float32)
    tl.store(y + offsets, (xv * r[:, None] * wv[None, :]).to(y.dtype.element_ty), mask=mask)
    tl.store(rstd + rows, r, mask=rows < n_rows)


@triton.jit
def rms_norm_bwd_kernel(x, w, rstd, dy, dx, dw_part, n_rows, D: tl.constexpr, BLOCK_D: tl.constexpr,
                        ROWS: tl.constexpr):
    """Program p takes the row blocks p, p + P, p + 2P, ... (P programs). Reads x, dy, rstd of those rows and w;
    writes dx[rows, :] (dx's dtype) and its share of dw, dw_part[p, :] (fp32; the caller sums the P rows)."""
    p = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)
    wv = tl.load(w + cols, mask=cols < D, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(p * ROWS, n_rows, n_programs * ROWS):
        rows = start + tl.arange(0, ROWS)
        mask = (rows < n_rows)[:, None] & (cols < D)[None, :]
        offsets = rows.to(tl.int64)[:, None] * D + cols[None, :]
        r = tl.load(rstd + rows, mask=rows < n_rows, other=0.0)
        xhat = tl.load(x + offsets, mask=mask, other=0.0).to(tl.float32) * r[:, None]
        dyv = tl.load(dy + offsets, mask=mask, other=0.0).to(tl.float32)
        dyw = dyv * wv[None, :]
        mean = tl.sum(dyw * xhat, axis=1) / D
        tl.store(dx + offsets, (r[:, None] * (dyw - xhat * mean[:, None])).to(dx.dtype.element_ty), mask=mask)
        dw += tl.sum(dyv * xhat, axis=0)
    tl.store(dw_part + p * D + cols, dw, mask=cols < D)


def _shape(D: int) -> tuple[int, int]:
    block_d = config.next_power_of_2(D)
    return block_d, max(1, config.NORM_BLOCK // block_d)


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype):
    """y [N, D] in out_dtype and rstd [N] (fp32) for x [N, D] (contiguous) and weight [D]."""
    N, D = x.shape
    block_d, rows = _shape(D)
    y = empty(N, D, device=x.device, dtype=out_dtype)
    rstd = empty(N, device=x.device, dtype=torch.float32)
    if N:
        with device_guard(x.device):
            launch(rms_norm_fwd_kernel, (config.cdiv(N, rows),), (x, weight, y, rstd, N, eps),
                   dict(D=D, BLOCK_D=block_d, ROWS=rows), config.NORM_NUM_WARPS, config.NORM_NUM_STAGES)
    return y, rstd


def rms_norm_backward(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, dy: torch.Tensor, need_dw: bool):
    """dx [N, D] in x's dtype, and dw [D] in fp32 (None unless need_dw), for dy [N, D] (contiguous)."""
    N, D = x.shape
    block_d, rows = _shape(D)
    programs = max(1, min(config.cdiv(N, rows), config.NORM_BWD_PROGRAMS))
    dx = empty(N, D, device=x.device, dtype=x.dtype)
    dw_part = empty(programs, D, device=x.device, dtype=torch.float32)
    with device_guard(x.device):
        launch(rms_norm_bwd_kernel, (programs,), (x, weight, rstd, dy, dx, dw_part, N),
               dict(D=D, BLOCK_D=block_d, ROWS=rows), config.NORM_NUM_WARPS, config.NORM_NUM_STAGES)
    return dx, dw_part.sum(0) if need_dw else None
