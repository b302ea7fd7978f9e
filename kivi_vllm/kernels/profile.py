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
def _prompt(q_start, k_start, firsts, p):
    """Prompt ``p``'s first q row and key, its length, q offset and first profiled row."""
    q0 = tl.load(q_start + p)
    k0 = tl.load(k_start + p)
    n = tl.load(k_start + p + 1) - k0
    off = n - (tl.load(q_start + p + 1) - q0)  # q holds positions off..n-1
    return q0, k0, n, off, tl.load(firsts + p)


@triton.jit
def _profile_row_lse(q_ptr, k_ptr, lse_ptr, q_start, k_start, firsts, qk_scale, total,
                     stride_qt, stride_qh, stride_kt, stride_kh, GROUP: tl.constexpr,
                     D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     IEEE: tl.constexpr):
    """Per query head, prompt and profiled row: log2-sum-exp2 of its causal scores."""
    h = tl.program_id(0)
    q0, k0, n, off, first = _prompt(q_start, k_start, firsts, tl.program_id(2))
    rows = first + tl.program_id(1) * BM + tl.arange(0, BM)
    qh = q_ptr + q0 * stride_qt + h * stride_qh
    kh = k_ptr + k0 * stride_kt + (h // GROUP) * stride_kh
    q = _rows(qh, rows - off, n - off, stride_qt, D)
    m_i = tl.full((BM,), float("-inf"), tl.float32)
    l_i = tl.zeros((BM,), tl.float32)
    hi = tl.minimum(first + (tl.program_id(1) + 1) * BM, n)
    hi = tl.where(first + tl.program_id(1) * BM < n, hi, 0)  # no rows of this prompt here
    for start in range(0, hi, BN):
        keys = start + tl.arange(0, BN)
        s = _scores(q, _rows(kh, keys, n, stride_kt, D), IEEE) * qk_scale
        s = tl.where(keys[None, :] <= rows[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
        m_i = m_new
    tl.store(lse_ptr + h * total + k0 + rows, m_i + tl.log2(l_i), mask=rows < n)


@triton.jit
def _profile_key_sums(q_ptr, k_ptr, lse_ptr, out_ptr, q_start, k_start, firsts, windows,
                      qk_scale, total, stride_qt, stride_qh, stride_kt, stride_kh,
                      GROUP: tl.constexpr, D: tl.constexpr, BM: tl.constexpr,
                      BN: tl.constexpr, IEEE: tl.constexpr):
    """Per query head, prompt and block of keys: colsum, band and own (``out``:
    [3, Hq, total], the prompts' keys back to back)."""
    h = tl.program_id(0)
    p = tl.program_id(2)
    q0, k0, n, off, first = _prompt(q_start, k_start, firsts, p)
    window = tl.load(windows + p)
    keys = tl.program_id(1) * BN + tl.arange(0, BN)
    qh = q_ptr + q0 * stride_qt + h * stride_qh
    kh = k_ptr + k0 * stride_kt + (h // GROUP) * stride_kh
    lse_h = lse_ptr + h * total + k0
    colsum = tl.zeros((BN,), tl.float32)
    band = tl.zeros((BN,), tl.float32)
    own = tl.zeros((BN,), tl.float32)
    k = _rows(kh, keys, n, stride_kt, D)
    for start in range(tl.maximum(first, tl.program_id(1) * BN), n, BM):  # none past n
        rows = start + tl.arange(0, BM)
        q = _rows(qh, rows - off, n - off, stride_qt, D)
        s = _scores(q, k, IEEE) * qk_scale
        lse = tl.load(lse_h + rows, mask=rows < n, other=0.0)
        gap = rows[:, None] - keys[None, :]
        p_ij = tl.where((gap >= 0) & (rows < n)[:, None], tl.exp2(s - lse[:, None]), 0.0)
        colsum += tl.sum(p_ij, axis=0)
        band += tl.sum(tl.where(gap < window, p_ij, 0.0), axis=0)
        own += tl.sum(tl.where(gap == 0, p_ij, 0.0), axis=0)
    ok = keys < n
    at = out_ptr + h * total + k0 + keys
    heads = tl.num_programs(0) * total
    tl.store(at, colsum, mask=ok)
    tl.store(at + heads, band, mask=ok)
    tl.store(at + 2 * heads, own, mask=ok)


def profile_sums(q: torch.Tensor, k: torch.Tensor, first: int, window: int, scale: float,
                 block: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(colsum, band, own), float32 ``[q_heads, n]``, of causal attention of the rows
    ``first..n-1`` (``q``: ``[m, q_heads, D]`` for the last ``m`` positions of ``k``:
    ``[n, kv_heads, D]``), as ``fastgen.profile`` defines them."""
    n, m = k.shape[0], q.shape[0]
    if not n - m <= first < n:
        raise ValueError(f"first={first} must lie in the query rows [{n - m}, {n})")
    meta = torch.tensor([0, m, 0, n, first, window], dtype=torch.int32).to(
        q.device, non_blocking=True)
    out = profile_sums_prompts(q, k, meta[0:2], meta[2:4], meta[4:5], meta[5:6], n - first, n,
                               scale, block)
    return out[0], out[1], out[2]


def profile_sums_prompts(q: torch.Tensor, k: torch.Tensor, q_start: torch.Tensor,
                         k_start: torch.Tensor, firsts: torch.Tensor, windows: torch.Tensor,
                         most_rows: int, most_keys: int, scale: float,
                         block: int = 64) -> torch.Tensor:
    """:func:`profile_sums` of several prompts in two launches: float32 ``[3, q_heads,
    total]`` (colsum, band, own; prompt ``p``'s keys at ``k_start[p]..k_start[p + 1]``).

    Device int32 arguments: prompt ``p``'s queries are rows ``q_start[p]..q_start[p + 1]``
    of ``q`` (the last positions of its keys), ``firsts[p]`` its first profiled position,
    ``windows[p]`` its local window. ``most_rows`` / ``most_keys``: the largest number of
    profiled rows and of keys of a prompt (the launch grids).
    """
    total, hk, d = k.shape
    hq = q.shape[1]
    if d < 16 or d & (d - 1) or hq % hk or q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError(f"profile_sums needs unit-stride heads of a power-of-two size >= 16 "
                         f"and q heads a multiple of KV heads; got D={d}, {hq}/{hk} heads")
    num = firsts.shape[0]
    lse = torch.empty((hq, total), dtype=torch.float32, device=q.device)
    out = torch.empty((3, hq, total), dtype=torch.float32, device=q.device)
    ieee = q.dtype == torch.float32 or not q.is_cuda
    common = dict(GROUP=hq // hk, D=d, BM=block, BN=block, IEEE=ieee)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1))
    _profile_row_lse[(hq, triton.cdiv(most_rows, block), num)](
        q, k, lse, q_start, k_start, firsts, scale * LOG2E, total, *strides, **common)
    _profile_key_sums[(hq, triton.cdiv(most_keys, block), num)](
        q, k, lse, out, q_start, k_start, firsts, windows, scale * LOG2E, total, *strides,
        **common)
    return out
