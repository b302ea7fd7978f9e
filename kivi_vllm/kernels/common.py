"""Helpers shared by the KIVI Triton kernels."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kivi_vllm.page_format import PageFormat

MAX_REQS_LOG2 = 14  # binary search over query_start_loc: up to 16384 requests
# (kivi.fastgen stores each stream's token as a request: rows x KV heads x 2)


@triton.constexpr_function
def plane_asm(bits, plane, scaled, subnormal=False):
    """PTX: 4 packed bytes -> bit plane ``plane``'s 4 codes as float16 pairs, exact
    (``scaled``: ``code * s + m``; ``subnormal``: ``code * 2**(plane*bits - 24)``).

    Operands: outputs ``$0, $1``; the bytes ``$2``; with ``scaled`` the scale ``$3, $4`` and
    the min ``$5, $6`` (two float16 each). The plane is masked in place (no shift) and
    ``prmt`` puts each byte under the exponent of ``2**(10 - plane*bits)``, whose last
    mantissa bit is the plane's lowest bit: the half reads ``2**(10 - plane*bits) + code``,
    and one ``sub.f16x2`` per pair makes it exact. ``subnormal`` puts the byte under a zero
    exponent instead: a float16 subnormal, exact with no offset to remove (tensor cores take
    subnormal float16 operands), for a dot that scales by ``2**(24 - plane*bits)`` itself.
    One plane per asm block, so each chunk can be unpacked next to the dot that consumes it.
    """
    assert not (scaled and subnormal)
    mask = {2: 0x03030303, 4: 0x0F0F0F0F}[bits] << (plane * bits)
    offset = 0 if subnormal else 0x6400 - plane * bits * 0x400  # 2**(10 - plane*bits)
    lines = ["{", ".reg .b32 a, h, k;", f"mov.b32 h, {(offset >> 8) * 0x01010101:#x};",
             f"mov.b32 k, {offset * 0x10001:#x};", f"and.b32 a, $2, {mask:#x};",
             "prmt.b32 $0, a, h, 0x4140;", "prmt.b32 $1, a, h, 0x4342;"]
    if not subnormal:
        lines += ["sub.f16x2 $0, $0, k;", "sub.f16x2 $1, $1, k;"]
    if scaled:
        lines += ["fma.rn.f16x2 $0, $0, $3, $5;", "fma.rn.f16x2 $1, $1, $4, $6;"]
    return "\n".join(lines + ["}"])


@functools.cache
def format_constants(fmt: PageFormat) -> dict[str, int]:
    """Page-format constants passed to every kernel as constexprs (one source of truth;
    computed once per format: launches unpack the same dict)."""
    return {
        "PAGE_BYTES": fmt.page_bytes,
        "OFF_KC": fmt.offset("k_codes"),
        "OFF_VC": fmt.offset("v_codes"),
        "OFF_KS": fmt.offset("k_scale"),
        "OFF_KM": fmt.offset("k_min"),
        "OFF_VS": fmt.offset("v_scale"),
        "OFF_VM": fmt.offset("v_min"),
        "G": fmt.group_size,
        "D": fmt.head_dim,
        "VG": fmt.value_groups,
        "KP": fmt.k_packed_dim,  # key code bytes per token and head
        "VP": fmt.v_packed_dim,
        "KBITS": fmt.k_bits,
        "VBITS": fmt.v_bits,
        "HK": fmt.num_kv_heads,
        "FP8S": fmt.fp8_scales,  # scales are float8 e4m3 bytes (else float16)
    }


def read_strides(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 block_table: torch.Tensor, tail: torch.Tensor, mid_o: torch.Tensor,
                 mid_lse: torch.Tensor) -> tuple[int, ...]:
    """The stride arguments of the read kernels (``attention._kivi_attend_context``,
    ``decode_gluon._kivi_decode_pages``), in their order: query, key, value (token, head),
    block table (row), tail (kv, slot, position, head), mid_o (token, head, split),
    mid_lse (token, head)."""
    return (query.stride(0), query.stride(1), key.stride(0), key.stride(1),
            value.stride(0), value.stride(1), block_table.stride(0), *tail.stride()[:4],
            *mid_o.stride()[:3], mid_lse.stride(0), mid_lse.stride(1))


def require_unit_stride(**vectors: torch.Tensor | None) -> None:
    """The kernels index these per-row vectors as ``ptr + i``: each needs unit stride (a
    host-side check on metadata, no synchronisation)."""
    for name, t in vectors.items():
        if t is not None and t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride in its last dimension, "
                             f"got strides {t.stride()}")


@triton.jit
def find_request(query_start_loc, num_reqs, token, LOG2: tl.constexpr):
    """Largest r with query_start_loc[r] <= token (the request that owns ``token``)."""
    lo = 0
    hi = num_reqs
    for _ in tl.static_range(LOG2):
        mid = (lo + hi) // 2
        start = tl.load(query_start_loc + mid)
        go_right = start <= token
        lo = tl.where(go_right, mid, lo)
        hi = tl.where(go_right, hi, mid)
    return lo


@triton.jit
def fp16_floor(x):
    """Largest float16 <= x (x float32)."""
    y = x.to(tl.float16)
    yb = y.to(tl.int16, bitcast=True)
    # one ulp towards -inf: positive -> bits - 1, negative -> bits + 1, +0 -> -min_subnormal
    down = tl.where(yb > 0, yb - 1, tl.where(yb == 0, -32767, yb + 1))
    down_f = down.to(tl.int16).to(tl.float16, bitcast=True)
    return tl.where(y.to(tl.float32) > x, down_f, y)


@triton.jit
def fp16_ceil(x):
    """Smallest float16 >= x (x float32, x >= 0 here)."""
    y = x.to(tl.float16)
    yb = y.to(tl.int16, bitcast=True)
    up = tl.where(yb >= 0, yb + 1, yb - 1)
    up_f = up.to(tl.int16).to(tl.float16, bitcast=True)
    return tl.where(y.to(tl.float32) < x, up_f, y)


@triton.jit
def scale_ptr(addr, FP8S: tl.constexpr):
    """A page section of scales as a typed pointer: bytes (float8 e4m3) or float16."""
    ptr = addr
    if not FP8S:
        ptr = addr.to(tl.pointer_type(tl.float16))
    return ptr


@triton.jit
def e4m3_to_f16(b):
    """Bytes of non-negative float8 e4m3 values -> float16, exact with integer ops (so the
    interpreter and the GPU agree): the byte shifted under float16's exponent field reads
    as the value / 256, normal (``(1 + m/8) 2^(e-15)``) and subnormal (``m 2^-17``) alike."""
    return (b.to(tl.int16) << 7).to(tl.float16, bitcast=True) * 256.0


@triton.jit
def _ties_to_even(q, above_half, at_half):
    """``q`` rounded up where the dropped part is above half, or exactly half and ``q`` odd."""
    return q + (above_half | (at_half & ((q & 1) == 1))).to(tl.int32)


@triton.jit
def fp8_nearest_bits(x):
    """The float8 e4m3 nearest x (x float32 >= 0; ties to even) as its byte, saturating at
    448 (``reference.fp8_nearest``): integer ops on the float32 bits."""
    xb = x.to(tl.int32, bitcast=True)
    exp = (xb >> 23) & 255
    man = xb & 0x7FFFFF
    base = ((exp - 120) << 3) + (man >> 20)  # a carry out of the mantissa bumps the exponent
    rest = man & 0xFFFFF
    normal = _ties_to_even(base, rest > 0x80000, rest == 0x80000)
    y = x * 512.0  # below 2^-6: m 2^-9 (m = 8 is 2^-6), exact
    f = tl.floor(y)
    sub = _ties_to_even(f.to(tl.int32), y - f > 0.5, y - f == 0.5)
    code = tl.where(exp >= 121, normal, sub)
    return tl.minimum(code, 126).to(tl.uint8)  # 0x7E = 448
