"""Chunked FastGen profiling of one layer: never materialises the n x n attention.

One pass walks the profiled query rows ``chunk`` at a time and accumulates, per query
head and key (float64): the attention the key receives from all rows, from the rows
whose local window holds it, and each row's attention to its own key. The heavy hitters
per KV head (summed over the group's query heads) and the mass every policy keeps
follow from these sums. Peak extra memory: ``q_heads x chunk x n`` floats.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kivi_vllm.fastgen.policy import (
    NUM_POLICIES,
    Policy,
    budgets,
    choose_policies,
)


@dataclass(frozen=True)
class HeadProfile:
    """The profile of one layer."""

    recovery: torch.Tensor  # [q_heads, NUM_POLICIES] float64: mean attention mass kept
    frequent: torch.Tensor  # [kv_heads, n] bool: heavy hitters of each KV head
    policy: torch.Tensor  # [kv_heads] int64 Policy values
    window: int  # local window (tokens)
    rows: int  # query rows profiled


def _probs(q: torch.Tensor, k: torch.Tensor, lo: int, hi: int, scale: float) -> torch.Tensor:
    """Causal softmax of query positions [lo, hi) over keys [0, hi): float32 [Hq, hi-lo, hi].

    ``q`` holds the last ``len(q)`` positions of the ``len(k)`` keys.
    """
    hq, hk = q.shape[1], k.shape[1]
    off = k.shape[0] - q.shape[0]
    keys = k[:hi].float().repeat_interleave(hq // hk, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q[lo - off : hi - off].float(), keys) * scale
    rows = torch.arange(lo, hi, device=q.device)
    masked = torch.arange(hi, device=q.device)[None, :] > rows[:, None]
    return torch.softmax(scores.masked_fill(masked, float("-inf")), dim=-1)


def profile_heads(
    q: torch.Tensor,
    k: torch.Tensor,
    special: torch.Tensor,
    punct: torch.Tensor,
    *,
    recovery: float,
    frequent_ratio: float,
    local_ratio: float,
    scale: float,
    chunk: int = 256,
    rows: int | None = None,
    fused: bool | None = None,
) -> HeadProfile:
    """Profile the heads of one layer on a prompt and choose their policies.

    k: ``[n, kv_heads, D]`` after RoPE; q: ``[m, q_heads, D]`` for the last ``m <= n``
    positions (e.g. a prefill's last chunk); special/punct: bool ``[n]``. ``rows``:
    profile only the last ``rows`` query positions (default: all of ``q``). ``fused``:
    the sums come from the two-pass Triton kernels of ``kernels.profile`` (default: on
    CUDA, for head sizes they take) instead of float32 probabilities ``chunk`` rows at a
    time.
    """
    n, m = k.shape[0], q.shape[0]
    if m > n:
        raise ValueError(f"q has {m} rows but only {n} keys")
    d = q.shape[-1]
    if fused is None:
        fused = q.is_cuda and d >= 16 and d & (d - 1) == 0  # as kernels.profile takes
    if fused:
        from kivi_vllm.kernels.profile import profile_sums  # Triton: imported when used

        def sums(first: int, window: int) -> tuple[torch.Tensor, ...]:
            return tuple(x.double() for x in profile_sums(q, k, first, window, scale))
    else:
        def sums(first: int, window: int) -> tuple[torch.Tensor, ...]:
            return _chunked_sums(lambda lo, hi: _probs(q, k, lo, hi, scale), n, q.shape[1],
                                 first, window, chunk, k.device)
    return _profile(sums, n, k.shape[1], special, punct, recovery, frequent_ratio,
                    local_ratio, m if rows is None else min(rows, m))


def profile_attention(
    probs: torch.Tensor,
    num_kv_heads: int,
    special: torch.Tensor,
    punct: torch.Tensor,
    *,
    recovery: float,
    frequent_ratio: float,
    local_ratio: float,
    chunk: int = 256,
    rows: int | None = None,
) -> HeadProfile:
    """:func:`profile_heads` on given causal attention probabilities ``[q_heads, n, n]``."""
    hq, n, _ = probs.shape
    return _profile(
        lambda first, window: _chunked_sums(lambda lo, hi: probs[:, lo:hi, :hi].float(), n,
                                            hq, first, window, chunk, probs.device),
        n, num_kv_heads, special, punct, recovery, frequent_ratio, local_ratio, rows,
    )


def _profile(
    sums: Callable[[int, int], tuple[torch.Tensor, ...]],
    n: int,
    hk: int,
    special: torch.Tensor,
    punct: torch.Tensor,
    recovery: float,
    frequent_ratio: float,
    local_ratio: float,
    rows: int | None,
) -> HeadProfile:
    """Profile of the last ``rows`` rows (all if None) from ``sums(first, window)``: the
    float64 (colsum, band, own) ``[q_heads, n]`` of the rows ``first..n-1``."""
    if rows is not None and rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    first = 0 if rows is None else max(0, n - rows)
    n_frequent, window = budgets(n, frequent_ratio, local_ratio)
    colsum, band, own = sums(first, window)
    return _choose(colsum, band, own, hk, special, punct, recovery, n_frequent, window, first)


def _chunked_sums(
    probs_rows: Callable[[int, int], torch.Tensor],
    n: int,
    hq: int,
    first: int,
    window: int,
    chunk: int,
    dev: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(colsum, band, own) from float32 probabilities ``probs_rows(lo, hi)`` ``[hq, hi-lo,
    hi]``, ``chunk`` rows at a time: per query head and key, the attention from all
    profiled rows, from the rows whose local window holds the key (the row's own key
    included), and from the key's own row."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    colsum, band, own = (torch.zeros(hq, n, dtype=torch.float64, device=dev) for _ in range(3))
    keys = torch.arange(n, device=dev)
    for lo in range(first, n, chunk):
        hi = min(n, lo + chunk)
        p = probs_rows(lo, hi)
        r = keys[lo:hi, None]
        in_window = (keys[None, :hi] <= r) & (keys[None, :hi] > r - window)
        colsum[:, :hi] += p.sum(dim=1, dtype=torch.float64)
        band[:, :hi] += (p * in_window).sum(dim=1, dtype=torch.float64)
        own[:, lo:hi] = p.diagonal(offset=lo, dim1=1, dim2=2).double()
    return colsum, band, own


def _choose(
    colsum: torch.Tensor,
    band: torch.Tensor,
    own: torch.Tensor,
    hk: int,
    special: torch.Tensor,
    punct: torch.Tensor,
    recovery: float,
    n_frequent: int,
    window: int,
    first: int,
) -> HeadProfile:
    """Heavy hitters, each policy's mass and the policies, from the float64 sums."""
    hq, n = colsum.shape
    group = hq // hk
    dev = colsum.device
    per_kv = colsum.view(hk, group, n).sum(dim=1)
    top = per_kv.topk(min(n_frequent, n), dim=1).indices
    frequent = torch.zeros(hk, n, dtype=torch.bool, device=dev).scatter_(1, top, True)

    # a policy keeps a fixed key set (special, + punctuation, + heavy hitters) and each
    # row's own key (LOCAL: its window): mass = colsum over the set + own/band outside it
    kv_of = torch.arange(hq, device=dev) // group
    special_set = special.double()[None].expand(hq, n)
    punct_set = (special | punct).double()[None].expand(hq, n)
    frequent_set = ((special | punct)[None] | frequent).double()[kv_of]
    mass = torch.empty(hq, NUM_POLICIES, dtype=torch.float64, device=dev)
    for policy, kept, rest in (
        (Policy.SPECIAL, special_set, own),
        (Policy.PUNCT, punct_set, own),
        (Policy.FREQUENT, frequent_set, own),
        (Policy.LOCAL, frequent_set, band),
    ):
        mass[:, policy] = (colsum * kept + rest * (1 - kept)).sum(dim=1)
    mass[:, Policy.FULL] = colsum.sum(dim=1)
    mass /= n - first
    return HeadProfile(
        recovery=mass,
        frequent=frequent,
        policy=choose_policies(mass, hk, recovery),
        window=window,
        rows=n - first,
    )
