"""Read path: flash-decoding over KIVI pages + the full-precision tail, split along the context.

``_kivi_attend_context`` handles one tile of query rows (BLOCK_Q tokens of one request x
the QPK query heads sharing one KV head) against one split of the request's context:
each page is read once per KV head and serves all the tile's rows. Codes are unpacked
straight into the dots' B operands (``code * s + m`` in float16), except the keys of the
decode loop over several pages, whose per-channel scale and min are folded into the
query rows (``q . (s*k + m) = (q*s) . k + q . m``). Codes become float16 through a magic
number (``prmt`` puts a masked byte under a float16 exponent, reading ``2**k + code``
exactly; one ``sub.f16x2`` per two codes removes the ``2**k``), so no int-to-float
conversion runs (those issue at a quarter of the FMA rate on Hopper). A page's value
chunks are joined in registers into one ``[N, D]`` operand: one value dot per page into a
full-width accumulator, so the probabilities load as the A operand once. The running max is
rescaled lazily (only when it grows by more than ``RESCALE_LOG2``). The last split also
covers the tail ring and, for decode, the step's own token; ``_kivi_reduce_splits``
merges the splits by log-sum-exp.

Decode reads SLOTS pages per loop iteration (``_attend_slots``, ``tile_shape``): with 4
query heads per KV head the dot's 16 rows would be 75% padding, so the rows are the same
query heads repeated once per slot and row block j attends to page ``p + j`` (scores
masked block-diagonally), which costs the same tensor-core work as one padded page while
the softmax bookkeeping, barriers and loop overhead are paid once per SLOTS pages. The
row blocks are merged by log-sum-exp at the end.

Attention sinks (``sinks`` tokens, ``kivi.sink_groups``; ``reference.context_kv``): for a
sequence that wrote its start itself (``valid_from == 0``) the first ``min(sinks,
tail_start)`` positions are read from their own ring rows instead of their pages, and the
tail window is computed with the ring's sliding part ``R - sinks``. Both ring segments fit
one tile of ``BLOCK_R`` rows (sink rows first), so the page loop is unchanged.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from kivi_vllm.kernels.common import (
    e4m3_to_f16,
    format_constants,
    plane_asm,
    read_strides,
    require_unit_stride,
    scale_ptr,
)
from kivi_vllm.kernels.decode_gluon import decode_pages, gluon_supports
from kivi_vllm.kernels.store import ring_row
from kivi_vllm.page_format import PageFormat

RESCALE_LOG2 = tl.constexpr(8.0)  # lazy rescale: probabilities may grow to 2**8 meanwhile


@triton.jit
def _plane(x, s, m, PLANE: tl.constexpr, BITS: tl.constexpr, SCALED: tl.constexpr,
           USE_ASM: tl.constexpr):
    """uint8 [R, W] -> bit plane PLANE as float16 codes (``SCALED``: ``code * s + m``)."""
    if USE_ASM:
        if SCALED:
            c = tl.inline_asm_elementwise(plane_asm(BITS, PLANE, True), "=r,=r,r,r,r,r,r",
                                          [x, s, m], dtype=tl.float16, is_pure=True, pack=4)
        else:
            c = tl.inline_asm_elementwise(plane_asm(BITS, PLANE, False), "=r,=r,r", [x],
                                          dtype=tl.float16, is_pure=True, pack=4)
    else:  # the interpreter runs no PTX: the same float16 arithmetic in Triton ops
        mask: tl.constexpr = (1 << BITS) - 1
        c = ((x.to(tl.int32) >> (PLANE * BITS)) & mask).to(tl.float16)
        if SCALED:
            c = tl.fma(c, s, m)
    return c


@triton.jit
def _dequant_planes(x, s0, m0, s1, m1, s2, m2, s3, m3, BITS: tl.constexpr,
                    SCALED: tl.constexpr, USE_ASM: tl.constexpr):
    """uint8 [R, W] -> bit plane k as float16 ``code_k * s_k + m_k`` (``SCALED``; else the
    exact codes, the scales unused); 4-bit: planes 0, 1."""
    c0 = _plane(x, s0, m0, 0, BITS, SCALED, USE_ASM)
    c1 = _plane(x, s1, m1, 1, BITS, SCALED, USE_ASM)
    c2 = c0
    c3 = c1
    if BITS == 2:
        c2 = _plane(x, s2, m2, 2, BITS, SCALED, USE_ASM)
        c3 = _plane(x, s3, m3, 3, BITS, SCALED, USE_ASM)
    return c0, c1, c2, c3


@triton.jit
def _page_chunks(rows, half, s0, m0, s1, m1, s2, m2, s3, m3, W: tl.constexpr,
                 P: tl.constexpr, BITS: tl.constexpr, SCALED: tl.constexpr,
                 USE_ASM: tl.constexpr):
    """One head's codes ([N, W] byte pointers ``rows``; the byte columns W..2W at
    ``rows + half``) -> its channel chunks [N, W] (chunk i = channels iW..iW+W, scaled by
    (s_i, m_i) if ``SCALED``, else exact codes)."""
    if P == W:  # one byte tile holds every plane: plane i is chunk i
        c0, c1, c2, c3 = _dequant_planes(tl.load(rows), s0, m0, s1, m1, s2, m2, s3, m3,
                                         BITS, SCALED, USE_ASM)
    else:  # P == 2W (4-bit): byte half j, plane k is chunk 2k + j
        c0, c2, _, _ = _dequant_planes(tl.load(rows), s0, m0, s2, m2, s0, m0, s0, m0,
                                       BITS, SCALED, USE_ASM)
        c1, c3, _, _ = _dequant_planes(tl.load(rows + half), s1, m1, s3, m3, s1, m1, s1, m1,
                                       BITS, SCALED, USE_ASM)
    return c0, c1, c2, c3


@triton.jit
def _key_params(ptr, w, W: tl.constexpr, NCH: tl.constexpr, FP8: tl.constexpr):
    """Per-channel key scales (or mins) of each chunk as [1, W] float16 rows (unused ones
    repeat); ``FP8``: ``ptr`` holds float8 e4m3 bytes."""
    p0 = _f16(tl.load(ptr + w)[None, :], FP8)
    p1 = _f16(tl.load(ptr + W + w)[None, :], FP8)
    p2 = p0
    p3 = p1
    if NCH == 4:
        p2 = _f16(tl.load(ptr + 2 * W + w)[None, :], FP8)
        p3 = _f16(tl.load(ptr + 3 * W + w)[None, :], FP8)
    return p0, p1, p2, p3


@triton.jit
def _f16(x, FP8: tl.constexpr):
    """Loaded scales or mins as float16 (``FP8``: from float8 e4m3 bytes)."""
    if FP8:
        x = e4m3_to_f16(x)
    return x


@triton.jit
def _value_param(ptr, t, C0: tl.constexpr, W: tl.constexpr, G: tl.constexpr, ok,
                 FP8: tl.constexpr):
    """Per-token value scale (or min) of channels C0..C0+W (stored token-minor: one
    contiguous row of G per channel group): [N, 1] where the chunk lies in one group,
    else [N, W] (W // G groups); 0 where not ``ok``; ``FP8``: float8 e4m3 bytes."""
    p = _f16(tl.load(ptr + (C0 // G) * G + t, mask=ok, other=0)[:, None], FP8)
    if W > G:
        c = tl.arange(0, W)[None, :]
        for j in tl.static_range(1, W // G):
            pj = _f16(tl.load(ptr + (C0 // G + j) * G + t, mask=ok, other=0)[:, None], FP8)
            p = tl.where(c >= j * G, pj, p)
    return p


@triton.jit
def _value_params(ptr, t, W: tl.constexpr, NCH: tl.constexpr, G: tl.constexpr, ok,
                  FP8: tl.constexpr):
    """``_value_param`` of each chunk (unused ones repeat)."""
    p0 = _value_param(ptr, t, 0, W, G, ok, FP8)
    p1 = _value_param(ptr, t, W, W, G, ok, FP8)
    p2 = p0
    p3 = p1
    if NCH == 4:
        p2 = _value_param(ptr, t, 2 * W, W, G, ok, FP8)
        p3 = _value_param(ptr, t, 3 * W, W, G, ok, FP8)
    return p0, p1, p2, p3


@triton.jit
def _row_key_params(ptr, ok, w, W: tl.constexpr, NCH: tl.constexpr, FP8: tl.constexpr):
    """Per-channel key scales (or mins) of each row's page as float32 [M, W] chunks
    (``ptr``: [M] pointers into the rows' pages); 0 where not ``ok``; ``FP8``: ``ptr``
    holds float8 e4m3 bytes."""
    base = ptr[:, None] + w[None, :]
    p0 = _f16(tl.load(base, mask=ok[:, None], other=0), FP8).to(tl.float32)
    p1 = _f16(tl.load(base + W, mask=ok[:, None], other=0), FP8).to(tl.float32)
    p2 = p0
    p3 = p1
    if NCH == 4:
        p2 = _f16(tl.load(base + 2 * W, mask=ok[:, None], other=0), FP8).to(tl.float32)
        p3 = _f16(tl.load(base + 3 * W, mask=ok[:, None], other=0), FP8).to(tl.float32)
    return p0, p1, p2, p3


@triton.jit
def _load_chunk(ptr, rows, ok, C0: tl.constexpr, w):
    return tl.load(ptr + rows + C0 + w[None, :], mask=ok, other=0.0)


@triton.jit
def _self_dot(q_c, k_ptr, C0: tl.constexpr, w):
    """q . k over one chunk for the step's own (full-precision) key, in fp32."""
    return tl.sum(q_c.to(tl.float32) * tl.load(k_ptr + C0 + w).to(tl.float32)[None, :], axis=1)


@triton.jit
def _attend_page(page, q0, q1, q2, q3, m_i, l_i, acc, kvh, t, k_off, v_off, w,
                 tok0, tok_lo, WINDOWED: tl.constexpr, W: tl.constexpr, NCH: tl.constexpr,
                 OFF_KC: tl.constexpr, OFF_VC: tl.constexpr, OFF_KS: tl.constexpr,
                 OFF_KM: tl.constexpr, OFF_VS: tl.constexpr, OFF_VM: tl.constexpr, G: tl.constexpr,
                 D: tl.constexpr, VG: tl.constexpr, KP: tl.constexpr, VP: tl.constexpr,
                 KBITS: tl.constexpr, VBITS: tl.constexpr, USE_ASM: tl.constexpr,
                 FP8S: tl.constexpr):
    """Online-softmax update of the running (m, l, acc) with one page of one KV head.

    Keys and values are dequantized straight into the dot's B operand (float16
    ``code * s + m``), so the query stays a loop-invariant A operand and only the
    probabilities change layout once per page. ``WINDOWED``: the page's tokens
    ``tok0 + t`` below ``tok_lo`` are masked.
    """
    ks = scale_ptr(page + OFF_KS, FP8S) + kvh * D
    km = (page + OFF_KM).to(tl.pointer_type(tl.float16)) + kvh * D
    s0, s1, s2, s3 = _key_params(ks, w, W, NCH, FP8S)
    m0, m1, m2, m3 = _key_params(km, w, W, NCH, False)
    k0, k1, k2, k3 = _page_chunks(page + OFF_KC + k_off, W, s0, m0, s1, m1, s2, m2, s3, m3,
                                  W, KP, KBITS, True, USE_ASM)
    s = tl.dot(q0, tl.trans(k0))
    s = tl.dot(q1, tl.trans(k1), s)
    if NCH == 4:
        s = tl.dot(q2, tl.trans(k2), s)
        s = tl.dot(q3, tl.trans(k3), s)
    if WINDOWED:
        s = tl.where((tok0 + t >= tok_lo)[None, :], s, float("-inf"))
    m_i, l_i, acc, p16 = _online_softmax(s, m_i, l_i, acc)

    vs = scale_ptr(page + OFF_VS, FP8S) + kvh * VG * G
    vm = (page + OFF_VM).to(tl.pointer_type(tl.float16)) + kvh * VG * G
    acc = _accumulate_values(p16, vs, vm, page + OFF_VC + v_off, t, t < G, acc, W, NCH, G, VP,
                             VBITS, USE_ASM, FP8S)  # every token of the page
    return m_i, l_i, acc


@triton.jit
def _accumulate_values(p16, vs, vm, v_ptrs, t, ok, acc, W: tl.constexpr,
                       NCH: tl.constexpr, G: tl.constexpr, VP: tl.constexpr,
                       VBITS: tl.constexpr, USE_ASM: tl.constexpr, FP8S: tl.constexpr):
    """``acc += p . (s*v + m)`` over N tokens: value codes at ``v_ptrs`` [N, W], per-token
    scales and mins at ``vs + t`` / ``vm + t`` (0 where not ``ok``)."""
    s0, s1, s2, s3 = _value_params(vs, t, W, NCH, G, ok, FP8S)
    m0, m1, m2, m3 = _value_params(vm, t, W, NCH, G, ok, False)
    v0, v1, v2, v3 = _page_chunks(v_ptrs, W * G, s0, m0, s1, m1, s2, m2, s3, m3, W, VP,
                                  VBITS, True, USE_ASM)
    return tl.dot(p16, _join_chunks(v0, v1, v2, v3, NCH), acc)


@triton.jit
def _join_chunks(c0, c1, c2, c3, NCH: tl.constexpr):
    """NCH chunks [N, W] -> one [N, NCH * W] tile (chunk i at columns iW..iW+W), in
    registers: one value dot per page loads the probabilities as its A operand once."""
    if NCH == 4:
        x = tl.join(tl.join(c0, c1), tl.join(c2, c3))  # [N, W, 2, 2]: chunk 2j + i at [.., i, j]
        x = tl.reshape(tl.permute(x, (0, 3, 2, 1)), (c0.shape[0], 4 * c0.shape[1]))
    else:
        x = tl.reshape(tl.permute(tl.join(c0, c1), (0, 2, 1)), (c0.shape[0], 2 * c0.shape[1]))
    return x


@triton.jit
def _online_softmax(s, m_i, l_i, acc):
    """Lazy-rescaled online softmax: new (m, l, acc) and the float16 probabilities."""
    m_cur = tl.max(s, axis=1)
    if tl.max(m_cur - m_i, axis=0) > RESCALE_LOG2:  # uniform branch; always on page one
        m_new = tl.maximum(m_i, m_cur)
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha
        acc = acc * alpha[:, None]
        m_i = m_new
    pr = tl.exp2(s - m_i[:, None])
    l_i = l_i + tl.sum(pr, axis=1)
    return m_i, l_i, acc, pr.to(tl.float16)


@triton.jit
def _attend_slots(cache, bt_row, p, p_hi, q0, q1, q2, q3, m_i, l_i, acc,
                  kvh, row_slot, col_slot, t, w, tok_lo, WINDOWED: tl.constexpr,
                  W: tl.constexpr, NCH: tl.constexpr,
                  PAGE_BYTES: tl.constexpr, OFF_KC: tl.constexpr, OFF_VC: tl.constexpr,
                  OFF_KS: tl.constexpr, OFF_KM: tl.constexpr, OFF_VS: tl.constexpr,
                  OFF_VM: tl.constexpr, G: tl.constexpr, D: tl.constexpr, VG: tl.constexpr,
                  KP: tl.constexpr, VP: tl.constexpr, KBITS: tl.constexpr,
                  VBITS: tl.constexpr, USE_ASM: tl.constexpr, FP8S: tl.constexpr):
    """Online-softmax update with pages ``p + j`` (j < SLOTS) at once: row block j (the
    same query rows) attends to page ``p + j`` only, so the scores are block-diagonal and
    one M=16 dot serves SLOTS pages instead of padding the rows.

    The key scale and min differ per page, i.e. per row block: they are folded into the
    query rows, ``q . (s*k + m) = (q*s) . k + q . m``, and the key codes enter the dot as
    exact float16 integers. Values are dequantized into the dot's B operand as in
    ``_attend_page``; a missing page (past ``p_hi``) reads scales and mins as 0.
    ``WINDOWED``: tokens below ``tok_lo`` are masked.
    """
    row_in = p + row_slot < p_hi
    col_in = p + col_slot < p_hi
    row_page = cache + tl.load(bt_row + p + row_slot, mask=row_in, other=0).to(
        tl.int64) * PAGE_BYTES
    col_page = cache + tl.load(bt_row + p + col_slot, mask=col_in, other=0).to(
        tl.int64) * PAGE_BYTES
    ks = scale_ptr(row_page + OFF_KS, FP8S) + kvh * D
    km = (row_page + OFF_KM).to(tl.pointer_type(tl.float16)) + kvh * D
    s0, s1, s2, s3 = _row_key_params(ks, row_in, w, W, NCH, FP8S)
    f0 = q0.to(tl.float32)
    f1 = q1.to(tl.float32)
    a0 = (f0 * s0).to(tl.float16)
    a1 = (f1 * s1).to(tl.float16)
    a2 = a0
    a3 = a1
    n0, n1, n2, n3 = _row_key_params(km, row_in, w, W, NCH, False)
    bias = tl.sum(f0 * n0 + f1 * n1, axis=1)
    if NCH == 4:
        f2 = q2.to(tl.float32)
        f3 = q3.to(tl.float32)
        a2 = (f2 * s2).to(tl.float16)
        a3 = (f3 * s3).to(tl.float16)
        bias += tl.sum(f2 * n2 + f3 * n3, axis=1)
    k_ptrs = col_page[:, None] + OFF_KC + kvh * G * KP + t[:, None] * KP + w[None, :]
    k0, k1, k2, k3 = _page_chunks(k_ptrs, W, 0, 0, 0, 0, 0, 0, 0, 0, W, KP, KBITS, False,
                                  USE_ASM)
    s = tl.dot(a0, tl.trans(k0))
    s = tl.dot(a1, tl.trans(k1), s)
    if NCH == 4:
        s = tl.dot(a2, tl.trans(k2), s)
        s = tl.dot(a3, tl.trans(k3), s)
    keep = col_in
    if WINDOWED:
        keep = keep & ((p + col_slot) * G + t >= tok_lo)
    s = tl.where((row_slot[:, None] == col_slot[None, :]) & keep[None, :],
                 s + bias[:, None], float("-inf"))
    m_i, l_i, acc, p16 = _online_softmax(s, m_i, l_i, acc)

    vs = scale_ptr(col_page + OFF_VS, FP8S) + kvh * VG * G
    vm = (col_page + OFF_VM).to(tl.pointer_type(tl.float16)) + kvh * VG * G
    v_ptrs = col_page[:, None] + OFF_VC + kvh * VP * G + w[None, :] * G + t[:, None]
    acc = _accumulate_values(p16, vs, vm, v_ptrs, t, col_in, acc, W, NCH, G, VP, VBITS,
                             USE_ASM, FP8S)
    return m_i, l_i, acc


@triton.jit
def _query_rows(r, tok0, kvh, q_end, BLOCK_H: tl.constexpr, QPK: tl.constexpr):
    """Token, query head and validity of the tile's query rows ``r`` (token-major, BLOCK_H
    heads per token, of which QPK are real)."""
    hh = r % BLOCK_H
    tok = tok0 + r // BLOCK_H
    return tok, kvh * QPK + hh, (hh < QPK) & (tok < q_end)


# Arguments that change with the batch are not specialized (no divisibility or ==1
# variants), so the variants compiled at start-up (``kernels/warmup.py``) serve every step.
@triton.jit(do_not_specialize=["tok_base", "S", "sinks", "stride_bt", "stride_ot",
                               "stride_oh", "stride_os", "stride_lt", "stride_lh"])
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
    first_valid,  # [rows] int32 (WINDOWED): context positions below it are not read
    tile_req,  # [num_tiles] int32 (prefill tiles)
    tile_tok,  # [num_tiles] int32
    mid_o,  # fp32 [rows, HQ, S, D]; SINGLE: the output [rows, HQ, 1, D]
    mid_lse,  # fp32 [rows, HQ, S] (log2 domain); SINGLE: the LSE [HQ, rows] (natural log)
    sm_scale,
    tok_base,  # first token of this launch: mid_o/mid_lse row = token - tok_base
    S,  # context splits (runtime: one compiled kernel serves every batch size)
    sinks,  # attention-sink tokens kept in ring rows [0, sinks) (runtime, may be 0)
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
    SLOTS: tl.constexpr,  # pages per loop iteration (decode; row block j reads page p + j)
    BLOCK_M: tl.constexpr,  # dot rows: SLOTS x BLOCK_Q x BLOCK_H, at least 16
    DECODE: tl.constexpr,
    SELF: tl.constexpr,  # decode: attend the step's own token (kivi.fastgen: one stream only)
    WINDOWED: tl.constexpr,  # mask context positions below first_valid (kivi.fastgen windows)
    TABLE_BY_SLOT: tl.constexpr,  # block-table row = tail slot (kivi.fastgen's stream rows)
    W: tl.constexpr,  # channels per chunk: min(KP, VP, G), within one value group and plane
    NCH: tl.constexpr,  # chunks per head (2 or 4)
    USE_ASM: tl.constexpr,  # magic-number unpack in PTX (False under the interpreter)
    SINGLE: tl.constexpr,  # S == 1: write the final output and natural-log LSE directly
    PAGES: tl.constexpr,  # read the pages (else only the tail and self: decode v7's split)
    WRITE_LSE: tl.constexpr,
    PAGE_BYTES: tl.constexpr,
    OFF_KC: tl.constexpr,
    OFF_VC: tl.constexpr,
    OFF_KS: tl.constexpr,
    OFF_KM: tl.constexpr,
    OFF_VS: tl.constexpr,
    OFF_VM: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    VG: tl.constexpr,
    KP: tl.constexpr,
    VP: tl.constexpr,
    KBITS: tl.constexpr,
    VBITS: tl.constexpr,
    HK: tl.constexpr,
    FP8S: tl.constexpr,
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
    tstart = tl.maximum(tl.maximum(vfrom, (ctx // G) * G - (R - sinks - G)), 0)
    pinned = tl.where(vfrom == 0, tl.minimum(sinks, tstart), 0)  # sink rows read, not pages
    p_first = pinned // G
    fv = 0
    if WINDOWED:
        fv = tl.load(first_valid + req)
        p_first = tl.maximum(p_first, fv // G)
    n_pages = tl.maximum(tstart // G - p_first, 0)
    per_split = tl.cdiv(tl.cdiv(n_pages, S), SLOTS) * SLOTS
    p_lo = p_first + split * per_split
    p_hi = tl.minimum(p_lo + per_split, tstart // G)

    ROWS: tl.constexpr = BLOCK_Q * BLOCK_H  # the tile's query rows, repeated per slot
    m = tl.arange(0, BLOCK_M)
    row_slot = m // ROWS
    tok, head, row_ok = _query_rows(m % ROWS, tok0, kvh, q_end, BLOCK_H, QPK)
    row_ok = row_ok & (row_slot < SLOTS)
    w = tl.arange(0, W)
    d = tl.arange(0, D)
    t = tl.arange(0, G)
    q_rows = query + tok[:, None] * stride_qt + head[:, None] * stride_qh
    qk_scale = sm_scale * 1.4426950408889634
    q0 = (_load_chunk(q_rows, 0, row_ok[:, None], 0 * W, w) * qk_scale).to(tl.float16)
    q1 = (_load_chunk(q_rows, 0, row_ok[:, None], 1 * W, w) * qk_scale).to(tl.float16)
    q2 = q0
    q3 = q1
    if NCH == 4:
        q2 = (_load_chunk(q_rows, 0, row_ok[:, None], 2 * W, w) * qk_scale).to(tl.float16)
        q3 = (_load_chunk(q_rows, 0, row_ok[:, None], 3 * W, w) * qk_scale).to(tl.float16)

    m_i = tl.full([BLOCK_M], -1e30, dtype=tl.float32)  # finite: empty slots give no NaN
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)  # D = NCH * W

    k_off = kvh * G * KP + t[:, None] * KP + w[None, :]  # key bytes [G tokens, W]
    v_off = kvh * VP * G + w[None, :] * G + t[:, None]  # value bytes, token-minor
    bt_index = req
    if TABLE_BY_SLOT:
        bt_index = tl.load(tail_slots + req)
    bt_row = block_table + bt_index.to(tl.int64) * stride_bt
    if PAGES:
        if SLOTS == 1:
            for p in range(p_lo, p_hi):
                page = cache + tl.load(bt_row + p).to(tl.int64) * PAGE_BYTES
                m_i, l_i, acc = _attend_page(
                    page, q0, q1, q2, q3, m_i, l_i, acc, kvh, t, k_off, v_off,
                    w, p * G, fv, WINDOWED, W, NCH, OFF_KC, OFF_VC, OFF_KS, OFF_KM, OFF_VS, OFF_VM,
                    G, D, VG, KP, VP, KBITS, VBITS, USE_ASM, FP8S)
        else:
            col = tl.arange(0, SLOTS * G)
            for p in range(p_lo, p_hi, SLOTS):
                m_i, l_i, acc = _attend_slots(
                    cache, bt_row, p, p_hi, q0, q1, q2, q3, m_i, l_i, acc,
                    kvh, row_slot, col // G, col % G, w, fv, WINDOWED, W, NCH, PAGE_BYTES, OFF_KC,
                    OFF_VC, OFF_KS, OFF_KM, OFF_VS, OFF_VM, G, D, VG, KP, VP, KBITS, VBITS, USE_ASM,
                    FP8S)

    if split == S - 1:
        # full-precision tail ring: sink positions [0, pinned), then [tstart, ctx) (at
        # most R rows in all); exact (non-lazy) update
        r = tl.arange(0, BLOCK_R)
        pos = tl.where(r < pinned, r, tstart + r - pinned)
        r_ok = pos < ctx
        if WINDOWED:
            r_ok = r_ok & (pos >= fv)
        r_ok = r_ok[:, None]
        tslot = tl.load(tail_slots + req)
        ring = tail + tslot * stride_tail_slot + kvh * stride_tail_h
        rows = ring_row(pos, R, sinks)[:, None] * stride_tail_pos
        ring_v = ring + stride_tail_kv
        s = tl.dot(q0, tl.trans(_load_chunk(ring, rows, r_ok, 0 * W, w).to(tl.float16)))
        s = tl.dot(q1, tl.trans(_load_chunk(ring, rows, r_ok, 1 * W, w).to(tl.float16)), s)
        if NCH == 4:
            s = tl.dot(q2, tl.trans(_load_chunk(ring, rows, r_ok, 2 * W, w).to(tl.float16)), s)
            s = tl.dot(q3, tl.trans(_load_chunk(ring, rows, r_ok, 3 * W, w).to(tl.float16)), s)
        first = (row_slot == 0)[:, None]  # the other slots repeat the same query rows
        s = tl.where(tl.trans(r_ok) & first, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        if DECODE and SELF:
            # the step's own token (query_len == 1), full precision
            self_k = key + tok0 * stride_kt + kvh * stride_kh
            s_self = _self_dot(q0, self_k, 0 * W, w) + _self_dot(q1, self_k, 1 * W, w)
            if NCH == 4:
                s_self += _self_dot(q2, self_k, 2 * W, w) + _self_dot(q3, self_k, 3 * W, w)
            s_self = tl.where(row_slot == 0, s_self, float("-inf"))
            m_new = tl.maximum(m_new, s_self)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        pr = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(pr, axis=1)
        pr16 = pr.to(tl.float16)
        acc = tl.dot(pr16, _load_chunk(ring_v, rows, r_ok, 0, d).to(tl.float16),
                     acc * alpha[:, None])
        if DECODE and SELF:
            p_self = tl.exp2(s_self - m_safe)
            l_i += p_self
            self_v = value + tok0 * stride_vt + kvh * stride_vh
            acc += p_self[:, None] * tl.load(self_v + d).to(tl.float32)[None, :]
        m_i = m_new

    if SLOTS > 1:  # merge the slots' partial softmaxes into the tile's ROWS rows
        NS: tl.constexpr = BLOCK_M // ROWS
        m3 = tl.reshape(m_i, (NS, ROWS))
        m_i = tl.max(m3, axis=0)
        f = tl.exp2(m3 - m_i[None, :])
        l_i = tl.sum(tl.reshape(l_i, (NS, ROWS)) * f, axis=0)
        acc = tl.sum(tl.reshape(acc, (NS, ROWS, D)) * f[:, :, None], axis=0)
        tok, head, row_ok = _query_rows(tl.arange(0, ROWS), tok0, kvh, q_end, BLOCK_H, QPK)
    empty = l_i == 0.0
    inv_l = tl.where(empty, 0.0, 1.0 / l_i)
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    mid_tok = tok - tok_base
    # one split: mid_o/mid_lse are the final output [T, HQ, D] and LSE [HQ, T] (natural log)
    out = mid_o + mid_tok[:, None] * stride_ot + head[:, None] * stride_oh + split * stride_os
    ok = row_ok[:, None]
    tl.store(out + d[None, :], acc * inv_l[:, None], mask=ok)
    if SINGLE:
        lse = lse * 0.6931471805599453
    if WRITE_LSE:
        tl.store(mid_lse + mid_tok * stride_lt + head * stride_lh + split, lse, mask=row_ok)


@triton.jit(do_not_specialize=["stride_ot", "stride_oh", "stride_os", "stride_lt",
                               "stride_lh", "stride_zh", "S"])
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


# Launch settings (measured on an H100 and an H200, see docs/kernel-notes.md); env vars
# override. One page per iteration (prefill, or decode where the slots do not fit):
MAX_SPLITS = 32
# Programs in flight: about one wave of the four-page loop (4 programs per SM, 132 SMs).
# 64 decode rows x 8 KV heads then take one split and skip the reduce (-3.5% at 64 x 8k).
SPLIT_TARGET = int(os.environ.get("KIVI_SPLIT_TARGET", 512))
# Decode v7 runs one warp per program, so it wants more programs in flight.
GLUON_SPLIT_TARGET = int(os.environ.get("KIVI_GLUON_SPLIT_TARGET", 1024))
DECODE_WARPS = int(os.environ.get("KIVI_DECODE_WARPS", 2))
NUM_STAGES = int(os.environ.get("KIVI_NUM_STAGES", 3))
MAX_REGISTERS = int(os.environ.get("KIVI_MAX_REGISTERS", 128)) or None  # ptxas .maxnreg
# Decode with SLOTS pages per iteration (``_attend_slots``): 1 turns it off.
MAX_SLOTS = int(os.environ.get("KIVI_DECODE_SLOTS", 4))
SLOT_STAGES = int(os.environ.get("KIVI_SLOT_STAGES", 2))
SLOT_MAX_REGISTERS = int(os.environ.get("KIVI_SLOT_MAX_REGISTERS", 0)) or None
USE_ASM = os.environ.get("TRITON_INTERPRET", "0") != "1"
# Decode v7 (``decode_gluon``) where it serves the format and the device (KIVI_GLUON=0 keeps
# the Triton loop): faster on the H200 at 64 and 256 x 8k, engine tests pass with it
# (docs/kernel-notes.md "v7").
USE_GLUON = USE_ASM and os.environ.get("KIVI_GLUON", "1") == "1"
GLUON_TAIL = os.environ.get("KIVI_GLUON_TAIL", "1") == "1"  # else the tail by Triton


def num_splits_for(num_rows: int, num_kv_heads: int, max_splits: int = MAX_SPLITS,
                   target: int = SPLIT_TARGET) -> int:
    """Context splits per (row, KV head): about ``target`` programs in flight."""
    return max(1, min(max_splits, -(-target // max(1, num_rows * num_kv_heads))))


def tile_shape(qpk: int, group: int, block_q: int, decode: bool) -> dict[str, int]:
    """Row tiling of the read kernel: BLOCK_H (query heads per KV head, padded), SLOTS
    (decode: pages per loop iteration, one row block each, where SLOTS pages make 128
    score columns and the row blocks fit 16 rows; else 1) and BLOCK_M (the dot's rows,
    at least 16)."""
    block_h = triton.next_power_of_2(qpk)
    rows = block_q * block_h
    slots = min(MAX_SLOTS, 128 // group)  # 128 score columns (64 measured much slower)
    if not decode or slots * group != 128 or slots * rows > 16:
        slots = 1
    return {"BLOCK_H": block_h, "SLOTS": slots, "BLOCK_M": max(16, slots * rows)}


def chunking(fmt: PageFormat) -> tuple[int, int]:
    """(W, NCH): channels per chunk and chunks per head. A chunk lies within one key plane
    and one value plane, and within one value group unless that made more than 4 chunks
    (head_dim 256 with group 32: chunks of 64 channels span two value groups)."""
    width = max(min(fmt.k_packed_dim, fmt.v_packed_dim, fmt.group_size), fmt.head_dim // 4)
    return width, fmt.head_dim // width


@functools.cache
def kernel_supports(fmt: PageFormat) -> bool:
    """Whether the GPU read kernel serves this (key/value bits, group, head_dim): 2 or 4
    chunks of a power-of-two width >= 16, each byte tile holding one chunk per plane or
    (4-bit codes, 4 chunks) two."""
    width, nch = chunking(fmt)
    return (nch in (2, 4) and width >= 16 and width & (width - 1) == 0
            and fmt.k_packed_dim in (width, 2 * width)
            and fmt.v_packed_dim in (width, 2 * width))


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
    sinks: int = 0,
    num_tiles: int,
    tile_req: torch.Tensor | None = None,
    tile_tok: torch.Tensor | None = None,
    block_q: int = 1,
    num_splits: int | None = None,
    tok_base: int = 0,
    lse_out: torch.Tensor | None = None,
    add_self: bool = True,
    first_valid: torch.Tensor | None = None,
    table_by_slot: bool = False,
):
    """Attention of query rows over their context in the pages + tail (+ self for decode).

    Covers tokens ``[tok_base, tok_base + out.shape[0])`` of ``query``; writes ``out``
    [rows, HQ, D] and, with ``lse_out`` [HQ, rows], the natural-log LSE (for merging
    with the chunk's own attention). Decode: row i is request i, one token each.
    ``sinks``: attention-sink tokens (``kivi.sink_groups * group_size``) read from their
    own ring rows. kivi.fastgen's streams: ``add_self=False`` leaves the decode token out,
    ``first_valid`` [rows] masks each row's context positions below it, ``table_by_slot``
    reads row ``tail_slots[i]`` of ``block_table`` for request ``i`` (a table shared by all
    streams, no per-step gather).
    """
    require_unit_stride(block_table=block_table, seq_lens=seq_lens,
                        query_start_loc=query_start_loc, tail_slots=tail_slots,
                        valid_from=valid_from, first_valid=first_valid)
    num_tokens = out.shape[0]
    _, hq, d = query.shape
    hk = fmt.num_kv_heads
    qpk = hq // hk
    # decode v7: the pages by the Gluon loop, and the tail and own token too (GLUON_TAIL) or
    # by this kernel as one more split
    v7 = (decode and USE_GLUON and first_valid is None and not table_by_slot
          and gluon_supports(fmt, qpk, query.device))
    s = num_splits or num_splits_for(num_tiles * block_q, hk,
                                     target=GLUON_SPLIT_TARGET if v7 else SPLIT_TARGET)
    page_splits = s
    s += v7 and not GLUON_TAIL
    single = s == 1
    if single:  # no reduce: the kernel writes ``out`` (and ``lse_out``) itself
        mid_o = out.unsqueeze(2)
        mid_lse = (lse_out if lse_out is not None else out.new_empty((hq, 1))).t().unsqueeze(2)
    else:
        mid_o = torch.empty((num_tokens, hq, s, d), dtype=torch.float32, device=query.device)
        mid_lse = torch.empty((num_tokens, hq, s), dtype=torch.float32, device=query.device)
    if tile_req is None:
        tile_req = tile_tok = seq_lens  # unused in decode mode
    width, nch = chunking(fmt)
    assert kernel_supports(fmt), f"unsupported (head_dim, group, bits) for the GPU kernels: {fmt}"
    tiles = tile_shape(qpk, fmt.group_size, block_q, decode)
    slotted = tiles["SLOTS"] > 1
    constants = format_constants(fmt)
    write_lse = not single or lse_out is not None
    grid_splits, ctx_o, ctx_lse = s, mid_o, mid_lse
    handle = None
    if v7:
        decode_pages(query, key, value, cache, tail, block_table, seq_lens, tail_slots,
                     valid_from, mid_o, mid_lse, scale, page_splits, sinks, residual, num_tiles,
                     constants, with_tail=GLUON_TAIL, add_self=add_self, single=single,
                     write_lse=write_lse)
        grid_splits, ctx_o, ctx_lse = 1, mid_o[:, :, page_splits:], mid_lse[:, :, page_splits:]
    if not (v7 and GLUON_TAIL):
        handle = _kivi_attend_context[(num_tiles, hk, grid_splits)](
            query, key, value, cache, tail, block_table, seq_lens, query_start_loc,
            tail_slots, valid_from, seq_lens if first_valid is None else first_valid, tile_req,
            tile_tok, ctx_o, ctx_lse, scale, tok_base, grid_splits, sinks,
            *read_strides(query, key, value, block_table, tail, ctx_o, ctx_lse),
            R=residual, BLOCK_R=triton.next_power_of_2(residual), QPK=qpk, BLOCK_Q=block_q,
            **tiles, DECODE=decode, SELF=add_self, WINDOWED=first_valid is not None,
            TABLE_BY_SLOT=table_by_slot, W=width,
            NCH=nch, USE_ASM=USE_ASM,
            SINGLE=single, PAGES=not v7, WRITE_LSE=write_lse,
            num_warps=DECODE_WARPS if decode else 4,
            num_stages=SLOT_STAGES if slotted else NUM_STAGES,
            maxnreg=(SLOT_MAX_REGISTERS if slotted else MAX_REGISTERS) if decode else None,
            **constants,
        )
    if single:
        return handle
    lse_arg = lse_out if lse_out is not None else mid_lse
    _kivi_reduce_splits[(num_tokens, hq)](
        mid_o, mid_lse, out, lse_arg,
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
        mid_lse.stride(0), mid_lse.stride(1), out.stride(0), out.stride(1),
        lse_arg.stride(0), s,
        BLOCK_S=max(MAX_SPLITS, triton.next_power_of_2(s)),  # one variant for every S
        D=d, WRITE_LSE=lse_out is not None,
        num_warps=4,
    )
    return handle
