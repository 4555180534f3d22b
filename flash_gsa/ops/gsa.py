"""`flash_gsa.gsa`: the one public entry point of the operator. Validates, then hands off to a backend."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .custom_op import gsa_chunk_op, gsa_triton_op, triton_size_error
from .reference import State, gsa_reference

BACKENDS = ("reference", "chunk", "triton")


def _triton_backend() -> Callable | None:
    """The triton backend (through its custom op), or None when the triton package cannot be imported."""
    try:
        from . import triton  # noqa: F401  (imports the triton package and compiles nothing yet)
    except ImportError:
        return None
    return gsa_triton_op


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on `device`."""
    names = ["reference", "chunk"]
    if _triton_backend() is not None and torch.device(device).type == "cuda":
        names.append("triton")
    return names


def default_backend(device: torch.device | str) -> str:
    """The fastest backend for `device`: triton on CUDA when Triton is installed, chunk otherwise."""
    return "triton" if "triton" in available_backends(device) else "chunk"


def _check_tensor(name: str, x, rank: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != rank:
        raise ValueError(f"{name} must have {rank} dimensions, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")


def check_cu_seqlens(cu_seqlens, batch: int, total: int, device: torch.device) -> None:
    """Raises ValueError unless `cu_seqlens` is a valid `[N + 1]` offset vector of one packed row of `total` tokens."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError("cu_seqlens must be an int32 or int64 tensor")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device}, but q is on {device}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must have shape [N + 1] with N >= 1, got {tuple(cu_seqlens.shape)}")
    if batch != 1:
        raise ValueError(f"cu_seqlens needs a packed batch (B == 1), got B = {batch}")
    if torch.compiler.is_compiling():  # reading the values would break the graph (a host sync): checked in eager only
        return
    values = cu_seqlens.tolist()
    if values[0] != 0 or values[-1] != total:
        raise ValueError(f"cu_seqlens must start at 0 and end at T = {total}, got {values[0]} ... {values[-1]}")
    if any(b < a for a, b in zip(values, values[1:], strict=False)):
        raise ValueError("cu_seqlens must be non-decreasing")


def _check_state(initial_state, n: int, h: int, k: int, m: int, v: int, device: torch.device) -> None:
    if not (isinstance(initial_state, (tuple, list)) and len(initial_state) == 2):
        raise ValueError("initial_state must be a tuple (hk, hv)")
    hk, hv = initial_state
    for name, x, shape in (("hk", hk, (n, h, k, m)), ("hv", hv, (n, h, m, v))):
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != shape:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"initial_state {name} must have shape {shape}, got {got}")
        if x.device != device:
            raise ValueError(f"initial_state {name} is on {x.device}, but q is on {device}")


def gsa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    s: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: State | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, State | None]:
    """Gated Slot Attention.

    Args:
        q: queries `[B, T, HQ, K]`; HQ is a multiple of H (query heads of a group share k, v, g, s).
        k: keys `[B, T, H, K]`.
        v: values `[B, T, H, V]`.
        g: log forget gates `[B, T, H, M]`, every entry <= 0 (not checked: that would need a device sync).
        s: slot write weights `[B, T, H, M]`; default `1 - exp(g)`.
        scale: multiplies the slot logits `q @ hk`; default `K ** -0.5`.
        initial_state: `(hk [N, H, K, M], hv [N, H, M, V])`, N = number of sequences; zeros when None.
        output_final_state: also return the state after the last token of each sequence.
        cu_seqlens: `[N + 1]` int offsets of N sequences packed along T (needs B == 1); nothing crosses a boundary.
        backend: "reference", "chunk" or "triton"; None picks the fastest one for q's device (chunk for sizes that
            triton does not take: M not a power of two in 16..256, K or V below 16). The chunk and triton
            backends are custom ops (`flash_gsa.ops.custom_op`): torch.compile captures them without graph breaks.

    Returns:
        `o [B, T, HQ, V]` in q's dtype, and the final state `(hk, hv)` (float32, or float64 for float64 inputs)
        when `output_final_state`, else None.

    Raises ValueError on misuse. Under torch.compile the values of cu_seqlens are not checked (reading them would
    break the graph); its dtype, shape and device are.
    """
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g)):
        _check_tensor(name, x, 4)
    B, T, HQ, K = q.shape
    H = k.shape[2]
    if k.shape[:2] != (B, T) or v.shape[:2] != (B, T) or g.shape[:2] != (B, T):
        raise ValueError(
            f"q, k, v and g must agree on [B, T]: got {tuple(q.shape[:2])}, {tuple(k.shape[:2])}, "
            f"{tuple(v.shape[:2])}, {tuple(g.shape[:2])}"
        )
    if k.shape[3] != K:
        raise ValueError(f"k's head dim {k.shape[3]} differs from q's {K}")
    if v.shape[2] != H or g.shape[2] != H:
        raise ValueError(f"k, v and g must have the same number of heads H: got {H}, {v.shape[2]}, {g.shape[2]}")
    if H == 0 or HQ % H != 0:
        raise ValueError(f"q's heads ({HQ}) must be a multiple of k's heads ({H})")
    if s is not None:
        _check_tensor("s", s, 4)
        if s.shape != g.shape:
            raise ValueError(f"s must have g's shape {tuple(g.shape)}, got {tuple(s.shape)}")
    device = q.device
    for name, x in (("k", k), ("v", v), ("g", g), ("s", s)):
        if x is not None and x.device != device:
            raise ValueError(f"{name} is on {x.device}, but q is on {device}")
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, B, T, device)
    n_seq = B if cu_seqlens is None else cu_seqlens.numel() - 1
    M, V = g.shape[3], v.shape[3]
    if initial_state is not None:
        _check_state(initial_state, n_seq, H, K, M, V, device)
    if scale is None:
        scale = K**-0.5
    elif not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a number, got {type(scale).__name__}")

    if backend is None:
        backend = default_backend(device)
        if backend == "triton" and triton_size_error(K, V, M):
            backend = "chunk"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "triton":
        fn = _triton_backend()
        if fn is None:
            raise ValueError("backend 'triton' needs the triton package (pip install triton)")
    else:
        fn = gsa_reference if backend == "reference" else gsa_chunk_op

    if s is None:
        s = -torch.expm1(g)
    o, final_state = fn(q, k, v, g, s, float(scale), initial_state, output_final_state, cu_seqlens)
    return o.to(q.dtype), final_state
