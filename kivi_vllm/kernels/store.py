"""Write path: pack every group a step completes into its page, then append to the tails.

Two named kernels, launched in this order on one stream:

* ``_kivi_pack_groups``: one program per (token, KV head); a program whose token ends
  a group (``slot % G == G - 1``) gathers the group's G tokens (earlier ones from the
  tail ring, the step's ones from the incoming key/value), quantizes keys per channel
  and values per token, and writes codes, scales and mins into the page.
* ``_kivi_append_tail``: one program per (token, KV head); writes the token to its
  sequence's tail ring if it is among the sequence's last ``R`` positions.

A decode store (one token per request, ``decode=True``) is one launch: the pack kernel's
``DECODE`` variant also appends the token, whose ring row no group it packs reads.
Padding tokens (``slot_mapping == -1``) are skipped. No host-device synchronisation.
Why two launches and not one: a prefill chunk longer than ``R`` appends tokens whose
ring rows (``ring_row``) alias rows that a group completing in the same step still has to
read (its first tokens came from earlier steps); programs of one launch have no order,
so the packing must finish before the appends start.

Attention sinks (``kivi.sink_groups``, ``sinks`` = its tokens): positions below
``sinks`` keep ring rows ``[0, sinks)`` of their own for the sequence's lifetime (and are
packed like the others); later positions cycle through the other ``R - sinks`` rows
(``reference.ring_index``). ``sinks`` is a runtime argument: one compiled variant serves
every setting, so the start-up warm-up needs no lever-specific launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kivi_vllm.kernels.common import (
    MAX_REQS_LOG2,
    e4m3_to_f16,
    find_request,
    format_constants,
    fp8_nearest_bits,
    fp16_ceil,
    fp16_floor,
    require_unit_stride,
    scale_ptr,
)
from kivi_vllm.page_format import PageFormat


@triton.jit
def _token_position(query_start_loc, seq_lens, num_reqs, token, LOG2: tl.constexpr):
    req = find_request(query_start_loc, num_reqs, token, LOG2)
    q0 = tl.load(query_start_loc + req)
    q1 = tl.load(query_start_loc + req + 1)
    seq_len = tl.load(seq_lens + req)
    ctx = seq_len - (q1 - q0)
    return req, q0, ctx, ctx + (token - q0), seq_len


@triton.jit
def ring_row(pos, R: tl.constexpr, sinks):
    """Tail-ring row of position ``pos`` (``reference.ring_index``): sink positions keep
    their own rows, the others cycle through the remaining ``R - sinks``."""
    return tl.where(pos < sinks, pos, sinks + (pos - sinks) % (R - sinks))


@triton.jit
def _quantize(x, mn, mx, QMAX: tl.constexpr, FP8S: tl.constexpr):
    """The min rounded down to float16 and the scale up to float16 (``FP8S``: to the
    nearest float8 e4m3, returned as its byte): (min, stored scale, safe divisor, scale as
    float32)."""
    mn16 = fp16_floor(mn)
    raw = tl.div_rn(mx - mn16.to(tl.float32), QMAX * 1.0)
    if FP8S:
        stored = fp8_nearest_bits(raw)
        scale = e4m3_to_f16(stored).to(tl.float32)
    else:
        stored = fp16_ceil(raw)
        scale = stored.to(tl.float32)
    safe = tl.where(scale > 0, scale, 1.0)
    return mn16, stored, safe, scale


@triton.jit(do_not_specialize=["num_reqs", "sinks"])
def _kivi_pack_groups(
    key,  # [T, HK, D]
    value,  # [T, HK, D]
    cache,  # uint8 [num_blocks, PAGE_BYTES]
    tail,  # [2, slots, R, HK, D]
    slot_mapping,  # [T] int64
    query_start_loc,  # [num_reqs + 1] int32
    seq_lens,  # [num_reqs] int32
    tail_slots,  # [num_reqs] int32
    num_reqs,
    sinks,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_tail_kv,
    stride_tail_slot,
    stride_tail_pos,
    stride_tail_h,
    R: tl.constexpr,
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
    LOG2: tl.constexpr,
    DECODE: tl.constexpr,  # one token per request: also appends it to the tail ring
):
    token = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slot_mapping + token)
    if slot < 0:
        return
    if DECODE:  # request = token; its ring rows for the group's other tokens differ
        req = token
        q0 = token
        ctx = tl.load(seq_lens + token) - 1
        pos = ctx
        tail_slot = tl.load(tail_slots + req)
        _append_row(key, value, tail, token, h, tail_slot, pos, sinks, stride_kt, stride_kh,
                    stride_vt, stride_vh, stride_tail_kv, stride_tail_slot, stride_tail_pos,
                    stride_tail_h, R, D)
    else:
        req, q0, ctx, pos, _ = _token_position(query_start_loc, seq_lens, num_reqs, token,
                                               LOG2)
        tail_slot = tl.load(tail_slots + req)
    if slot % G != G - 1:
        return
    block = slot // G

    t = tl.arange(0, G)
    d = tl.arange(0, D)
    p_tok = pos - (G - 1) + t  # positions of the group's tokens
    from_step = p_tok >= ctx
    step_row = q0 + (p_tok - ctx)
    ring = ring_row(p_tok, R, sinks)
    tail_base = tail + tail_slot * stride_tail_slot + h * stride_tail_h
    k_step = tl.load(
        key + step_row[:, None] * stride_kt + h * stride_kh + d[None, :],
        mask=from_step[:, None],
        other=0.0,
    ).to(tl.float32)
    k_ring = tl.load(
        tail_base + ring[:, None] * stride_tail_pos + d[None, :],
        mask=~from_step[:, None],
        other=0.0,
    ).to(tl.float32)
    k = tl.where(from_step[:, None], k_step, k_ring)  # [G, D]
    v_step = tl.load(
        value + step_row[:, None] * stride_vt + h * stride_vh + d[None, :],
        mask=from_step[:, None],
        other=0.0,
    ).to(tl.float32)
    v_ring = tl.load(
        tail_base + stride_tail_kv + ring[:, None] * stride_tail_pos + d[None, :],
        mask=~from_step[:, None],
        other=0.0,
    ).to(tl.float32)
    v = tl.where(from_step[:, None], v_step, v_ring)

    KMAX: tl.constexpr = (1 << KBITS) - 1
    VMAX: tl.constexpr = (1 << VBITS) - 1
    page = cache + block.to(tl.int64) * PAGE_BYTES
    # keys: per channel over the group's tokens
    k_mn16, k_sc16, k_safe, k_sc = _quantize(k, tl.min(k, axis=0), tl.max(k, axis=0), KMAX,
                                             FP8S)
    k_codes = tl.floor(tl.div_rn(k - k_mn16.to(tl.float32)[None, :], k_safe[None, :]) + 0.5)
    k_codes = tl.minimum(tl.maximum(k_codes, 0.0), KMAX * 1.0)
    k_codes = tl.where(k_sc[None, :] > 0, k_codes, 0.0).to(tl.int32)
    tl.store(scale_ptr(page + OFF_KS, FP8S) + h * D + d, k_sc16)
    tl.store((page + OFF_KM).to(tl.pointer_type(tl.float16)) + h * D + d, k_mn16)
    # values: per token over groups of G channels
    v3 = tl.reshape(v, (G, VG, G))
    v_mn16, v_sc16, v_safe, v_sc = _quantize(v3, tl.min(v3, axis=2), tl.max(v3, axis=2), VMAX,
                                             FP8S)
    v_codes = tl.floor(
        tl.div_rn(v3 - v_mn16.to(tl.float32)[:, :, None], v_safe[:, :, None]) + 0.5
    )
    v_codes = tl.minimum(tl.maximum(v_codes, 0.0), VMAX * 1.0)
    v_codes = tl.where(v_sc[:, :, None] > 0, v_codes, 0.0).to(tl.int32)
    vg = tl.arange(0, VG)
    vs_off = h * VG * G + vg[None, :] * G + t[:, None]  # token-minor (page_format)
    tl.store(scale_ptr(page + OFF_VS, FP8S) + vs_off, v_sc16)
    tl.store((page + OFF_VM).to(tl.pointer_type(tl.float16)) + vs_off, v_mn16)
    # planar packing: channel c -> byte c % P, bits (c // P) * bits (page_format)
    KCPB: tl.constexpr = 8 // KBITS
    VCPB: tl.constexpr = 8 // VBITS
    k_shifts = (tl.arange(0, KCPB) * KBITS)[None, :, None]
    v_shifts = (tl.arange(0, VCPB) * VBITS)[None, :, None]
    k_bytes = tl.sum(tl.reshape(k_codes, (G, KCPB, KP)) << k_shifts, axis=1)
    v_bytes = tl.sum(tl.reshape(tl.reshape(v_codes, (G, D)), (G, VCPB, VP)) << v_shifts, axis=1)
    kp = tl.arange(0, KP)
    vp = tl.arange(0, VP)
    tl.store(page + OFF_KC + h * G * KP + t[:, None] * KP + kp[None, :], k_bytes.to(tl.uint8))
    tl.store(page + OFF_VC + h * VP * G + vp[None, :] * G + t[:, None], v_bytes.to(tl.uint8))


@triton.jit(do_not_specialize=["num_reqs", "sinks"])
def _kivi_append_tail(
    key,
    value,
    tail,
    slot_mapping,
    query_start_loc,
    seq_lens,
    tail_slots,
    num_reqs,
    sinks,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_tail_kv,
    stride_tail_slot,
    stride_tail_pos,
    stride_tail_h,
    R: tl.constexpr,
    D: tl.constexpr,
    LOG2: tl.constexpr,
):
    token = tl.program_id(0)
    h = tl.program_id(1)
    if tl.load(slot_mapping + token) < 0:
        return
    req, q0, ctx, pos, seq_len = _token_position(
        query_start_loc, seq_lens, num_reqs, token, LOG2
    )
    if (pos >= sinks) & (pos < seq_len - (R - sinks)):  # neither a sink nor in the window
        return
    _append_row(key, value, tail, token, h, tl.load(tail_slots + req), pos, sinks, stride_kt,
                stride_kh, stride_vt, stride_vh, stride_tail_kv, stride_tail_slot,
                stride_tail_pos, stride_tail_h, R, D)


@triton.jit
def _append_row(key, value, tail, token, h, tail_slot, pos, sinks, stride_kt, stride_kh,
                stride_vt, stride_vh, stride_tail_kv, stride_tail_slot, stride_tail_pos,
                stride_tail_h, R: tl.constexpr, D: tl.constexpr):
    """Write the step's token ``token`` (KV head ``h``, position ``pos``) to its ring row."""
    d = tl.arange(0, D)
    dst = (tail + tail_slot * stride_tail_slot + ring_row(pos, R, sinks) * stride_tail_pos
           + h * stride_tail_h)
    k = tl.load(key + token * stride_kt + h * stride_kh + d)
    v = tl.load(value + token * stride_vt + h * stride_vh + d)
    tl.store(dst + d, k.to(dst.dtype.element_ty))
    tl.store(dst + stride_tail_kv + d, v.to(dst.dtype.element_ty))


def store_step(
    key: torch.Tensor,
    value: torch.Tensor,
    cache: torch.Tensor,
    tail: torch.Tensor,
    slot_mapping: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    tail_slots: torch.Tensor,
    fmt: PageFormat,
    residual: int,
    sinks: int = 0,
    decode: bool = False,
) -> None:
    """Pack the groups this step completes, then append the step's tokens to the tails.

    key/value [T, HK, D] (T = tokens of the step, padding has slot -1); ``sinks``: the
    attention-sink tokens (``kivi.sink_groups * group_size``) kept in their own ring rows.
    ``decode``: token ``i`` is request ``i``'s only token, and one launch both packs and
    appends (a group's other tokens are in other ring rows, so nothing it reads is
    overwritten).
    """
    if not 0 <= sinks < residual or sinks % fmt.group_size:
        raise ValueError(f"sinks={sinks}: whole groups below residual={residual} expected")
    require_unit_stride(slot_mapping=slot_mapping, query_start_loc=query_start_loc,
                        seq_lens=seq_lens, tail_slots=tail_slots)
    num_tokens = slot_mapping.shape[0]
    if num_tokens == 0:
        return
    num_reqs = seq_lens.shape[0]
    if num_reqs > 1 << MAX_REQS_LOG2:
        raise ValueError(f"{num_reqs} requests in one store; at most {1 << MAX_REQS_LOG2}")
    grid = (num_tokens, fmt.num_kv_heads)
    strides = (
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        tail.stride(0),
        tail.stride(1),
        tail.stride(2),
        tail.stride(3),
    )
    if decode and (num_tokens != num_reqs or residual - sinks < fmt.group_size):
        raise ValueError(f"decode store: {num_tokens} tokens for {num_reqs} requests, "
                         f"{residual - sinks} ring rows past the sinks (a group needs "
                         f"{fmt.group_size})")
    _kivi_pack_groups[grid](
        key, value, cache, tail, slot_mapping, query_start_loc, seq_lens, tail_slots,
        num_reqs, sinks, *strides, R=residual, LOG2=MAX_REQS_LOG2, DECODE=decode,
        **format_constants(fmt), num_warps=4,
    )
    if decode:
        return
    _kivi_append_tail[grid](
        key, value, tail, slot_mapping, query_start_loc, seq_lens, tail_slots, num_reqs,
        sinks, *strides, R=residual, D=fmt.head_dim, LOG2=MAX_REQS_LOG2, num_warps=1,
    )
