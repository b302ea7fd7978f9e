"""Read path: flash-decoding over KIVI pages + the full-precision tail, split along the context.

``_kivi_attend_context`` handles one tile of query rows (BLOCK_Q tokens of one request x
the QPK query heads sharing one KV head) against one split of the request's context:
each page is read once per KV head and serves all the tile's rows. Keys are never
dequantized: the per-channel scale is folded into the query,
``q . (s*k + m) = (q*s) . k + q . m``; values are dequantized in registers. Codes are
unpacked plane by plane (planar packing, see ``page_format``), so every load is a
contiguous row of bytes. The last split also covers the tail ring and, for decode, the
step's own token. ``_kivi_reduce_splits`` merges the splits by log-sum-exp.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kivi_vllm.kernels.common import format_constants
from kivi_vllm.page_format import PageFormat

LOG2E = 1.4426950408889634


@triton.jit
def _plane_scores(q_j, codes, k_scale_j, BITS: tl.constexpr, J: tl.constexpr):
    """Scores of plane J: (q * s)[:, plane] . codes[:, plane]^T (codes bytes [G, P])."""
    c = ((codes >> (J * BITS)) & ((1 << BITS) - 1)).to(tl.float16)
    qs = (q_j * k_scale_j[None, :]).to(tl.float16)
    return tl.dot(qs, tl.trans(c))


@triton.jit
def _plane_values(codes, vs_ptr, vm_ptr, t, pp, BITS: tl.constexpr, J: tl.constexpr,
                  P: tl.constexpr, G: tl.constexpr, VG: tl.constexpr):
    """Dequantized values of plane J, [G, P] float16."""
    c = ((codes >> (J * BITS)) & ((1 << BITS) - 1)).to(tl.float32)
    grp = (J * P + pp) // G
    idx = t[:, None] * VG + grp[None, :]
    s = tl.load(vs_ptr + idx).to(tl.float32)
    m = tl.load(vm_ptr + idx).to(tl.float32)
    return (c * s + m).to(tl.float16)


@triton.jit
def _kivi_attend_context(
    query,  # [T, HQ, D]
    key,  # [T, HK, D] step tokens (the self token of a decode)
    value,
    cache,  # uint8 [num_blocks, PAGE_BYTES]
    tail,  # [2, slots, R, HK, D]
    block_table,  # [num_reqs, max_blocks] int32
    seq_lens,
    query_start_loc,
    tail_slots,
    valid_from,
    tile_req,  # [num_tiles] int32 (prefill tiles)
    tile_tok,  # [num_tiles] int32
    mid_o,  # fp32 [T, HQ, S, D]
    mid_lse,  # fp32 [T, HQ, S] (log2 domain)
    sm_scale,
    tok_base,  # first token of this launch: mid_o/mid_lse row = token - tok_base
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_bt,
    stride_tail_kv,
    stride_tail_slot,
    stride_tail_pos,
    stride_tail_h,
    stride_ot,
    stride_oh,
    stride_os,
    stride_lt,
    stride_lh,
    R: tl.constexpr,
    BLOCK_R: tl.constexpr,
    S: tl.constexpr,
    QPK: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    DECODE: tl.constexpr,
    PAGE_BYTES: tl.constexpr,
    OFF_KC: tl.constexpr,
    OFF_VC: tl.constexpr,
    OFF_KS: tl.constexpr,
    OFF_KM: tl.constexpr,
    OFF_VS: tl.constexpr,
    OFF_VM: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    P: tl.constexpr,
    VG: tl.constexpr,
    BITS: tl.constexpr,
    CPB: tl.constexpr,
    HK: tl.constexpr,
):
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    if DECODE:
        req = tile
        tok0 = tile
    else:
        req = tl.load(tile_req + tile)
        tok0 = tl.load(tile_tok + tile)
    q_end = tl.load(query_start_loc + req + 1)
    q_len = q_end - tl.load(query_start_loc + req)
    ctx = tl.load(seq_lens + req) - q_len
    vfrom = tl.load(valid_from + req)
    tstart = tl.maximum(tl.maximum(vfrom, (ctx // G) * G - (R - G)), 0)
    n_pages = tstart // G
    per_split = tl.cdiv(n_pages, S)
    p_lo = split * per_split
    p_hi = tl.minimum(p_lo + per_split, n_pages)

    BLOCK_M: tl.constexpr = BLOCK_Q * BLOCK_H
    m = tl.arange(0, BLOCK_M)
    tok = tok0 + m // BLOCK_H
    hh = m % BLOCK_H
    head = kvh * QPK + hh
    row_ok = (hh < QPK) & (tok < q_end)
    pp = tl.arange(0, P)
    t = tl.arange(0, G)
    q_rows = query + tok[:, None] * stride_qt + head[:, None] * stride_qh
    qk_scale = sm_scale * 1.4426950408889634
    q0 = tl.load(q_rows + pp[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32) * qk_scale
    q1 = tl.load(q_rows + P + pp[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    q1 = q1 * qk_scale
    q2 = tl.zeros([BLOCK_M, P], dtype=tl.float32)
    q3 = tl.zeros([BLOCK_M, P], dtype=tl.float32)
    if CPB == 4:
        q2 = tl.load(q_rows + 2 * P + pp[None, :], mask=row_ok[:, None], other=0.0)
        q2 = q2.to(tl.float32) * qk_scale
        q3 = tl.load(q_rows + 3 * P + pp[None, :], mask=row_ok[:, None], other=0.0)
        q3 = q3.to(tl.float32) * qk_scale

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc0 = tl.zeros([BLOCK_M, P], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, P], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, P], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_M, P], dtype=tl.float32)

    code_off = kvh * G * P + t[:, None] * P + pp[None, :]
    bt_row = block_table + req.to(tl.int64) * stride_bt
    for p in range(p_lo, p_hi):
        block = tl.load(bt_row + p).to(tl.int64)
        page = cache + block * PAGE_BYTES
        ks = (page + OFF_KS).to(tl.pointer_type(tl.float16)) + kvh * D
        km = (page + OFF_KM).to(tl.pointer_type(tl.float16)) + kvh * D
        kc = tl.load(page + OFF_KC + code_off).to(tl.int32)  # [G, P]
        vc = tl.load(page + OFF_VC + code_off).to(tl.int32)
        ks0 = tl.load(ks + pp).to(tl.float32)
        ks1 = tl.load(ks + P + pp).to(tl.float32)
        km0 = tl.load(km + pp).to(tl.float32)
        km1 = tl.load(km + P + pp).to(tl.float32)
        s = _plane_scores(q0, kc, ks0, BITS, 0) + _plane_scores(q1, kc, ks1, BITS, 1)
        bias = tl.sum(q0 * km0[None, :], axis=1) + tl.sum(q1 * km1[None, :], axis=1)
        if CPB == 4:
            ks2 = tl.load(ks + 2 * P + pp).to(tl.float32)
            ks3 = tl.load(ks + 3 * P + pp).to(tl.float32)
            km2 = tl.load(km + 2 * P + pp).to(tl.float32)
            km3 = tl.load(km + 3 * P + pp).to(tl.float32)
            s += _plane_scores(q2, kc, ks2, BITS, 2) + _plane_scores(q3, kc, ks3, BITS, 3)
            bias += tl.sum(q2 * km2[None, :], axis=1) + tl.sum(q3 * km3[None, :], axis=1)
        s = s + bias[:, None]
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        pr = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(pr, axis=1)
        m_i = m_new
        pr16 = pr.to(tl.float16)
        vs = (page + OFF_VS).to(tl.pointer_type(tl.float16)) + kvh * G * VG
        vm = (page + OFF_VM).to(tl.pointer_type(tl.float16)) + kvh * G * VG
        acc0 = acc0 * alpha[:, None] + tl.dot(
            pr16, _plane_values(vc, vs, vm, t, pp, BITS, 0, P, G, VG)
        )
        acc1 = acc1 * alpha[:, None] + tl.dot(
            pr16, _plane_values(vc, vs, vm, t, pp, BITS, 1, P, G, VG)
        )
        if CPB == 4:
            acc2 = acc2 * alpha[:, None] + tl.dot(
                pr16, _plane_values(vc, vs, vm, t, pp, BITS, 2, P, G, VG)
            )
            acc3 = acc3 * alpha[:, None] + tl.dot(
                pr16, _plane_values(vc, vs, vm, t, pp, BITS, 3, P, G, VG)
            )

    if split == S - 1:
        # full-precision tail ring: positions [tstart, ctx)
        r = tl.arange(0, BLOCK_R)
        pos = tstart + r
        r_ok = pos < ctx
        tslot = tl.load(tail_slots + req)
        ring = tail + tslot * stride_tail_slot + kvh * stride_tail_h
        ring = ring + (pos % R)[:, None] * stride_tail_pos
        ring_v = ring + stride_tail_kv
        rk0 = tl.load(ring + pp[None, :], mask=r_ok[:, None], other=0.0).to(tl.float16)
        rk1 = tl.load(ring + P + pp[None, :], mask=r_ok[:, None], other=0.0).to(tl.float16)
        s = tl.dot(q0.to(tl.float16), tl.trans(rk0)) + tl.dot(q1.to(tl.float16), tl.trans(rk1))
        if CPB == 4:
            rk2 = tl.load(ring + 2 * P + pp[None, :], mask=r_ok[:, None], other=0.0)
            rk3 = tl.load(ring + 3 * P + pp[None, :], mask=r_ok[:, None], other=0.0)
            s += tl.dot(q2.to(tl.float16), tl.trans(rk2.to(tl.float16)))
            s += tl.dot(q3.to(tl.float16), tl.trans(rk3.to(tl.float16)))
        s = tl.where(r_ok[None, :], s, float("-inf"))
        if DECODE:
            # the step's own token (query_len == 1), full precision
            self_k = key + tok0 * stride_kt + kvh * stride_kh
            sk0 = tl.load(self_k + pp).to(tl.float32)
            sk1 = tl.load(self_k + P + pp).to(tl.float32)
            s_self = tl.sum(q0 * sk0[None, :], axis=1) + tl.sum(q1 * sk1[None, :], axis=1)
            if CPB == 4:
                sk2 = tl.load(self_k + 2 * P + pp).to(tl.float32)
                sk3 = tl.load(self_k + 3 * P + pp).to(tl.float32)
                s_self += tl.sum(q2 * sk2[None, :], axis=1) + tl.sum(q3 * sk3[None, :], axis=1)
            m_new = tl.maximum(tl.maximum(m_i, tl.max(s, axis=1)), s_self)
        else:
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        pr = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(pr, axis=1)
        pr16 = pr.to(tl.float16)
        rv0 = tl.load(ring_v + pp[None, :], mask=r_ok[:, None], other=0.0).to(tl.float16)
        rv1 = tl.load(ring_v + P + pp[None, :], mask=r_ok[:, None], other=0.0).to(tl.float16)
        acc0 = acc0 * alpha[:, None] + tl.dot(pr16, rv0)
        acc1 = acc1 * alpha[:, None] + tl.dot(pr16, rv1)
        if CPB == 4:
            rv2 = tl.load(ring_v + 2 * P + pp[None, :], mask=r_ok[:, None], other=0.0)
            rv3 = tl.load(ring_v + 3 * P + pp[None, :], mask=r_ok[:, None], other=0.0)
            acc2 = acc2 * alpha[:, None] + tl.dot(pr16, rv2.to(tl.float16))
            acc3 = acc3 * alpha[:, None] + tl.dot(pr16, rv3.to(tl.float16))
        if DECODE:
            p_self = tl.exp2(s_self - m_safe)
            l_i += p_self
            self_v = value + tok0 * stride_vt + kvh * stride_vh
            acc0 += p_self[:, None] * tl.load(self_v + pp).to(tl.float32)[None, :]
            acc1 += p_self[:, None] * tl.load(self_v + P + pp).to(tl.float32)[None, :]
            if CPB == 4:
                acc2 += p_self[:, None] * tl.load(self_v + 2 * P + pp).to(tl.float32)[None, :]
                acc3 += p_self[:, None] * tl.load(self_v + 3 * P + pp).to(tl.float32)[None, :]
        m_i = m_new

    empty = l_i == 0.0
    inv_l = tl.where(empty, 0.0, 1.0 / l_i)
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    mid_tok = tok - tok_base
    out = mid_o + mid_tok[:, None] * stride_ot + head[:, None] * stride_oh + split * stride_os
    tl.store(out + pp[None, :], acc0 * inv_l[:, None], mask=row_ok[:, None])
    tl.store(out + P + pp[None, :], acc1 * inv_l[:, None], mask=row_ok[:, None])
    if CPB == 4:
        tl.store(out + 2 * P + pp[None, :], acc2 * inv_l[:, None], mask=row_ok[:, None])
        tl.store(out + 3 * P + pp[None, :], acc3 * inv_l[:, None], mask=row_ok[:, None])
    tl.store(mid_lse + mid_tok * stride_lt + head * stride_lh + split, lse, mask=row_ok)


@triton.jit
def _kivi_reduce_splits(
    mid_o,  # fp32 [T, HQ, S, D]
    mid_lse,  # fp32 [T, HQ, S] (log2)
    out,  # [T, HQ, D] model dtype
    lse_out,  # fp32 [HQ, T] natural log (vLLM's merge_attn_states layout)
    stride_ot,
    stride_oh,
    stride_os,
    stride_lt,
    stride_lh,
    stride_yt,
    stride_yh,
    stride_zh,
    S: tl.constexpr,
    BLOCK_S: tl.constexpr,
    D: tl.constexpr,
    WRITE_LSE: tl.constexpr,
):
    tok = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, D)
    lse = tl.load(mid_lse + tok * stride_lt + head * stride_lh + s, mask=s < S,
                  other=float("-inf"))
    mx = tl.max(lse, axis=0)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.exp2(lse - mx_safe)
    total = tl.sum(w, axis=0)
    o = tl.load(mid_o + tok * stride_ot + head * stride_oh + s[:, None] * stride_os + d[None, :],
                mask=(s < S)[:, None], other=0.0)
    res = tl.sum(o * w[:, None], axis=0) / tl.where(total == 0.0, 1.0, total)
    y = out + tok * stride_yt + head * stride_yh + d
    tl.store(y, res.to(y.dtype.element_ty))
    if WRITE_LSE:
        lse_all = tl.where(total == 0.0, float("-inf"), (mx_safe + tl.log2(total)) * 0.6931471805599453)
        tl.store(lse_out + head * stride_zh + tok, lse_all)


def num_splits_for(num_rows: int, num_kv_heads: int, max_splits: int = 16) -> int:
    """Context splits per (row, KV head): enough programs to fill the GPU (~2 waves)."""
    target = 264  # ~2 x 132 SMs of an H100
    return max(1, min(max_splits, -(-target // max(1, num_rows * num_kv_heads))))


def attend_context(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cache: torch.Tensor,
    tail: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    tail_slots: torch.Tensor,
    valid_from: torch.Tensor,
    fmt: PageFormat,
    residual: int,
    scale: float,
    out: torch.Tensor,
    *,
    decode: bool,
    num_tiles: int,
    tile_req: torch.Tensor | None = None,
    tile_tok: torch.Tensor | None = None,
    block_q: int = 1,
    num_splits: int | None = None,
    tok_base: int = 0,
    lse_out: torch.Tensor | None = None,
) -> None:
    """Attention of query rows over their context in the pages + tail (+ self for decode).

    Covers tokens ``[tok_base, tok_base + out.shape[0])`` of ``query``; writes ``out``
    [rows, HQ, D] and, with ``lse_out`` [HQ, rows], the natural-log LSE (for merging
    with the chunk's own attention). Decode: row i is request i, one token each.
    """
    num_tokens = out.shape[0]
    _, hq, d = query.shape
    hk = fmt.num_kv_heads
    qpk = hq // hk
    s = num_splits or num_splits_for(num_tiles * block_q, hk)
    mid_o = torch.empty((num_tokens, hq, s, d), dtype=torch.float32, device=query.device)
    mid_lse = torch.empty((num_tokens, hq, s), dtype=torch.float32, device=query.device)
    if tile_req is None:
        tile_req = tile_tok = seq_lens  # unused in decode mode
    block_h = max(16 // block_q, triton.next_power_of_2(qpk))
    _kivi_attend_context[(num_tiles, hk, s)](
        query, key, value, cache, tail, block_table, seq_lens, query_start_loc,
        tail_slots, valid_from, tile_req, tile_tok, mid_o, mid_lse, scale, tok_base,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1),
        value.stride(0), value.stride(1), block_table.stride(0),
        tail.stride(0), tail.stride(1), tail.stride(2), tail.stride(3),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
        mid_lse.stride(0), mid_lse.stride(1),
        R=residual, BLOCK_R=triton.next_power_of_2(residual), S=s, QPK=qpk,
        BLOCK_H=block_h, BLOCK_Q=block_q, DECODE=decode,
        num_warps=4, num_stages=2, **format_constants(fmt),
    )
    lse_arg = lse_out if lse_out is not None else mid_lse
    _kivi_reduce_splits[(num_tokens, hq)](
        mid_o, mid_lse, out, lse_arg,
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
        mid_lse.stride(0), mid_lse.stride(1), out.stride(0), out.stride(1),
        lse_arg.stride(0),
        S=s, BLOCK_S=triton.next_power_of_2(s), D=d, WRITE_LSE=lse_out is not None,
        num_warps=4,
    )
