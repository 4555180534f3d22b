"""The triton backend: launches of the chunked forward (3 kernels) and backward (4 kernels), as an autograd Function.

Forward:  chunk_local (per chunk) -> chunk_scan (across chunks) -> chunk_output (per chunk).
Backward: bwd_query (per chunk) -> chunk_scan, reversed -> bwd_kv and bwd_gate (per chunk); the gate gradient's
          carry across chunks is a reverse cumulative sum over the small [chunks, H, M] totals.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from . import config
from .chunk_bwd import bwd_gate_kernel, bwd_kv_kernel, bwd_query_kernel
from .chunk_fwd import chunk_local_kernel, chunk_output_kernel, chunk_scan_kernel


@dataclass
class ChunkLayout:
    """Where the chunks of the packed sequences lie. No chunk straddles two sequences."""

    cu_seqlens: torch.Tensor  # [N + 1] int32
    chunk_offsets: torch.Tensor  # [N + 1] int32: first chunk of each sequence
    chunk_seq: torch.Tensor  # [NC] int32: the sequence of each chunk
    chunk_start: torch.Tensor  # [NC] int32: the first token of each chunk
    token_chunk: torch.Tensor  # [T'] int64: the chunk of each token
    num_chunks: int


def chunk_layout(cu_seqlens: torch.Tensor, total_tokens: int, num_chunks: int | None, chunk: int) -> ChunkLayout:
    """Tables for `cu_seqlens`. `num_chunks` may be given when it is known on the host (equal-length batches)."""
    cu = cu_seqlens.to(torch.int32)
    lengths = (cu[1:] - cu[:-1]).long()
    per_seq = (lengths + chunk - 1) // chunk
    offsets = torch.zeros_like(cu)
    offsets[1:] = per_seq.cumsum(0)
    if num_chunks is None:
        num_chunks = int(offsets[-1].item())
    seq_ids = torch.arange(len(lengths), device=cu.device)
    chunk_seq = torch.repeat_interleave(seq_ids, per_seq, output_size=num_chunks)
    chunk_start = cu[chunk_seq] + (torch.arange(num_chunks, device=cu.device) - offsets[chunk_seq]) * chunk
    token_seq = torch.repeat_interleave(seq_ids, lengths, output_size=total_tokens)
    token_chunk = offsets[token_seq].long() + (torch.arange(total_tokens, device=cu.device) - cu[token_seq]) // chunk
    return ChunkLayout(cu, offsets, chunk_seq.to(torch.int32), chunk_start.to(torch.int32), token_chunk, num_chunks)


def empty(*shape: int, device, dtype) -> torch.Tensor:
    """Every buffer and output of this backend is allocated here, so that tests can poison them (fill with NaN)."""
    return torch.empty(*shape, device=device, dtype=dtype)


def _scan(X, out, b_last, init, layout: ChunkLayout, H: int, G: int, reverse: bool):
    """Runs chunk_scan_kernel; returns the [N, H, M, K + V] state after the last (first, if reverse) chunk."""
    M, KV = X.shape[-2], X.shape[-1]
    n_seq = layout.cu_seqlens.numel() - 1
    final = empty(n_seq, H, M, KV, device=X.device, dtype=torch.float32)
    BM = min(config.BLOCK_SCAN_M, M)
    grid = (triton.cdiv(KV, config.BLOCK_SCAN), M // BM, n_seq * H)
    chunk_scan_kernel[grid](
        X,
        out,
        b_last,
        init if init is not None else final,
        final,
        layout.chunk_offsets,
        H=H,
        G=G,
        M=M,
        KV=KV,
        BM=BM,
        BN=config.BLOCK_SCAN,
        REVERSE=reverse,
        HAS_INIT=init is not None,
        num_warps=config.NUM_WARPS["scan"],
    )
    return final


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Per-chunk states and pairwise weights are kept in bf16 for 16-bit inputs (their matrix products take 16-bit
    operands anyway; every sum over chunks is carried in fp32 registers), in fp32 otherwise."""
    return torch.bfloat16 if dtype in (torch.bfloat16, torch.float16) else torch.float32


def _blocks(K: int, V: int) -> tuple[int, int]:
    return min(config.BLOCK_K, triton.next_power_of_2(K)), min(config.BLOCK_V, triton.next_power_of_2(V))


def chunk_forward(q, k, v, g, s, scale: float, init, layout: ChunkLayout):
    """q [T', HQ, K] ... (contiguous). init: [N, H, M, K + V] fp32 or None. Returns o, final state, saved buffers."""
    T, HQ, K = q.shape
    H, V, M = k.shape[1], v.shape[-1], g.shape[-1]
    G, C, NC = HQ // H, config.CHUNK, layout.num_chunks
    BK, BV = _blocks(K, V)
    f32 = dict(device=q.device, dtype=torch.float32)
    b = empty(NC, H, C, M, **f32)
    b_last = empty(NC, H, M, **f32)
    states = empty(NC, H, M, K + V, device=q.device, dtype=state_dtype(q.dtype))
    tables = (layout.cu_seqlens, layout.chunk_seq, layout.chunk_start)

    chunk_local_kernel[(NC, H)](
        k,
        v,
        g,
        s,
        b,
        b_last,
        states,
        *tables,
        H=H,
        K=K,
        V=V,
        M=M,
        C=C,
        BK=BK,
        BV=BV,
        num_warps=config.NUM_WARPS["local"],
        num_stages=config.NUM_STAGES["local"],
    )
    final = _scan(states, states, b_last, init, layout, H, 1, reverse=False)
    o = empty(T, HQ, V, device=q.device, dtype=q.dtype)
    chunk_output_kernel[(NC, HQ)](
        q,
        k,
        v,
        s,
        b,
        states,
        o,
        *tables,
        scale,
        H=H,
        G=G,
        K=K,
        V=V,
        M=M,
        C=C,
        SUB=config.SUB,
        BK=BK,
        BV=BV,
        LOWP=config.LOWP_FORWARD and q.dtype != torch.float32,
        num_warps=config.NUM_WARPS["output"],
        num_stages=config.NUM_STAGES["output"],
    )
    return o, final, (b, b_last, states)


def chunk_backward(q, k, v, s, do, d_final, final, saved, scale: float, layout: ChunkLayout):
    """Gradients of q, k, v, s, g and of the initial state. d_final: gradient of the final state, or None."""
    b, b_last, states = saved
    T, HQ, K = q.shape
    H, V, M = k.shape[1], v.shape[-1], s.shape[-1]
    G, C, NC = HQ // H, config.CHUNK, layout.num_chunks
    BK, BV = _blocks(K, V)
    f32 = dict(device=q.device, dtype=torch.float32)
    tables = (layout.cu_seqlens, layout.chunk_seq, layout.chunk_start)

    dq = empty(*q.shape, device=q.device, dtype=q.dtype)
    p_buf, dzs_buf, pz_buf = (empty(T, HQ, M, **f32) for _ in range(3))
    W_buf, Wd_buf = (empty(NC, HQ, C, C, device=q.device, dtype=state_dtype(q.dtype)) for _ in range(2))
    Y = empty(NC, HQ, M, K + V, device=q.device, dtype=state_dtype(q.dtype))
    bwd_query_kernel[(NC, HQ)](
        q,
        k,
        v,
        s,
        b,
        states,
        do,
        dq,
        p_buf,
        dzs_buf,
        pz_buf,
        W_buf,
        Wd_buf,
        Y,
        *tables,
        scale,
        H=H,
        G=G,
        K=K,
        V=V,
        M=M,
        C=C,
        SUB=config.SUB,
        BK=BK,
        BV=BV,
        LOWP=config.LOWP_BACKWARD and q.dtype != torch.float32,
        num_warps=config.NUM_WARPS["bwd_query"],
        num_stages=config.NUM_STAGES["bwd_query"],
    )
    D = Y if G == 1 else empty(NC, H, M, K + V, device=q.device, dtype=Y.dtype)
    d_init = _scan(Y, D, b_last, d_final, layout, H, G, reverse=True)

    dk, dv, ds = (empty(*x.shape, device=x.device, dtype=x.dtype) for x in (k, v, s))
    n_tiles = triton.cdiv(K, BK) + triton.cdiv(V, BV)
    bwd_kv_kernel[(NC, H, n_tiles)](
        q,
        s,
        b,
        b_last,
        D,
        do,
        W_buf,
        Wd_buf,
        dk,
        dv,
        *tables,
        H=H,
        G=G,
        K=K,
        V=V,
        M=M,
        C=C,
        BK=BK,
        BV=BV,
        num_warps=config.NUM_WARPS["bwd_kv"],
        num_stages=config.NUM_STAGES["bwd_kv"],
    )
    dg_local = empty(T, H, M, **f32)
    dg_total = empty(NC, H, M, **f32)
    bwd_gate_kernel[(NC, H)](
        q,
        k,
        v,
        s,
        b,
        b_last,
        D,
        do,
        p_buf,
        dzs_buf,
        pz_buf,
        ds,
        dg_local,
        dg_total,
        *tables,
        H=H,
        G=G,
        K=K,
        V=V,
        M=M,
        C=C,
        SUB=config.SUB,
        BK=BK,
        BV=BV,
        LOWP=config.LOWP_BACKWARD and q.dtype != torch.float32,
        num_warps=config.NUM_WARPS["bwd_gate"],
        num_stages=config.NUM_STAGES["bwd_gate"],
    )
    # dg_t = sum over later tokens of the same sequence; add what later chunks and the final state contribute.
    later = dg_total.double().flip(0).cumsum(0).flip(0)  # sum over chunks c' >= c, all sequences
    later = torch.cat([later, later.new_zeros(1, H, M)])
    next_first = layout.chunk_offsets[1:].long()[layout.chunk_seq.long()]
    carry = later[:NC] - dg_total.double() - later[next_first]
    if d_final is not None:
        carry = carry + (final * d_final).sum(-1).double()[layout.chunk_seq.long()]
    dg = dg_local + carry.float()[layout.token_chunk]
    return dq, dk, dv, ds, dg, d_init


def pack_state(hk: torch.Tensor, hv: torch.Tensor) -> torch.Tensor:
    """(hk [N, H, K, M], hv [N, H, M, V]) -> [N, H, M, K + V] fp32."""
    return torch.cat([hk.transpose(-1, -2), hv], dim=-1).float().contiguous()


def unpack_state(state: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    return state[..., :K].transpose(-1, -2), state[..., K:]


class ChunkGSA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, s, hk0, hv0, scale, layout, output_final_state):
        B, T, HQ, K = q.shape
        flat = [x.reshape(B * T, *x.shape[2:]).contiguous() for x in (q, k, v, g, s)]
        init = pack_state(hk0, hv0) if hk0 is not None else None
        o, final, saved = chunk_forward(*flat, scale, init, layout)
        q_, k_, v_, _, s_ = flat
        ctx.save_for_backward(q_, k_, v_, s_, final, *saved)
        ctx.scale, ctx.layout, ctx.shape, ctx.has_init = scale, layout, (B, T), hk0 is not None
        ctx.g_dtype = g.dtype
        hk, hv = unpack_state(final, K) if output_final_state else (None, None)
        return o.view(B, T, HQ, -1), hk, hv

    @staticmethod
    def backward(ctx, do, dhk, dhv):
        q, k, v, s, final, *saved = ctx.saved_tensors
        B, T = ctx.shape
        K = q.shape[-1]
        d_final = None
        if dhk is not None or dhv is not None:
            dhk = torch.zeros_like(final[..., :K].transpose(-1, -2)) if dhk is None else dhk
            dhv = torch.zeros_like(final[..., K:]) if dhv is None else dhv
            d_final = pack_state(dhk, dhv)
        do = do.reshape(B * T, *do.shape[2:]).contiguous()
        dq, dk, dv, ds, dg, d_init = chunk_backward(q, k, v, s, do, d_final, final, saved, ctx.scale, ctx.layout)
        dhk0, dhv0 = unpack_state(d_init, K) if ctx.has_init else (None, None)
        grads = [x.view(B, T, *x.shape[1:]) for x in (dq, dk, dv, dg.to(ctx.g_dtype), ds)]
        return (*grads, dhk0, dhv0, None, None, None)


def gsa_triton(q, k, v, g, s, scale, initial_state, output_final_state, cu_seqlens):
    """Arguments are validated by `flash_gsa.gsa`; see its docstring for shapes."""
    B, T = q.shape[:2]
    if g.shape[-1] & (g.shape[-1] - 1) or g.shape[-1] < 16:
        raise ValueError(f"the triton backend needs M (slots) a power of two >= 16, got {g.shape[-1]}")
    if q.shape[-1] < 16 or v.shape[-1] < 16:
        raise ValueError(f"the triton backend needs K and V >= 16, got K={q.shape[-1]}, V={v.shape[-1]}")
    C = config.CHUNK
    if cu_seqlens is None:
        cu = torch.arange(B + 1, device=q.device, dtype=torch.int32) * T
        layout = chunk_layout(cu, B * T, B * triton.cdiv(T, C), C)
    else:
        layout = chunk_layout(cu_seqlens, T, None, C)
    hk0, hv0 = initial_state if initial_state is not None else (None, None)
    o, hk, hv = ChunkGSA.apply(q, k, v, g, s, hk0, hv0, scale, layout, output_final_state)
    return o, ((hk, hv) if output_final_state else None)
