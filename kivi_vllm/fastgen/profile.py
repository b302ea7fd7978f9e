"""Chunked FastGen profiling of one layer: never materialises the n x n attention.

One pass walks the profiled query rows ``chunk`` at a time and accumulates, per query
head and key (float64): the attention the key receives from all rows, from the rows
whose local window holds it, and each row's attention to its own key. The heavy hitters
per KV head (summed over the group's query heads) and the mass every policy keeps
follow from these sums. Peak extra memory: ``q_heads x chunk x n`` floats.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kivi_vllm.fastgen.policy import (
    NUM_POLICIES,
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
    scores: torch.Tensor  # [kv_heads, n] float64: attention each key received (the ranking)


@dataclass(frozen=True)
class PromptsProfile:
    """The profiles of one layer on several prompts (their tokens back to back)."""

    recovery: torch.Tensor  # [prompts, q_heads, NUM_POLICIES] float64
    frequent: torch.Tensor  # [kv_heads, tokens] bool
    policy: torch.Tensor  # [prompts, kv_heads] int64
    scores: torch.Tensor  # [kv_heads, tokens] float64: attention each key received


@dataclass(frozen=True)
class Prompts:
    """Whole prompts back to back (``starts``): the host figures and device index tensors
    profiling needs, built once (e.g. per engine step) and shared by every layer."""

    starts: list[int]
    firsts: list[int]  # first profiled position of each prompt (from its start)
    windows: list[int]  # local window of each prompt
    frequent: list[int]  # heavy hitters each prompt keeps
    meta: torch.Tensor  # int32 [starts, firsts, windows] on the device (kernel arguments)
    bounds: torch.Tensor  # [prompts + 1] int64: the starts
    prompt_of: torch.Tensor  # [tokens] int64: the prompt of each token
    position: torch.Tensor  # [tokens] int64: its position in its prompt
    in_window: torch.Tensor  # [tokens] bool: in the local window of its prompt's end
    padded: torch.Tensor  # [prompts, longest] int64: token at (prompt, position), clamped
    valid: torch.Tensor  # [prompts, longest] bool: (prompt, position) is a token
    frequent_of: torch.Tensor  # [prompts] int64: heavy hitters kept
    rows_of: torch.Tensor  # [prompts] float64: query rows profiled

    @property
    def count(self) -> int:
        return len(self.firsts)

    @property
    def lengths(self) -> list[int]:
        return [b - a for a, b in zip(self.starts[:-1], self.starts[1:], strict=True)]

    @classmethod
    def build(cls, lengths: list[int], frequent_ratio: float, local_ratio: float,
              rows: int | None, device: torch.device | str) -> Prompts:
        """Layout of prompts of ``lengths`` tokens, each profiled on its last ``rows``
        query rows (all if None)."""
        if rows is not None and rows < 1:
            raise ValueError(f"rows must be >= 1, got {rows}")
        firsts = [0 if rows is None else max(0, n - rows) for n in lengths]
        frequent, windows = zip(*(budgets(n, frequent_ratio, local_ratio) for n in lengths),
                                strict=True)
        starts = [0, *itertools.accumulate(lengths)]
        ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        position = torch.arange(starts[-1]) - torch.tensor(starts[:-1])[ids]
        in_window = position > torch.tensor(lengths)[ids] - torch.tensor(windows)[ids]
        grid = torch.arange(max(lengths))[None, :]
        valid = grid < torch.tensor(lengths)[:, None]
        padded = (torch.tensor(starts[:-1])[:, None] + grid).clamp(max=starts[-1] - 1)
        meta = torch.tensor([*starts, *firsts, *windows], dtype=torch.int32)
        rows_of = torch.tensor([n - f for n, f in zip(lengths, firsts, strict=True)],
                               dtype=torch.float64)

        def dev(x: torch.Tensor) -> torch.Tensor:
            return x.to(device, non_blocking=True)

        return cls(starts, firsts, list(windows), list(frequent), dev(meta),
                   dev(torch.tensor(starts)), dev(ids), dev(position), dev(in_window),
                   dev(padded), dev(valid), dev(torch.tensor(frequent)), dev(rows_of))


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
    prompts = Prompts.build([n], frequent_ratio, local_ratio, m if rows is None else min(rows, m),
                            k.device)
    first, window = prompts.firsts[0], prompts.windows[0]
    if _fused(q, fused):
        from kivi_vllm.kernels.profile import profile_sums  # Triton: imported when used

        sums = tuple(x.double() for x in profile_sums(q, k, first, window, scale))
    else:
        sums = _chunked_sums(lambda lo, hi: _probs(q, k, lo, hi, scale), n, q.shape[1],
                             first, window, chunk, k.device)
    prof = _choose(*sums, k.shape[1], special, punct, recovery, prompts)
    return HeadProfile(prof.recovery[0], prof.frequent, prof.policy[0], window, n - first,
                       prof.scores)


def profile_prompts(
    q: torch.Tensor,
    k: torch.Tensor,
    prompts: Prompts,
    special: torch.Tensor,
    punct: torch.Tensor,
    *,
    recovery: float,
    scale: float,
    chunk: int = 256,
    fused: bool | None = None,
) -> PromptsProfile:
    """:func:`profile_heads` of several whole prompts at once: q ``[T, q_heads, D]`` and k
    ``[T, kv_heads, D]`` hold them back to back as ``prompts`` lays out (its ratios and
    rows), special/punct ``[T]``. Fused, one layer costs the same launches for any number
    of prompts (an engine step prefills several)."""
    hq = q.shape[1]
    if _fused(q, fused):
        from kivi_vllm.kernels.profile import profile_sums_prompts

        num = prompts.count
        meta = prompts.meta
        starts = meta[: num + 1]
        sums = profile_sums_prompts(
            q, k, starts, starts, meta[num + 1 : 2 * num + 1], meta[2 * num + 1 :],
            max(n - f for n, f in zip(prompts.lengths, prompts.firsts, strict=True)),
            max(prompts.lengths), scale).double()
    else:
        parts = []
        for a, b, first, window in zip(prompts.starts[:-1], prompts.starts[1:],
                                       prompts.firsts, prompts.windows, strict=True):
            qp, kp = q[a:b], k[a:b]
            parts.append(torch.stack(_chunked_sums(
                lambda lo, hi, qp=qp, kp=kp: _probs(qp, kp, lo, hi, scale), b - a, hq, first,
                window, chunk, k.device)))
        sums = torch.cat(parts, dim=2)
    return _choose(sums[0], sums[1], sums[2], k.shape[1], special, punct, recovery, prompts)


def _fused(q: torch.Tensor, fused: bool | None) -> bool:
    """Whether profiling takes the Triton kernels: asked for, or by default on CUDA for
    the head sizes they take (a power of two >= 16)."""
    d = q.shape[-1]
    return fused if fused is not None else q.is_cuda and d >= 16 and d & (d - 1) == 0


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
    prompts = Prompts.build([n], frequent_ratio, local_ratio, rows, probs.device)
    first, window = prompts.firsts[0], prompts.windows[0]
    sums = _chunked_sums(lambda lo, hi: probs[:, lo:hi, :hi].float(), n, hq, first, window,
                         chunk, probs.device)
    prof = _choose(*sums, num_kv_heads, special, punct, recovery, prompts)
    return HeadProfile(prof.recovery[0], prof.frequent, prof.policy[0], window, n - first,
                       prof.scores)


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
    prompts: Prompts,
) -> PromptsProfile:
    """Heavy hitters, each policy's mass and the policies, from the float64 sums
    ``[q_heads, T]`` of the prompts ``prompts`` lays out."""
    hq, n = colsum.shape
    group = hq // hk
    dev = colsum.device
    per_kv = colsum.view(hk, group, n).sum(dim=1)
    # heavy hitters: each prompt's top ``frequent_of`` keys, ranked over [kv, prompt, pos]
    ranked = per_kv[:, prompts.padded].masked_fill(~prompts.valid, float("-inf"))
    top = ranked.topk(max(prompts.frequent), dim=2).indices
    quota = torch.arange(top.shape[2], device=dev) < prompts.frequent_of[:, None]
    hits = torch.zeros_like(ranked, dtype=torch.bool).scatter_(2, top, quota.expand_as(top))
    frequent = hits[:, prompts.prompt_of, prompts.position]

    # a policy keeps a fixed key set (special, + punctuation, + heavy hitters) and each
    # row's own key (LOCAL: its window): mass = colsum over the set + own/band outside it
    kv_of = torch.arange(hq, device=dev) // group
    special_set = special.double()[None].expand(hq, n)
    punct_set = (special | punct).double()[None].expand(hq, n)
    frequent_set = ((special | punct)[None] | frequent).double()[kv_of]
    per_key = torch.stack([
        colsum * kept + rest * (1 - kept)
        for kept, rest in ((special_set, own), (punct_set, own), (frequent_set, own),
                           (frequent_set, band))
    ] + [colsum], dim=1)  # [hq, NUM_POLICIES, T], in Policy order
    mass = torch.zeros(hq, NUM_POLICIES, prompts.count, dtype=torch.float64, device=dev)
    mass = mass.index_add_(2, prompts.prompt_of, per_key).permute(2, 0, 1)
    mass = mass / prompts.rows_of[:, None, None]
    return PromptsProfile(recovery=mass, frequent=frequent,
                          policy=choose_policies(mass, hk, recovery), scores=per_kv)
