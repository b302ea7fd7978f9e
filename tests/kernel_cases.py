"""Random KIVI scenarios shared by the kernel tests (CPU interpreter and GPU)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kivi_vllm import reference
from kivi_vllm.page_format import PageFormat


@dataclass
class Scenario:
    fmt: PageFormat
    residual: int
    hq: int
    ctx: list[int]  # tokens in cache before the step, per request
    qlen: list[int]  # tokens of the step, per request (decodes first)
    valid_from: list[int]
    cache: torch.Tensor
    tail: torch.Tensor
    block_table: torch.Tensor
    tail_slots: torch.Tensor
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    slot_mapping: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    scale: float
    sinks: int = 0  # attention-sink tokens (kivi.sink_groups * group size)

    def seq(self, i: int) -> reference.SeqStep:
        return reference.SeqStep(
            ctx_len=self.ctx[i],
            query_len=self.qlen[i],
            block_ids=self.block_table[i].cpu(),
            tail_slot=int(self.tail_slots[i]),
            valid_from=self.valid_from[i],
        )

    def to(self, device: str) -> Scenario:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                 for k, v in self.__dict__.items()}
        return Scenario(**moved)


def make_scenario(
    fmt: PageFormat,
    residual: int,
    hq: int,
    ctx: list[int],
    qlen: list[int],
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    prefix_hit: bool = True,
    sinks: int = 0,
) -> Scenario:
    """Pages and tails as the write path leaves them after each request's context
    (``sinks``: the first tokens a sequence wrote itself also stay in ring rows [0, sinks))."""
    gen = torch.Generator().manual_seed(seed)
    g, hk, d = fmt.group_size, fmt.num_kv_heads, fmt.head_dim
    n = len(ctx)
    max_blocks = max(-(-(c + q) // g) for c, q in zip(ctx, qlen, strict=True)) + 1
    num_blocks = n * max_blocks + 3
    perm = torch.randperm(num_blocks - 1, generator=gen)[: n * max_blocks] + 1
    block_table = perm.view(n, max_blocks).to(torch.int32)
    cache = torch.randint(0, 256, (num_blocks, fmt.page_bytes), dtype=torch.uint8, generator=gen)
    slots = torch.randperm(n + 2, generator=gen)[:n].to(torch.int32)
    tail = torch.randn((2, n + 2, residual, hk, d), generator=gen).to(dtype)
    views = fmt.views(cache)
    valid_from = []
    for i in range(n):
        # the sequence's own history: random K/V with a per-channel offset (outliers)
        total = ctx[i]
        offs = torch.randn(hk, d, generator=gen) * 3
        hist_k = (torch.randn(total, hk, d, generator=gen) + offs).to(dtype)
        hist_v = torch.randn(total, hk, d, generator=gen).to(dtype)
        vf = (ctx[i] // g // 2) * g if (prefix_hit and i % 3 == 2) else 0
        valid_from.append(vf)
        # sink groups of a sequence that wrote its start itself are never read from their
        # pages: leave those pages as random bytes (poison) so that reading one shows up
        first = sinks // g if vf == 0 else 0
        for grp in range(first, total // g):
            page = reference.quantize_page(hist_k[grp * g:(grp + 1) * g],
                                           hist_v[grp * g:(grp + 1) * g], fmt)
            for name, data in page.items():
                views[name][int(block_table[i, grp])] = data
        pos = torch.arange(vf, total)
        pos = pos[(pos < sinks) | (pos >= total - (residual - sinks))]
        rows = reference.ring_index(pos, residual, sinks)
        tail[0, slots[i], rows] = hist_k[pos]
        tail[1, slots[i], rows] = hist_v[pos]
    num_tokens = sum(qlen)
    query = torch.randn(num_tokens, hq, d, generator=gen).to(dtype)
    key = (torch.randn(num_tokens, hk, d, generator=gen) * 2).to(dtype)
    value = torch.randn(num_tokens, hk, d, generator=gen).to(dtype)
    qsl = torch.zeros(n + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(torch.tensor(qlen), 0)
    slot_mapping = torch.empty(num_tokens, dtype=torch.int64)
    for i in range(n):
        pos = torch.arange(ctx[i], ctx[i] + qlen[i])
        slot_mapping[qsl[i]:qsl[i + 1]] = block_table[i, pos // g].long() * g + pos % g
    seq_lens = torch.tensor([c + q for c, q in zip(ctx, qlen, strict=True)], dtype=torch.int32)
    return Scenario(fmt, residual, hq, ctx, qlen, valid_from, cache, tail, block_table, slots,
                    query, key, value, slot_mapping, qsl, seq_lens, d ** -0.5, sinks)


def reference_context_attention(sc: Scenario, include_self: bool) -> torch.Tensor:
    """fp32 attention of every step token over its context (and itself, for decode rows)."""
    views = sc.fmt.views(sc.cache.cpu())
    tail = sc.tail.cpu()
    out = torch.empty(sc.query.shape, dtype=torch.float32)
    qsl = sc.query_start_loc.tolist()
    hk = sc.fmt.num_kv_heads
    for i in range(len(sc.ctx)):
        lo, hi = qsl[i], qsl[i + 1]
        ck, cv = reference.context_kv(views, tail, sc.seq(i), sc.fmt, sc.residual, sc.sinks)
        q = sc.query[lo:hi].cpu().float()
        if include_self:
            out[lo:hi] = reference.attend(q, sc.key[lo:hi].cpu(), sc.value[lo:hi].cpu(),
                                          ck, cv, sc.scale)
            continue
        ks = ck.repeat_interleave(sc.hq // hk, dim=1)
        vs = cv.repeat_interleave(sc.hq // hk, dim=1)
        probs = torch.softmax(torch.einsum("qhd,khd->hqk", q, ks) * sc.scale, dim=-1)
        out[lo:hi] = torch.einsum("hqk,khd->qhd", probs, vs)
    return out


def reference_store(sc: Scenario) -> tuple[torch.Tensor, torch.Tensor]:
    """Cache and tail after the reference write path of the step."""
    cache, tail = sc.cache.cpu().clone(), sc.tail.cpu().clone()
    views = sc.fmt.views(cache)
    qsl = sc.query_start_loc.tolist()
    for i in range(len(sc.ctx)):
        lo, hi = qsl[i], qsl[i + 1]
        reference.store(views, tail, sc.key[lo:hi].cpu(), sc.value[lo:hi].cpu(), sc.seq(i),
                        sc.fmt, sc.residual, sc.sinks)
    return cache, tail


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert not torch.isnan(out).any(), "NaN in kernel output"
    return float((out - ref).norm() / ref.norm())
