"""FastGen profiling without the probability matrix: two passes over the prompt.

``fastgen.profile`` needs, per query head and key ``j`` of an ``n``-token prompt, the
attention ``j`` receives from the profiled rows ``r >= first`` (``colsum``), from those rows
whose local window holds it (``band``: ``j <= r < j + window``) and from its own row
(``own``). The torch path computes float32 probabilities chunk by chunk; here
``_profile_row_lse`` takes each row's log-sum-exp (a FlashAttention forward without the
values) and ``_profile_key_sums`` walks, for one block of keys, the rows below it,
recomputing the scores and summing ``exp(s - lse)`` per key. No ``[rows, n]`` tensor is
ever stored; the cost is two QK^T products over the causal triangle.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _rows(ptr, idx, n, stride, D: tl.constexpr):
    """Vectors ``idx`` of one head ([B, D]; zeros past ``n``)."""
    d = tl.arange(0, D)
    return tl.load(ptr + idx[:, None] * stride + d[None, :], mask=(idx < n)[:, None], other=0.0)


@triton.jit
def _scores(q, k, IEEE: tl.constexpr):
    """q [BM, D] . k [BN, D]^T as float32 (``IEEE``: float32 operands and products, for
    float32 inputs and the interpreter, whose bfloat16 dot is wrong)."""
    if IEEE:
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    return s


@triton.jit
def _profile_row_lse(q_ptr, k_ptr, lse_ptr, n, first, off, qk_scale, stride_qt, stride_qh,
                     stride_kt, stride_kh, GROUP: tl.constexpr, D: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr):
    """Per query head and profiled row: log2-sum-exp2 of its causal scores."""
    h = tl.program_id(0)
    rows = first + tl.program_id(1) * BM + tl.arange(0, BM)
    qh = q_ptr + h * stride_qh
    kh = k_ptr + (h // GROUP) * stride_kh
    q = _rows(qh, rows - off, n - off, stride_qt, D)  # q holds positions off..n-1
    m_i = tl.full((BM,), float("-inf"), tl.float32)
    l_i = tl.zeros((BM,), tl.float32)
    hi = tl.minimum(first + (tl.program_id(1) + 1) * BM, n)
    for start in range(0, hi, BN):
        keys = start + tl.arange(0, BN)
        s = _scores(q, _rows(kh, keys, n, stride_kt, D), IEEE) * qk_scale
        s = tl.where(keys[None, :] <= rows[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
        m_i = m_new
    tl.store(lse_ptr + h * n + rows, m_i + tl.log2(l_i), mask=rows < n)


@triton.jit
def _profile_key_sums(q_ptr, k_ptr, lse_ptr, out_ptr, n, first, off, window, qk_scale,
                      stride_qt, stride_qh, stride_kt, stride_kh, GROUP: tl.constexpr,
                      D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                      IEEE: tl.constexpr):
    """Per query head and block of keys: colsum, band and own (``out``: [3, Hq, n])."""
    h = tl.program_id(0)
    keys = tl.program_id(1) * BN + tl.arange(0, BN)
    qh = q_ptr + h * stride_qh
    kh = k_ptr + (h // GROUP) * stride_kh
    colsum = tl.zeros((BN,), tl.float32)
    band = tl.zeros((BN,), tl.float32)
    own = tl.zeros((BN,), tl.float32)
    k = _rows(kh, keys, n, stride_kt, D)
    for start in range(tl.maximum(first, tl.program_id(1) * BN), n, BM):
        rows = start + tl.arange(0, BM)
        q = _rows(qh, rows - off, n - off, stride_qt, D)
        s = _scores(q, k, IEEE) * qk_scale
        lse = tl.load(lse_ptr + h * n + rows, mask=rows < n, other=0.0)
        gap = rows[:, None] - keys[None, :]
        p = tl.where((gap >= 0) & (rows < n)[:, None], tl.exp2(s - lse[:, None]), 0.0)
        colsum += tl.sum(p, axis=0)
        band += tl.sum(tl.where(gap < window, p, 0.0), axis=0)
        own += tl.sum(tl.where(gap == 0, p, 0.0), axis=0)
    ok = keys < n
    tl.store(out_ptr + h * n + keys, colsum, mask=ok)
    tl.store(out_ptr + (tl.num_programs(0) + h) * n + keys, band, mask=ok)
    tl.store(out_ptr + (2 * tl.num_programs(0) + h) * n + keys, own, mask=ok)


def profile_sums(q: torch.Tensor, k: torch.Tensor, first: int, window: int, scale: float,
                 block: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(colsum, band, own), float32 ``[q_heads, n]``, of causal attention of the rows
    ``first..n-1`` (``q``: ``[m, q_heads, D]`` for the last ``m`` positions of ``k``:
    ``[n, kv_heads, D]``), as ``fastgen.profile`` defines them."""
    n, hk, d = k.shape
    m, hq, _ = q.shape
    if d < 16 or d & (d - 1) or hq % hk or q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError(f"profile_sums needs unit-stride heads of a power-of-two size >= 16 "
                         f"and q heads a multiple of KV heads; got D={d}, {hq}/{hk} heads")
    if not n - m <= first < n:
        raise ValueError(f"first={first} must lie in the query rows [{n - m}, {n})")
    lse = torch.empty((hq, n), dtype=torch.float32, device=q.device)
    out = torch.empty((3, hq, n), dtype=torch.float32, device=q.device)
    ieee = q.dtype == torch.float32 or not q.is_cuda
    common = dict(GROUP=hq // hk, D=d, BM=block, BN=block, IEEE=ieee)
    args = (n, first, n - m)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1))
    _profile_row_lse[(hq, triton.cdiv(n - first, block))](
        q, k, lse, *args, scale * LOG2E, *strides, **common)
    _profile_key_sums[(hq, triton.cdiv(n, block))](
        q, k, lse, out, *args, window, scale * LOG2E, *strides, **common)
    return out[0], out[1], out[2]
