"""Helpers shared by the KIVI Triton kernels."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kivi_vllm.page_format import PageFormat

MAX_REQS_LOG2 = 14  # binary search over query_start_loc: up to 16384 requests
# (kivi.fastgen stores each stream's token as a request: rows x KV heads x 2)


def format_constants(fmt: PageFormat) -> dict[str, int]:
    """Page-format constants passed to every kernel as constexprs (one source of truth)."""
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
    }


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
