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

import os

import torch
import triton
import triton.language as tl

from kivi_vllm.kernels.common import format_constants
from kivi_vllm.page_format import PageFormat


@triton.jit
def _chunk_codes(tile, codes_ptr, t, w, C0: tl.constexpr, P: tl.constexpr,
                 BITS: tl.constexpr, SHARED: tl.constexpr):
    """Codes of channels [C0, C0 + W) as float16 [G, W] (from the page's packed rows)."""
    if SHARED:  # W == P: the chunk is a whole bit plane of the already loaded tile
        b = tile
    else:
        b = tl.load(codes_ptr + t[:, None] * P + (C0 % P) + w[None, :]).to(tl.int32)
    return ((b >> ((C0 // P) * BITS)) & ((1 << BITS) - 1)).to(tl.float16)


@triton.jit
def _chunk_scores(q_c, codes, ks_ptr, km_ptr, w, C0: tl.constexpr):
    """Partial scores (q*s) . codes^T and bias q . min over one channel chunk."""
    ks = tl.load(ks_ptr + C0 + w).to(tl.float32)
    km = tl.load(km_ptr + C0 + w).to(tl.float32)
    s = tl.dot((q_c * ks[None, :]).to(tl.float16), tl.trans(codes))
    return s, tl.sum(q_c * km[None, :], axis=1)


@triton.jit
def _chunk_values(pr, codes, vs_ptr, vm_ptr, t, C0: tl.constexpr, G: tl.constexpr,
                  VG: tl.constexpr, valid=True):
    """p . v over one channel chunk, the per-token value scale folded into p."""
    vs = tl.load(vs_ptr + t * VG + C0 // G, mask=valid, other=0.0).to(tl.float32)
    vm = tl.load(vm_ptr + t * VG + C0 // G, mask=valid, other=0.0).to(tl.float32)
    o = tl.dot((pr * vs[None, :]).to(tl.float16), codes)
    return o + tl.sum(pr * vm[None, :], axis=1)[:, None]


@triton.jit
def _load_chunk(ptr, rows, ok, C0: tl.constexpr, w):
    return tl.load(ptr + rows + C0 + w[None, :], mask=ok, other=0.0)


@triton.jit
def _attend_page(page, kt, vt, valid, q0, q1, q2, q3, m_i, l_i, acc0, acc1, acc2, acc3,
                 kvh, t, w, W: tl.constexpr, NCH: tl.constexpr, SHARED: tl.constexpr,
                 OFF_KC: tl.constexpr, OFF_VC: tl.constexpr, OFF_KS: tl.constexpr,
                 OFF_KM: tl.constexpr, OFF_VS: tl.constexpr, OFF_VM: tl.constexpr,
                 G: tl.constexpr, D: tl.constexpr, P: tl.constexpr, VG: tl.constexpr,
                 BITS: tl.constexpr):
    """Online-softmax update of the running (m, l, acc) with one page of one KV head."""
    kc_ptr = page + OFF_KC + kvh * G * P
    vc_ptr = page + OFF_VC + kvh * G * P
    ks = (page + OFF_KS).to(tl.pointer_type(tl.float16)) + kvh * D
    km = (page + OFF_KM).to(tl.pointer_type(tl.float16)) + kvh * D
    vs = (page + OFF_VS).to(tl.pointer_type(tl.float16)) + kvh * G * VG
    vm = (page + OFF_VM).to(tl.pointer_type(tl.float16)) + kvh * G * VG
    s, b = _chunk_scores(q0, _chunk_codes(kt, kc_ptr, t, w, 0 * W, P, BITS, SHARED),
                         ks, km, w, 0 * W)
    s1, b1 = _chunk_scores(q1, _chunk_codes(kt, kc_ptr, t, w, 1 * W, P, BITS, SHARED),
                           ks, km, w, 1 * W)
    s += s1
    b += b1
    if NCH == 4:
        s2, b2 = _chunk_scores(q2, _chunk_codes(kt, kc_ptr, t, w, 2 * W, P, BITS, SHARED),
                               ks, km, w, 2 * W)
        s3, b3 = _chunk_scores(q3, _chunk_codes(kt, kc_ptr, t, w, 3 * W, P, BITS, SHARED),
                               ks, km, w, 3 * W)
        s += s2 + s3
        b += b2 + b3
    s = tl.where(valid, s + b[:, None], float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    pr = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(pr, axis=1)
    acc0 = acc0 * alpha[:, None] + _chunk_values(
        pr, _chunk_codes(vt, vc_ptr, t, w, 0 * W, P, BITS, SHARED), vs, vm, t, 0 * W, G, VG, valid)
    acc1 = acc1 * alpha[:, None] + _chunk_values(
        pr, _chunk_codes(vt, vc_ptr, t, w, 1 * W, P, BITS, SHARED), vs, vm, t, 1 * W, G, VG, valid)
    if NCH == 4:
        acc2 = acc2 * alpha[:, None] + _chunk_values(
            pr, _chunk_codes(vt, vc_ptr, t, w, 2 * W, P, BITS, SHARED), vs, vm, t, 2 * W, G, VG,
            valid)
        acc3 = acc3 * alpha[:, None] + _chunk_values(
            pr, _chunk_codes(vt, vc_ptr, t, w, 3 * W, P, BITS, SHARED), vs, vm, t, 3 * W, G, VG,
            valid)
    return m_new, l_i, acc0, acc1, acc2, acc3


@triton.jit(do_not_specialize=["tok_base", "S"])
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
    mid_o,  # fp32 [rows, HQ, S, D]
    mid_lse,  # fp32 [rows, HQ, S] (log2 domain)
    sm_scale,
    tok_base,  # first token of this launch: mid_o/mid_lse row = token - tok_base
    S,  # context splits (runtime: one compiled kernel serves every batch size)
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
    QPK: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    DECODE: tl.constexpr,
    W: tl.constexpr,  # channels per chunk: min(P, G), one value group and one bit plane
    NCH: tl.constexpr,  # chunks per head (2 or 4)
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
    SHARED: tl.constexpr = W == P
    m = tl.arange(0, BLOCK_M)
    tok = tok0 + m // BLOCK_H
    hh = m % BLOCK_H
    head = kvh * QPK + hh
    row_ok = (hh < QPK) & (tok < q_end)
    w = tl.arange(0, W)
    t = tl.arange(0, G)
    q_rows = query + tok[:, None] * stride_qt + head[:, None] * stride_qh
    qk_scale = sm_scale * 1.4426950408889634
    q0 = _load_chunk(q_rows, 0, row_ok[:, None], 0 * W, w).to(tl.float32) * qk_scale
    q1 = _load_chunk(q_rows, 0, row_ok[:, None], 1 * W, w).to(tl.float32) * qk_scale
    q2 = q0
    q3 = q1
    if NCH == 4:
        q2 = _load_chunk(q_rows, 0, row_ok[:, None], 2 * W, w).to(tl.float32) * qk_scale
        q3 = _load_chunk(q_rows, 0, row_ok[:, None], 3 * W, w).to(tl.float32) * qk_scale

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc0 = tl.zeros([BLOCK_M, W], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, W], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, W], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_M, W], dtype=tl.float32)

    tile_off = kvh * G * P + t[:, None] * P + tl.arange(0, P)[None, :]
    bt_row = block_table + req.to(tl.int64) * stride_bt
    for p in range(p_lo, p_hi, 2):
        # two pages per iteration: both pages' code tiles are requested before any math
        has_b = p + 1 < p_hi
        page_a = cache + tl.load(bt_row + p).to(tl.int64) * PAGE_BYTES
        page_b = cache + tl.load(bt_row + p + 1, mask=has_b, other=0).to(tl.int64) * PAGE_BYTES
        kt_a = 0
        vt_a = 0
        kt_b = 0
        vt_b = 0
        if SHARED:
            kt_a = tl.load(page_a + OFF_KC + tile_off).to(tl.int32)
            vt_a = tl.load(page_a + OFF_VC + tile_off).to(tl.int32)
            kt_b = tl.load(page_b + OFF_KC + tile_off).to(tl.int32)
            vt_b = tl.load(page_b + OFF_VC + tile_off).to(tl.int32)
        m_i, l_i, acc0, acc1, acc2, acc3 = _attend_page(
            page_a, kt_a, vt_a, True, q0, q1, q2, q3, m_i, l_i, acc0, acc1, acc2, acc3,
            kvh, t, w, W, NCH, SHARED, OFF_KC, OFF_VC, OFF_KS, OFF_KM, OFF_VS, OFF_VM,
            G, D, P, VG, BITS)
        m_i, l_i, acc0, acc1, acc2, acc3 = _attend_page(
            page_b, kt_b, vt_b, has_b, q0, q1, q2, q3, m_i, l_i, acc0, acc1, acc2, acc3,
            kvh, t, w, W, NCH, SHARED, OFF_KC, OFF_VC, OFF_KS, OFF_KM, OFF_VS, OFF_VM,
            G, D, P, VG, BITS)

    if split == S - 1:
        # full-precision tail ring: positions [tstart, ctx)
        r = tl.arange(0, BLOCK_R)
        pos = tstart + r
        r_ok = (pos < ctx)[:, None]
        tslot = tl.load(tail_slots + req)
        ring = tail + tslot * stride_tail_slot + kvh * stride_tail_h
        rows = (pos % R)[:, None] * stride_tail_pos
        ring_v = ring + stride_tail_kv
        s = tl.dot(q0.to(tl.float16), tl.trans(_load_chunk(ring, rows, r_ok, 0 * W, w).to(
            tl.float16)))
        s += tl.dot(q1.to(tl.float16), tl.trans(_load_chunk(ring, rows, r_ok, 1 * W, w).to(
            tl.float16)))
        if NCH == 4:
            s += tl.dot(q2.to(tl.float16), tl.trans(_load_chunk(ring, rows, r_ok, 2 * W, w).to(
                tl.float16)))
            s += tl.dot(q3.to(tl.float16), tl.trans(_load_chunk(ring, rows, r_ok, 3 * W, w).to(
                tl.float16)))
        s = tl.where(tl.trans(r_ok), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        if DECODE:
            # the step's own token (query_len == 1), full precision
            self_k = key + tok0 * stride_kt + kvh * stride_kh
            s_self = tl.sum(q0 * tl.load(self_k + 0 * W + w).to(tl.float32)[None, :], axis=1)
            s_self += tl.sum(q1 * tl.load(self_k + 1 * W + w).to(tl.float32)[None, :], axis=1)
            if NCH == 4:
                s_self += tl.sum(q2 * tl.load(self_k + 2 * W + w).to(tl.float32)[None, :], 1)
                s_self += tl.sum(q3 * tl.load(self_k + 3 * W + w).to(tl.float32)[None, :], 1)
            m_new = tl.maximum(m_new, s_self)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        pr = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(pr, axis=1)
        pr16 = pr.to(tl.float16)
        acc0 = acc0 * alpha[:, None] + tl.dot(pr16, _load_chunk(ring_v, rows, r_ok, 0 * W, w).to(
            tl.float16))
        acc1 = acc1 * alpha[:, None] + tl.dot(pr16, _load_chunk(ring_v, rows, r_ok, 1 * W, w).to(
            tl.float16))
        if NCH == 4:
            acc2 = acc2 * alpha[:, None] + tl.dot(
                pr16, _load_chunk(ring_v, rows, r_ok, 2 * W, w).to(tl.float16))
            acc3 = acc3 * alpha[:, None] + tl.dot(
                pr16, _load_chunk(ring_v, rows, r_ok, 3 * W, w).to(tl.float16))
        if DECODE:
            p_self = tl.exp2(s_self - m_safe)
            l_i += p_self
            self_v = value + tok0 * stride_vt + kvh * stride_vh
            acc0 += p_self[:, None] * tl.load(self_v + 0 * W + w).to(tl.float32)[None, :]
            acc1 += p_self[:, None] * tl.load(self_v + 1 * W + w).to(tl.float32)[None, :]
            if NCH == 4:
                acc2 += p_self[:, None] * tl.load(self_v + 2 * W + w).to(tl.float32)[None, :]
                acc3 += p_self[:, None] * tl.load(self_v + 3 * W + w).to(tl.float32)[None, :]
        m_i = m_new

    empty = l_i == 0.0
    inv_l = tl.where(empty, 0.0, 1.0 / l_i)
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    mid_tok = tok - tok_base
    out = mid_o + mid_tok[:, None] * stride_ot + head[:, None] * stride_oh + split * stride_os
    ok = row_ok[:, None]
    tl.store(out + 0 * W + w[None, :], acc0 * inv_l[:, None], mask=ok)
    tl.store(out + 1 * W + w[None, :], acc1 * inv_l[:, None], mask=ok)
    if NCH == 4:
        tl.store(out + 2 * W + w[None, :], acc2 * inv_l[:, None], mask=ok)
        tl.store(out + 3 * W + w[None, :], acc3 * inv_l[:, None], mask=ok)
    tl.store(mid_lse + mid_tok * stride_lt + head * stride_lh + split, lse, mask=row_ok)


@triton.jit(do_not_specialize=["S"])
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
    S,
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
        ln2 = 0.6931471805599453
        lse_all = tl.where(total == 0.0, float("-inf"), (mx_safe + tl.log2(total)) * ln2)
        tl.store(lse_out + head * stride_zh + tok, lse_all)


# Launch settings (measured on an H100, see docs/kernel-notes.md); env vars override.
MAX_SPLITS = 32
SPLIT_TARGET = int(os.environ.get("KIVI_SPLIT_TARGET", 132 * 12))  # programs in flight
DECODE_WARPS = int(os.environ.get("KIVI_DECODE_WARPS", 2))
NUM_STAGES = int(os.environ.get("KIVI_NUM_STAGES", 2))


def num_splits_for(num_rows: int, num_kv_heads: int, max_splits: int = MAX_SPLITS) -> int:
    """Context splits per (row, KV head): enough programs in flight to fill the GPU."""
    return max(1, min(max_splits, -(-SPLIT_TARGET // max(1, num_rows * num_kv_heads))))


def chunking(fmt: PageFormat) -> tuple[int, int]:
    """(W, NCH): channels per chunk (one bit plane, one value group) and chunks per head."""
    width = min(fmt.packed_dim, fmt.group_size)
    return width, fmt.head_dim // width


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
):
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
    width, nch = chunking(fmt)
    assert nch in (2, 4), f"unsupported (head_dim, group, bits) for the GPU kernels: {fmt}"
    handle = _kivi_attend_context[(num_tiles, hk, s)](
        query, key, value, cache, tail, block_table, seq_lens, query_start_loc,
        tail_slots, valid_from, tile_req, tile_tok, mid_o, mid_lse, scale, tok_base, s,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1),
        value.stride(0), value.stride(1), block_table.stride(0),
        tail.stride(0), tail.stride(1), tail.stride(2), tail.stride(3),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
        mid_lse.stride(0), mid_lse.stride(1),
        R=residual, BLOCK_R=triton.next_power_of_2(residual), QPK=qpk,
        BLOCK_H=block_h, BLOCK_Q=block_q, DECODE=decode, W=width, NCH=nch,
        num_warps=DECODE_WARPS if decode else 4, num_stages=NUM_STAGES, **format_constants(fmt),
    )
    lse_arg = lse_out if lse_out is not None else mid_lse
    _kivi_reduce_splits[(num_tokens, hq)](
        mid_o, mid_lse, out, lse_arg,
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
        mid_lse.stride(0), mid_lse.stride(1), out.stride(0), out.stride(1),
        lse_arg.stride(0), s,
        BLOCK_S=MAX_SPLITS, D=d, WRITE_LSE=lse_out is not None,
        num_warps=4,
    )
    return handle
