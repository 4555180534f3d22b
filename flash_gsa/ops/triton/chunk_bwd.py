"""Backward kernels of the chunked GSA.

Gradients, per chunk (same notation as chunk_fwd; dz = gradient of the logits, dzs = scale * dz):
    dp  = (do @ hv^T) * exp(b) + value_decay(do v^T, s)           dz = p * (dp - sum_m p dp)
    dq  = (dzs * exp(b)) @ hk^T + key_decay(dzs, s) @ k
    dk  = key_decay(dzs, s)^T @ q + w @ dhk_out^T                  w = s * exp(b_last - b)
    dv  = key_decay(p, s)^T @ do + w @ dhv_out
    ds  = value_decay_t(q k^T, dzs) + value_decay_t(do v^T, p) + exp(b_last - b) * (k @ dhk_out + v @ dhv_out^T)
    dg  = reverse cumulative sum over the sequence of  p * dp + z * dz - s * ds  (+ the final state's term)
where dh*_out is the gradient of the state leaving the chunk, found by a reverse scan of the per-chunk gradients
    Y = [(dzs * exp(b))^T q | (p * exp(b))^T do]  (gradient of the state entering the chunk from its own outputs).
The forward saved z, lse (so p = exp(z - lse) needs no recomputation of pass 1) and W = key_decay(p).
Buffers written here: p, dzs and pz = p*dp + z*dz [T', HQ, M] fp32; Wd = key_decay(dzs) [NC, HQ, C, C] and
Y [NC, HQ, M, K + V] in the state dtype; the in-chunk reverse cumsum of dg [T', H, M] fp32 and its chunk totals.
"""

import triton
import triton.language as tl

from .intra import dot, fast_path_ok, key_decay, value_decay, value_decay_t


@triton.jit
def bwd_query_kernel(
    q,
    k,
    v,
    s,
    b_buf,
    S,
    do,
    z_buf,
    lse_buf,
    dq,
    p_buf,
    dzs_buf,
    pz_buf,
    Wd_buf,
    Y,
    cu_seqlens,
    chunk_seq,
    chunk_start,
    scale,
    H: tl.constexpr,
    G: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    M: tl.constexpr,
    C: tl.constexpr,
    SUB: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    LOWP: tl.constexpr,
):
    """One program per (chunk, query head). Reads the forward's logits z and lse (p = exp(z - lse)), s, b, the
    states S entering the chunk, v, do, q, k. Writes dq, p, dzs, pz, Wd = key_decay(dzs) and Y."""
    c = tl.program_id(0)
    hq = tl.program_id(1)
    h = hq // G
    HQ: tl.constexpr = H * G
    t0 = tl.load(chunk_start + c)
    n_rows = tl.minimum(tl.load(cu_seqlens + tl.load(chunk_seq + c) + 1) - t0, C)
    rows = tl.arange(0, C)
    cols = tl.arange(0, C)
    live = rows < n_rows
    cm = tl.arange(0, M)
    s_rows = s + t0 * (H * M) + h * M
    b_rows = b_buf + (c * H + h) * C * M
    write = tl.load(s_rows + rows[:, None] * (H * M) + cm[None, :], mask=live[:, None], other=0.0).to(tl.float32)
    b = tl.load(b_rows + rows[:, None] * M + cm[None, :])
    fast = fast_path_ok(b, b_rows, C, M, SUB)
    tok = (t0 + rows)[:, None] * (HQ * M) + hq * M + cm[None, :]
    z = tl.load(z_buf + tok, mask=live[:, None], other=0.0)
    lse = tl.load(lse_buf + (t0 + rows) * HQ + hq, mask=live, other=0.0)
    p = tl.where(live[:, None], tl.exp(z - lse[:, None]), 0.0)
    s_base = S + (c * H + h) * M * (K + V) + cm[:, None] * (K + V)
    y_base = Y + (c * HQ + hq) * M * (K + V) + cm[:, None] * (K + V)

    dp_inter = tl.zeros([C, M], dtype=tl.float32)
    DV = tl.zeros([C, C], dtype=tl.float32)
    for v0 in range(0, V, BV):
        cv = v0 + tl.arange(0, BV)
        vmask = live[:, None] & (cv < V)[None, :]
        dot_ = tl.load(do + (t0 + rows)[:, None] * (HQ * V) + hq * V + cv[None, :], mask=vmask, other=0.0)
        vt = tl.load(v + (t0 + rows)[:, None] * (H * V) + h * V + cv[None, :], mask=vmask, other=0.0)
        hv = tl.load(s_base + K + cv[None, :], mask=(cv < V)[None, :], other=0.0).to(dot_.dtype)
        dp_inter += dot(dot_, tl.trans(hv))
        DV += dot(dot_, tl.trans(vt))
    dp = dp_inter * tl.exp(b) + value_decay(DV, write, b, s_rows, H * M, b_rows, n_rows, fast, C, M, SUB, LOWP)
    dz = p * (dp - tl.sum(p * dp, axis=1)[:, None])
    dzs = scale * dz
    tl.store(p_buf + tok, p, mask=live[:, None])
    tl.store(dzs_buf + tok, dzs, mask=live[:, None])
    tl.store(pz_buf + tok, p * dp + z * dz, mask=live[:, None])

    Wd = key_decay(dzs, write, b, s_rows, H * M, b_rows, n_rows, fast, C, M, SUB, LOWP)
    tl.store(Wd_buf + (c * HQ + hq) * C * C + rows[:, None] * C + cols[None, :], Wd.to(Wd_buf.dtype.element_ty))

    dze = (dzs * tl.exp(b)).to(q.dtype.element_ty)
    Wd = Wd.to(q.dtype.element_ty)
    for k0 in range(0, K, BK):
        ck = k0 + tl.arange(0, BK)
        kmask = live[:, None] & (ck < K)[None, :]
        qt = tl.load(q + (t0 + rows)[:, None] * (HQ * K) + hq * K + ck[None, :], mask=kmask, other=0.0)
        kt = tl.load(k + (t0 + rows)[:, None] * (H * K) + h * K + ck[None, :], mask=kmask, other=0.0)
        hk = tl.load(s_base + ck[None, :], mask=(ck < K)[None, :], other=0.0).to(qt.dtype)
        dqt = dot(dze, hk) + dot(Wd, kt)
        tl.store(dq + (t0 + rows)[:, None] * (HQ * K) + hq * K + ck[None, :], dqt.to(dq.dtype.element_ty), mask=kmask)
        tl.store(y_base + ck[None, :], dot(tl.trans(dze), qt).to(Y.dtype.element_ty), mask=(ck < K)[None, :])
    pe = tl.trans(p * tl.exp(b)).to(do.dtype.element_ty)
    for v0 in range(0, V, BV):
        cv = v0 + tl.arange(0, BV)
        vmask = live[:, None] & (cv < V)[None, :]
        dot_ = tl.load(do + (t0 + rows)[:, None] * (HQ * V) + hq * V + cv[None, :], mask=vmask, other=0.0)
        tl.store(y_base + K + cv[None, :], dot(pe, dot_).to(Y.dtype.element_ty), mask=(cv < V)[None, :])


@triton.jit
def bwd_kv_kernel(
    q,
    s,
    b_buf,
    b_last,
    D,
    do,
    W_buf,
    Wd_buf,
    dk,
    dv,
    cu_seqlens,
    chunk_seq,
    chunk_start,
    H: tl.constexpr,
    G: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    M: tl.constexpr,
    C: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
):
    """One program per (chunk, kv-head, tile of K or of V). Reads s, b, the state gradient D leaving the chunk, and
    for each query head of the group q or do and Wd or W. Writes one tile of dk = Wd^T q + w D_k^T or
    dv = W^T do + w D_v."""
    c = tl.program_id(0)
    h = tl.program_id(1)
    tile = tl.program_id(2)
    HQ: tl.constexpr = H * G
    NKT: tl.constexpr = (K + BK - 1) // BK
    t0 = tl.load(chunk_start + c)
    n_rows = tl.minimum(tl.load(cu_seqlens + tl.load(chunk_seq + c) + 1) - t0, C)
    rows = tl.arange(0, C)
    cols = tl.arange(0, C)
    live = rows < n_rows
    cm = tl.arange(0, M)
    write = tl.load(s + (t0 + rows)[:, None] * (H * M) + h * M + cm[None, :], mask=live[:, None], other=0.0)
    b = tl.load(b_buf + ((c * H + h) * C + rows[:, None]) * M + cm[None, :])
    last = tl.load(b_last + (c * H + h) * M + cm)
    w = (write.to(tl.float32) * tl.exp(last[None, :] - b)).to(q.dtype.element_ty)
    d_base = D + (c * H + h) * M * (K + V) + cm[:, None] * (K + V)
    if tile < NKT:
        ck = tile * BK + tl.arange(0, BK)
        kmask = live[:, None] & (ck < K)[None, :]
        acc_k = dot(w, tl.load(d_base + ck[None, :], mask=(ck < K)[None, :], other=0.0).to(w.dtype))
        for j in range(G):
            hq = h * G + j
            Wd = tl.load(Wd_buf + (c * HQ + hq) * C * C + rows[:, None] * C + cols[None, :]).to(w.dtype)
            qt = tl.load(q + (t0 + rows)[:, None] * (HQ * K) + hq * K + ck[None, :], mask=kmask, other=0.0)
            acc_k += dot(tl.trans(Wd), qt)
        tl.store(dk + (t0 + rows)[:, None] * (H * K) + h * K + ck[None, :], acc_k.to(dk.dtype.element_ty), mask=kmask)
    else:  # names differ from the K branch: Triton merges same-named values of both branches by type
        cv = (tile - NKT) * BV + tl.arange(0, BV)
        vmask = live[:, None] & (cv < V)[None, :]
        acc_v = dot(w, tl.load(d_base + K + cv[None, :], mask=(cv < V)[None, :], other=0.0).to(w.dtype))
        for j in range(G):
            hq = h * G + j
            W = tl.load(W_buf + (c * HQ + hq) * C * C + rows[:, None] * C + cols[None, :]).to(w.dtype)
            dot_ = tl.load(do + (t0 + rows)[:, None] * (HQ * V) + hq * V + cv[None, :], mask=vmask, other=0.0)
            acc_v += dot(tl.trans(W), dot_)
        tl.store(dv + (t0 + rows)[:, None] * (H * V) + h * V + cv[None, :], acc_v.to(dv.dtype.element_ty), mask=vmask)


@triton.jit
def bwd_gate_kernel(
    q,
    k,
    v,
    s,
    b_buf,
    b_last,
    D,
    do,
    p_buf,
    dzs_buf,
    pz_buf,
    ds,
    dg_local,
    dg_total,
    cu_seqlens,
    chunk_seq,
    chunk_start,
    H: tl.constexpr,
    G: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    M: tl.constexpr,
    C: tl.constexpr,
    SUB: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    LOWP: tl.constexpr,
):
    """One program per (chunk, kv-head). Reads q, k, v, do, s, b, D and the p/dzs/pz buffers of the group's query
    heads. Writes ds, the in-chunk reverse cumulative sum of db = sum_heads(p dp + z dz) - s * ds, and its total."""
    c = tl.program_id(0)
    h = tl.program_id(1)
    HQ: tl.constexpr = H * G
    t0 = tl.load(chunk_start + c)
    n_rows = tl.minimum(tl.load(cu_seqlens + tl.load(chunk_seq + c) + 1) - t0, C)
    rows = tl.arange(0, C)
    live = rows < n_rows
    cm = tl.arange(0, M)
    gs_off = (t0 + rows)[:, None] * (H * M) + h * M + cm[None, :]
    write = tl.load(s + gs_off, mask=live[:, None], other=0.0).to(tl.float32)
    b_rows = b_buf + (c * H + h) * C * M
    b = tl.load(b_rows + rows[:, None] * M + cm[None, :])
    fast = fast_path_ok(b, b_rows, C, M, SUB)
    last = tl.load(b_last + (c * H + h) * M + cm)
    d_base = D + (c * H + h) * M * (K + V) + cm[:, None] * (K + V)

    from_state = tl.zeros([C, M], dtype=tl.float32)
    for k0 in range(0, K, BK):
        ck = k0 + tl.arange(0, BK)
        kt = tl.load(k + (t0 + rows)[:, None] * (H * K) + h * K + ck[None, :], mask=live[:, None] & (ck < K)[None, :])
        dk_out = tl.load(d_base + ck[None, :], mask=(ck < K)[None, :], other=0.0).to(kt.dtype)
        from_state += dot(kt, tl.trans(dk_out))
    for v0 in range(0, V, BV):
        cv = v0 + tl.arange(0, BV)
        vt = tl.load(v + (t0 + rows)[:, None] * (H * V) + h * V + cv[None, :], mask=live[:, None] & (cv < V)[None, :])
        dv_out = tl.load(d_base + K + cv[None, :], mask=(cv < V)[None, :], other=0.0).to(vt.dtype)
        from_state += dot(vt, tl.trans(dv_out))
    grad_s = from_state * tl.exp(last[None, :] - b)

    pz = tl.zeros([C, M], dtype=tl.float32)
    for j in range(G):
        hq = h * G + j
        A = tl.zeros([C, C], dtype=tl.float32)
        for k0 in range(0, K, BK):
            ck = k0 + tl.arange(0, BK)
            kmask = live[:, None] & (ck < K)[None, :]
            qt = tl.load(q + (t0 + rows)[:, None] * (HQ * K) + hq * K + ck[None, :], mask=kmask, other=0.0)
            kt = tl.load(k + (t0 + rows)[:, None] * (H * K) + h * K + ck[None, :], mask=kmask, other=0.0)
            A += dot(qt, tl.trans(kt))
        DV = tl.zeros([C, C], dtype=tl.float32)
        for v0 in range(0, V, BV):
            cv = v0 + tl.arange(0, BV)
            vmask = live[:, None] & (cv < V)[None, :]
            dot_ = tl.load(do + (t0 + rows)[:, None] * (HQ * V) + hq * V + cv[None, :], mask=vmask, other=0.0)
            vt = tl.load(v + (t0 + rows)[:, None] * (H * V) + h * V + cv[None, :], mask=vmask, other=0.0)
            DV += dot(dot_, tl.trans(vt))
        head_rows = t0 * (HQ * M) + hq * M
        tok = (t0 + rows)[:, None] * (HQ * M) + hq * M + cm[None, :]
        dzs = tl.load(dzs_buf + tok, mask=live[:, None], other=0.0)
        p = tl.load(p_buf + tok, mask=live[:, None], other=0.0)
        grad_s += value_decay_t(A, dzs, b, dzs_buf + head_rows, HQ * M, b_rows, n_rows, fast, C, M, SUB, LOWP)
        grad_s += value_decay_t(DV, p, b, p_buf + head_rows, HQ * M, b_rows, n_rows, fast, C, M, SUB, LOWP)
        pz += tl.load(pz_buf + tok, mask=live[:, None], other=0.0)

    tl.store(ds + gs_off, grad_s.to(ds.dtype.element_ty), mask=live[:, None])
    db = pz - write * grad_s
    tl.store(dg_local + gs_off, tl.cumsum(db, axis=0, reverse=True), mask=live[:, None])
    tl.store(dg_total + (c * H + h) * M + cm, tl.sum(db, axis=0))
