"""KiviAttentionImpl.forward driven directly with hand-built metadata (no engine).

Every step's output is compared with an independent fp32 computation: causal GQA
attention over the true keys/values of each sequence where the complete groups older
than the tail window (and the groups below a prefix-cache hit) are replaced by their
reference-dequantized values, and every other token is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from kivi_vllm import reference, state
from kivi_vllm.backend import KiviAttentionImpl, KiviMetadata
from kivi_vllm.config import KiviConfig

LAYER = "model.layers.0.self_attn.attn"
NUM_BLOCKS = 200


@dataclass
class FakeLayer:
    layer_name: str = LAYER


@dataclass
class Seq:
    """One sequence: all its tokens' q/k/v up front, and what the cache manager gave it."""

    queries: torch.Tensor  # [total, Hq, D] model dtype
    keys: torch.Tensor  # [total, Hk, D]
    values: torch.Tensor
    blocks: list[int]
    slot: int
    plan: list[int]  # query lengths, step by step
    first_step: int = 0
    valid_from: int = 0  # prefix-cache hit length (group aligned)
    pos: int = 0  # tokens in the cache (computed)


@pytest.fixture
def activate(monkeypatch: pytest.MonkeyPatch):
    """Private per-process KIVI state for the test (restored afterwards)."""
    monkeypatch.setattr(state, "_ACTIVE", None)
    monkeypatch.setattr(state, "_TAILS", {})
    return state.activate


def _dequant_group(k: torch.Tensor, v: torch.Tensor, bits: int, group: int):
    """Reference (de)quantization of one complete group [group, Hk, D], float32."""
    kc, ks, km = reference.quantize(k.float().permute(1, 0, 2), dim=1, bits=bits)
    k_hat = reference.dequantize(kc, ks, km).permute(1, 0, 2)
    d = v.shape[-1]
    vv = v.float().permute(1, 0, 2).unflatten(-1, (d // group, group))
    vc, vs, vm = reference.quantize(vv, dim=-1, bits=bits)
    v_hat = reference.dequantize(vc, vs, vm).flatten(-2).permute(1, 0, 2)
    return k_hat, v_hat


def _expected_context(seq: Seq, ctx: int, cfg: KiviConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 K/V of positions [0, ctx) as the cache must return them."""
    g, r = cfg.group_size, cfg.residual
    keys = seq.keys[:ctx].float().clone()
    values = seq.values[:ctx].float().clone()
    complete = ctx // g
    exact_groups = (r - g) // g  # newest complete groups the tail keeps exact
    for grp in range(complete):
        below_hit = (grp + 1) * g <= seq.valid_from  # pages written by the other sequence
        if grp < complete - exact_groups or below_hit:
            lo = grp * g
            keys[lo : lo + g], values[lo : lo + g] = _dequant_group(
                seq.keys[lo : lo + g], seq.values[lo : lo + g], cfg.bits, g
            )
    return keys, values


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: int, scale: float):
    """fp32 causal GQA, written out: query i (position ctx + i) sees keys [0, ctx + i]."""
    q = q.float()
    n, hq, d = q.shape
    group = hq // k.shape[1]
    out = torch.empty(n, hq, d)
    for h in range(hq):
        kh, vh = k[:, h // group], v[:, h // group]
        for i in range(n):
            p = torch.softmax((kh[: ctx + i + 1] @ q[i, h]) * scale, dim=0)
            out[i, h] = p @ vh[: ctx + i + 1]
    return out


def _metadata(rows, seqs, n_tok, pad) -> KiviMetadata:
    q_lens = [q for _, q in rows]
    qsl = torch.tensor([0, *np.cumsum(q_lens).tolist()], dtype=torch.int32)
    seq_lens = torch.tensor([seqs[n].pos + q for n, q in rows], dtype=torch.int32)
    width = max(len(seqs[n].blocks) for n, _ in rows) + 2
    table = torch.zeros(len(rows), width, dtype=torch.int32)  # 0-padded like vLLM's
    for i, (name, _) in enumerate(rows):
        table[i, : len(seqs[name].blocks)] = torch.tensor(seqs[name].blocks, dtype=torch.int32)
    slots = np.array([seqs[n].slot for n, _ in rows], dtype=np.int32)
    valid_from = np.array([seqs[n].valid_from for n, _ in rows], dtype=np.int32)
    num_decodes = sum(1 for q in q_lens if q == 1)
    return KiviMetadata(
        num_actual_tokens=n_tok,
        num_reqs=len(rows),
        num_decodes=num_decodes,
        num_decode_tokens=num_decodes,
        max_query_len=max(q_lens),
        max_seq_len=int(seq_lens.max()),
        query_start_loc=qsl.clone(),
        seq_lens=seq_lens.clone(),
        block_table=table,
        slot_mapping=torch.full((n_tok + pad,), -1, dtype=torch.int64),
        tail_slots=torch.from_numpy(slots.copy()),
        valid_from=torch.from_numpy(valid_from.copy()),
        query_start_loc_cpu=qsl,
        seq_lens_cpu=seq_lens,
        tail_slots_cpu=slots,
        valid_from_cpu=valid_from,
    )


def _drive(cfg, seqs, heads, kv_heads, head_size, dtype, activate, seed, atol):
    """Run forward step by step over the sequences' plans; check every step's output."""
    gen = torch.Generator().manual_seed(seed)
    activate(cfg)
    scale = head_size**-0.5
    impl = KiviAttentionImpl(heads, head_size, scale, kv_heads)
    num_slots = max(s.slot for s in seqs.values()) + 2
    state.allocate_tails([LAYER], num_slots, cfg.residual, kv_heads, head_size, dtype,
                         torch.device("cpu"))
    tail = state.tail_for(LAYER)
    # garbage wherever a correct implementation must not read before writing
    tail.copy_((torch.randn(tail.shape, generator=gen) * 100).to(dtype))
    kv_cache = torch.randint(0, 256, (NUM_BLOCKS, impl.fmt.page_bytes), generator=gen,
                             dtype=torch.uint8)
    for s in seqs.values():
        s.pos = s.valid_from
    stats = {"steps": 0, "rows": 0, "max_err": 0.0, "quant_effect": 0.0}
    step = 0
    while any(s.plan for s in seqs.values()):
        active = [n for n, s in seqs.items() if s.plan and s.first_step <= step]
        step += 1
        if not active:
            continue
        rows = sorted(((n, seqs[n].plan.pop(0)) for n in active), key=lambda r: r[1] > 1)
        n_tok, pad = sum(q for _, q in rows), 3
        parts = {"q": [], "k": [], "v": []}
        for name, q_len in rows:
            s = seqs[name]
            sl = slice(s.pos, s.pos + q_len)
            parts["q"].append(s.queries[sl])
            parts["k"].append(s.keys[sl])
            parts["v"].append(s.values[sl])
        junk = {x: torch.randn(pad, heads if x == "q" else kv_heads, head_size,
                               generator=gen).to(dtype) for x in parts}
        query, key, value = (torch.cat(parts[x] + [junk[x]]).flatten(1) for x in ("q", "k", "v"))
        output = torch.full((n_tok + pad, heads * head_size), 7.0, dtype=dtype)
        md = _metadata(rows, seqs, n_tok, pad)

        result = impl.forward(FakeLayer(), query, key, value, kv_cache, md, output=output)

        assert result is output
        assert (output[n_tok:] == 7.0).all(), "padding rows were written"
        out = output[:n_tok].view(n_tok, heads, head_size).float()
        qsl = md.query_start_loc_cpu.tolist()
        for i, (name, q_len) in enumerate(rows):
            s = seqs[name]
            ck, cv = _expected_context(s, s.pos, cfg)
            k_all = torch.cat([ck, s.keys[s.pos : s.pos + q_len].float()])
            v_all = torch.cat([cv, s.values[s.pos : s.pos + q_len].float()])
            q = s.queries[s.pos : s.pos + q_len]
            expected = _attention(q, k_all, v_all, s.pos, scale)
            err = (out[qsl[i] : qsl[i + 1]] - expected).abs().max().item()
            assert err <= atol, (
                f"step {step} seq {name} (ctx {s.pos}, query {q_len}): max error {err:.3g}"
            )
            exact = _attention(q, s.keys[: s.pos + q_len].float(),
                               s.values[: s.pos + q_len].float(), s.pos, scale)
            stats["quant_effect"] = max(stats["quant_effect"],
                                        (exact - expected).abs().max().item())
            stats["max_err"] = max(stats["max_err"], err)
            stats["rows"] += 1
        for name, q_len in rows:
            seqs[name].pos += q_len
        stats["steps"] += 1
    return stats


def _chunks(total: int, chunk: int) -> list[int]:
    out = []
    while total > 0:
        out.append(min(chunk, total))
        total -= out[-1]
    return out


def _scenario(cfg, heads, kv_heads, head_size, dtype, seed) -> dict[str, Seq]:
    """Mixed decodes and chunked prefills, plus a prefix-cache hit on sequence 'a'."""
    g, r = cfg.group_size, cfg.residual
    gen = torch.Generator().manual_seed(seed)
    free = torch.randperm(NUM_BLOCKS, generator=gen).tolist()

    def make(plan: list[int], slot: int, first_step: int = 0, prefix: Seq | None = None,
             hit: int = 0) -> Seq:
        total = hit + sum(plan)

        def rnd(h: int, s: float) -> torch.Tensor:
            return (torch.randn(total, h, head_size, generator=gen) * s).to(dtype)

        q, k, v = rnd(heads, 1.5), rnd(kv_heads, 1.5), rnd(kv_heads, 1.0)
        k[:, :, 3] += 6.0  # an outlier channel, as real keys have
        blocks = [free.pop() for _ in range(-(-total // g))]
        if prefix is not None:  # the cached prefix: same tokens, same pages
            q[:hit], k[:hit], v[:hit] = prefix.queries[:hit], prefix.keys[:hit], prefix.values[:hit]
            free.extend(blocks[: hit // g])
            blocks[: hit // g] = prefix.blocks[: hit // g]
        return Seq(q, k, v, blocks, slot, plan, first_step, valid_from=hit)

    seqs = {
        # group-aligned prompt chunks, then decodes across several group boundaries
        "a": make(_chunks(3 * g, g) + [1] * (2 * g + 5), slot=4),
        # prompt not a multiple of the group, odd chunk size
        "b": make(_chunks(2 * g + 7, g // 2 + 3) + [1] * (2 * g + 3), slot=0, first_step=1),
        # tiny prompt, then decode past several group boundaries
        "c": make([5] + [1] * (3 * g + 2), slot=2, first_step=3),
        # one prompt chunk longer than the residual window, decodes
        "d": make([2 * r + g + 9] + [1] * (g + 1), slot=1, first_step=2),
    }
    # a prefix-cache hit: 'e' shares a's first two full blocks (a wrote them in its
    # first two steps), starts at valid_from = 2 groups, prefills in chunks, decodes
    seqs["e"] = make(_chunks(g + 11, 20) + [1] * (g + 4), slot=3, first_step=3,
                     prefix=seqs["a"], hit=2 * g)
    return seqs


@pytest.mark.parametrize(
    "bits,group,residual,head_size",
    [(2, 32, 32, 64), (4, 32, 32, 64), (2, 32, 64, 64), (4, 32, 128, 64), (2, 64, 64, 64),
     (2, 64, 128, 128), (4, 128, 128, 128)],
)
def test_forward_matches_independent_attention(bits, group, residual, head_size, activate) -> None:
    cfg = KiviConfig(bits=bits, group_size=group, residual=residual)
    heads, kv_heads = 4, 2
    seqs = _scenario(cfg, heads, kv_heads, head_size, torch.float32, seed=bits + group + residual)
    stats = _drive(cfg, seqs, heads, kv_heads, head_size, torch.float32, activate,
                   seed=7 * bits + residual, atol=2e-5)
    print(f"kivi{bits}-g{group}-r{residual}: {stats}")
    assert all(s.pos == s.queries.shape[0] for s in seqs.values())
    # the check is sensitive: quantization visibly moves the output (>> atol)
    assert stats["quant_effect"] > 100 * 2e-5, stats


def test_forward_half_precision_model(activate) -> None:
    """fp16 model dtype: the tail keeps the model's values; output rounding only."""
    cfg = KiviConfig(bits=2, group_size=32, residual=64)
    seqs = _scenario(cfg, 6, 2, 64, torch.float16, seed=99)
    stats = _drive(cfg, seqs, 6, 2, 64, torch.float16, activate, seed=5, atol=3e-3)
    print(f"fp16: {stats}")
    assert stats["quant_effect"] > 10 * 3e-3, stats


def test_prefix_hit_reads_the_other_sequences_pages(activate) -> None:
    """Guard of the scenario itself: without 'a' having written the shared pages,
    the hit sequence reads garbage and the comparison must fail."""
    cfg = KiviConfig(bits=2, group_size=32, residual=32)
    seqs = _scenario(cfg, 4, 2, 64, torch.float32, seed=3)
    seqs["e"].first_step = 0  # runs before 'a' finished its first two groups
    with pytest.raises(AssertionError, match="seq e"):
        _drive(cfg, seqs, 4, 2, 64, torch.float32, activate, seed=4, atol=2e-5)


# ---------------------------------------------------------------- GPU kernel shapes


@pytest.mark.parametrize(
    ("bits", "group", "head", "ok"),
    [
        (2, 32, 64, True), (4, 32, 64, True), (2, 32, 128, True), (4, 32, 128, True),
        (2, 128, 128, True), (4, 64, 128, True), (2, 64, 256, True), (4, 128, 256, True),
        (2, 32, 256, True), (4, 32, 256, True),  # chunks spanning two value groups
        (2, 32, 96, False), (4, 32, 96, False), (2, 64, 192, False),
    ],
)
def test_gpu_kernel_shape_check(bits: int, group: int, head: int, ok: bool) -> None:
    """Start-up refuses what the CUDA read kernel cannot serve, naming what would work."""
    from kivi_vllm.config import KiviConfigError
    from kivi_vllm.patches.platform import check_gpu_kernel_shape

    cfg = KiviConfig.from_dict({"bits": bits, "group_size": group, "residual": group})
    if ok:
        check_gpu_kernel_shape(cfg, head, 8)
        return
    with pytest.raises(KiviConfigError) as err:
        check_gpu_kernel_shape(cfg, head, 8)
    msg = str(err.value)
    assert f"kivi.bits={bits}" in msg and f"kivi.group_size={group}" in msg
    assert "allowed on GPU for this model" in msg
