"""Chunked FastGen profiling of one layer: never materialises the n x n attention.

Pass 1 walks the profiled query rows ``chunk`` at a time and accumulates each key's
attention (float64) to rank the heavy hitters per KV head (summed over the group's
query heads). Pass 2, with the heavy hitters fixed, accumulates the attention mass
every policy keeps per query head. Peak extra memory: ``q_heads x chunk x n`` floats.
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
    kept_rows,
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
) -> HeadProfile:
    """Profile the heads of one layer on a prompt and choose their policies.

    k: ``[n, kv_heads, D]`` after RoPE; q: ``[m, q_heads, D]`` for the last ``m <= n``
    positions (e.g. a prefill's last chunk); special/punct: bool ``[n]``. ``rows``:
    profile only the last ``rows`` query positions (default: all of ``q``).
    """
    n, m = k.shape[0], q.shape[0]
    if m > n:
        raise ValueError(f"q has {m} rows but only {n} keys")
    rows = m if rows is None else min(rows, m)
    return _profile(
        lambda lo, hi: _probs(q, k, lo, hi, scale), n, q.shape[1], k.shape[1],
        special, punct, recovery, frequent_ratio, local_ratio, chunk, rows,
    )


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
        lambda lo, hi: probs[:, lo:hi, :hi].float(), n, hq, num_kv_heads,
        special, punct, recovery, frequent_ratio, local_ratio, chunk, rows,
    )


def _profile(
    probs_rows: Callable[[int, int], torch.Tensor],
    n: int,
    hq: int,
    hk: int,
    special: torch.Tensor,
    punct: torch.Tensor,
    recovery: float,
    frequent_ratio: float,
    local_ratio: float,
    chunk: int,
    rows: int | None,
) -> HeadProfile:
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if rows is not None and rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    first = 0 if rows is None else max(0, n - rows)
    group = hq // hk
    dev = special.device
    colsum = torch.zeros(hq, n, dtype=torch.float64, device=dev)
    for lo in range(first, n, chunk):
        hi = min(n, lo + chunk)
        colsum[:, :hi] += probs_rows(lo, hi).sum(dim=1, dtype=torch.float64)
    n_frequent, window = budgets(n, frequent_ratio, local_ratio)
    per_kv = colsum.view(hk, group, n).sum(dim=1)
    top = per_kv.topk(min(n_frequent, n), dim=1).indices
    frequent = torch.zeros(hk, n, dtype=torch.bool, device=dev).scatter_(1, top, True)

    mass = torch.zeros(hq, NUM_POLICIES, dtype=torch.float64, device=dev)
    kv_of = torch.arange(hq, device=dev) // group
    none = frequent.new_zeros(0)
    for lo in range(first, n, chunk):
        hi = min(n, lo + chunk)
        p = probs_rows(lo, hi)
        r = torch.arange(lo, hi, device=dev)
        for policy in Policy:
            if policy in (Policy.FREQUENT, Policy.LOCAL):
                per_head = [
                    kept_rows(policy, r, special[:hi], punct[:hi], frequent[h, :hi], window)
                    for h in range(hk)
                ]
                masks = torch.stack(per_head)[kv_of]
            else:
                masks = kept_rows(policy, r, special[:hi], punct[:hi], none, window)[None]
            mass[:, policy] += (p * masks).sum(dim=(1, 2), dtype=torch.float64)
    mass /= n - first
    return HeadProfile(
        recovery=mass,
        frequent=frequent,
        policy=choose_policies(mass, hk, recovery),
        window=window,
        rows=n - first,
    )
