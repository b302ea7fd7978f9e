"""Triton kernels against the reference path.

On CPU they run under TRITON_INTERPRET=1 at small sizes (marked ``triton``); on a GPU
(``KIVI_KERNEL_DEVICE=cuda``) the same cases run compiled, plus larger shapes.
"""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = os.environ.get("KIVI_KERNEL_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from kivi_vllm.kernels.attention import attend_context  # noqa: E402
from kivi_vllm.kernels.common import e4m3_to_f16, fp8_nearest_bits  # noqa: E402
from kivi_vllm.kernels.store import store_step  # noqa: E402
from kivi_vllm.page_format import PageFormat  # noqa: E402
from tests.kernel_cases import (  # noqa: E402
    make_scenario,
    reference_context_attention,
    reference_store,
    rel_err,
)

pytestmark = pytest.mark.triton

SMALL = [  # (bits, group, head_dim, kv_heads, q_heads, residual)
    (2, 32, 64, 2, 4, 32),
    (4, 32, 64, 1, 4, 64),
    (2, 64, 128, 1, 8, 64),
    (4, 32, 128, 2, 2, 32),
]
LARGE_GROUP = [(2, 128, 128, 1, 4, 128)]  # group 128: one page per loop iteration
WIDE = [  # head_dim 256 with group 32: a chunk of 64 channels spans two value groups
    (2, 32, 256, 1, 2, 32),
    (4, 32, 256, 1, 2, 32),
]
KEY_BITS = [  # kivi.layer_key_bits: (bits, group, head_dim, kv_heads, q_heads, residual, key bits)
    (2, 32, 64, 2, 4, 32, 4),
    (2, 32, 128, 1, 8, 64, 4),
    (4, 32, 64, 1, 2, 32, 2),
]
FP8_SCALES = [  # kivi.fp8_scales: (..., key bits or 0, True): float8 e4m3 scales
    (2, 32, 64, 2, 4, 32, 0, True),
    (2, 32, 128, 1, 8, 64, 4, True),
]
SINKS = [  # (case, sink tokens): kivi.sink_groups, sink rows read instead of pages
    ((2, 32, 64, 2, 4, 96), 32),
    ((4, 32, 128, 1, 4, 96), 64),
]


def _format(case: tuple) -> PageFormat:
    bits, group, d, hk, _hq, _residual, key_bits, fp8 = (*case, 0, False)[:8]
    return PageFormat(bits, group, d, hk, key_bits=key_bits, fp8_scales=fp8)


@pytest.mark.parametrize("max_slots", [1, 4])  # one page per loop iteration, or several
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize(("case", "sinks"),
                         [(c, 0) for c in SMALL + LARGE_GROUP + WIDE + KEY_BITS + FP8_SCALES]
                         + SINKS)
def test_decode_attention_matches_reference(case, sinks, splits, max_slots, monkeypatch):
    from kivi_vllm.kernels import attention

    monkeypatch.setattr(attention, "MAX_SLOTS", max_slots)
    _, group, _, _, hq, residual, *_ = case
    ctx = [0, 5, group, 3 * group + 7, 5 * group - 1, 2 * residual + 3]
    if sinks:  # inside the sink groups, just past them, and far past with a prefix hit
        ctx += [sinks - 3, sinks + 1, 4 * residual + 5]
    sc = make_scenario(_format(case), residual, hq, ctx, [1] * len(ctx), seed=sum(case),
                       sinks=sinks)
    ref = reference_context_attention(sc, include_self=True)
    dev = sc.to(DEVICE)
    out = torch.full_like(dev.query, float("nan"))
    attend_context(dev.query, dev.key, dev.value, dev.cache, dev.tail, dev.block_table,
                   dev.seq_lens, dev.query_start_loc, dev.tail_slots,
                   torch.tensor(sc.valid_from, dtype=torch.int32, device=DEVICE), sc.fmt,
                   residual, sc.scale, out, decode=True, num_tiles=len(ctx),
                   num_splits=splits, sinks=sinks)  # 1 split: no reduce
    assert rel_err(out.cpu(), ref) < 5e-3  # fp16 dot operands


@pytest.mark.parametrize("max_slots", [1, 4])
@pytest.mark.parametrize("add_self", [True, False])
@pytest.mark.parametrize("case", [(2, 32, 64, 1, 4, 32), (4, 32, 128, 1, 2, 64)])
def test_fastgen_stream_decode_matches_reference(case, add_self, max_slots, monkeypatch):
    """kivi.fastgen's stream rows: one KV head per row, context positions below
    ``first_valid`` masked (a local window), the decode token attended or not."""
    from kivi_vllm import reference
    from kivi_vllm.kernels import attention

    monkeypatch.setattr(attention, "MAX_SLOTS", max_slots)
    _, group, _, _, hq, residual, *_ = case
    ctx = [0, 9, 3 * group + 7, 5 * group - 1, 4 * group + 3, 2 * residual + 3]
    first = [0, 4, group + 5, 0, 4 * group - 2, 2 * residual]  # pages, tail, or both masked
    sc = make_scenario(_format(case), residual, hq, ctx, [1] * len(ctx), seed=11,
                       prefix_hit=False)
    views = sc.fmt.views(sc.cache)
    ref = torch.zeros(sc.query.shape)
    ref_lse = torch.full((hq, len(ctx)), float("-inf"))
    for i, fv in enumerate(first):
        ck, cv = reference.context_kv(views, sc.tail, sc.seq(i), sc.fmt, residual, 0)
        ck, cv = ck[fv:].float(), cv[fv:].float()
        if add_self:
            ck, cv = torch.cat([ck, sc.key[i : i + 1]]), torch.cat([cv, sc.value[i : i + 1]])
        if ck.shape[0]:
            scores = torch.einsum("hd,kd->hk", sc.query[i], ck[:, 0]) * sc.scale
            ref[i] = torch.softmax(scores, dim=-1) @ cv[:, 0]
            ref_lse[:, i] = torch.logsumexp(scores, dim=-1)
    dev = sc.to(DEVICE)
    # the streams' table is indexed by tail slot (rows of other slots are never read)
    table = torch.full((int(sc.tail_slots.max()) + 1, sc.block_table.shape[1]), 1 << 30,
                       dtype=torch.int32)
    table[sc.tail_slots.long()] = sc.block_table
    out = torch.full_like(dev.query, float("nan"))
    lse = torch.full((hq, len(ctx)), float("nan"), device=DEVICE)
    attend_context(dev.query, dev.key, dev.value, dev.cache, dev.tail, table.to(DEVICE),
                   dev.seq_lens, dev.query_start_loc, dev.tail_slots,
                   torch.zeros(len(ctx), dtype=torch.int32, device=DEVICE), sc.fmt, residual,
                   sc.scale, out, decode=True, num_tiles=len(ctx), num_splits=2,
                   lse_out=lse, add_self=add_self, table_by_slot=True,
                   first_valid=torch.tensor(first, dtype=torch.int32, device=DEVICE))
    assert rel_err(out.cpu(), ref) < 5e-3
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), finite)
    assert torch.allclose(lse.cpu()[finite], ref_lse[finite], atol=5e-3)  # fp16 operands


@pytest.mark.parametrize(("case", "sinks"),
                         [(c, 0) for c in SMALL[:2] + LARGE_GROUP + WIDE[:1]
                          + KEY_BITS[:1] + FP8_SCALES[:1]] + SINKS[:1])
def test_prefill_context_attention_matches_reference(case, sinks):
    _, group, _, _, hq, residual, *_ = case
    fmt = _format(case)
    ctx, qlen = [2 * group + 5, group, 4 * group], [7, group + 3, 1]
    if sinks:
        ctx, qlen = ctx + [2 * residual + 5, sinks - 2], qlen + [3, 5]
    sc = make_scenario(fmt, residual, hq, ctx, qlen, seed=7, sinks=sinks)
    ref = reference_context_attention(sc, include_self=False)
    dev = sc.to(DEVICE)
    block_q = 4
    tile_req, tile_tok = [], []
    qsl = sc.query_start_loc.tolist()
    for i in range(len(ctx)):
        for t0 in range(qsl[i], qsl[i + 1], block_q):
            tile_req.append(i)
            tile_tok.append(t0)
    results = {}
    for splits in (1, 2):  # one split writes out/LSE directly; two go through the reduce
        out = torch.full_like(dev.query, float("nan"))
        lse = torch.full((hq, out.shape[0]), float("nan"), device=DEVICE)
        attend_context(dev.query, dev.key, dev.value, dev.cache, dev.tail, dev.block_table,
                       dev.seq_lens, dev.query_start_loc, dev.tail_slots,
                       torch.tensor(sc.valid_from, dtype=torch.int32, device=DEVICE), fmt,
                       residual, sc.scale, out, decode=False, num_tiles=len(tile_req),
                       tile_req=torch.tensor(tile_req, dtype=torch.int32, device=DEVICE),
                       tile_tok=torch.tensor(tile_tok, dtype=torch.int32, device=DEVICE),
                       block_q=block_q, num_splits=splits, lse_out=lse, sinks=sinks)
        assert rel_err(out.cpu(), ref) < 5e-3
        assert not torch.isnan(lse).any()
        results[splits] = lse.cpu()
    assert torch.allclose(results[1], results[2], rtol=1e-4, atol=1e-4)  # both natural log


@pytest.mark.parametrize(("case", "sinks"),
                         [(c, 0) for c in SMALL + WIDE[:1] + KEY_BITS + FP8_SCALES]
                         + SINKS[:1])
def test_store_matches_reference(case, sinks):
    _, group, _, _, hq, residual, *_ = case
    fmt = _format(case)
    ctx = [group - 1, 3, 2 * group + 5, group]
    qlen = [1, 2 * group + 9, group - 5, 3 * residual + 2]
    if sinks:  # a sink group completed by a decode, a prefill across the sinks, a group
        # completed far past the sinks (its first tokens in wrapped sliding rows)
        ctx = ctx + [sinks - 1, sinks - 7, 2 * residual + 5]
        qlen = qlen + [1, residual + 9, group - 5]
        qlen[3] = group + 2  # keep the interpreter's work small
    sc = make_scenario(fmt, residual, hq, ctx, qlen, seed=3, prefix_hit=False, sinks=sinks)
    ref_cache, ref_tail = reference_store(sc)
    dev = sc.to(DEVICE)
    store_step(dev.key, dev.value, dev.cache, dev.tail, dev.slot_mapping,
               dev.query_start_loc, dev.seq_lens, dev.tail_slots, fmt, residual, sinks)
    cache, tail = dev.cache.cpu(), dev.tail.cpu()
    assert torch.equal(tail, ref_tail)
    mismatched = (cache != ref_cache).float().mean().item()
    assert mismatched == 0.0, f"{mismatched:.2%} of page bytes differ"


@pytest.mark.parametrize(("case", "sinks"), [(SMALL[0], 0), SINKS[0]])
def test_decode_store_matches_reference(case, sinks):
    """The one-launch decode store (kivi.fastgen's streams): one token per request,
    groups completed by the token (their other tokens from the ring), sink rows."""
    _, group, _, _, hq, residual, *_ = case
    fmt = _format(case)
    ctx = [group - 1, 3, 2 * group - 1, 5 * group + 7, 3 * group - 1]
    if sinks:  # a sink group completed, a group completed past the sinks
        ctx = ctx + [sinks - 1, 2 * residual + group - 1]
    sc = make_scenario(fmt, residual, hq, ctx, [1] * len(ctx), seed=5, prefix_hit=False,
                       sinks=sinks)
    ref_cache, ref_tail = reference_store(sc)
    dev = sc.to(DEVICE)
    store_step(dev.key, dev.value, dev.cache, dev.tail, dev.slot_mapping,
               dev.query_start_loc, dev.seq_lens, dev.tail_slots, fmt, residual, sinks,
               decode=True)
    assert torch.equal(dev.tail.cpu(), ref_tail)
    assert torch.equal(dev.cache.cpu(), ref_cache)


@pytest.mark.parametrize("streams", [False, True])
def test_warm_up_launches_every_variant(streams):
    """The start-up warm-up runs each launch mode once (compiled on a GPU; on CPU the
    interpreter executes it); ``streams``: kivi.fastgen's one-head stream variants too.
    That no step compiles afterwards is checked on the GPU by ``tests/test_engine_gpu.py``."""
    from kivi_vllm.kernels import warmup

    fmt = PageFormat(2, 32, 64, 1 if streams else 2)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    warmup.warm_up(fmt, 32, 8, dtype, torch.device(DEVICE), streams=streams)
    assert (fmt, 32, 8, dtype, str(torch.device(DEVICE)), streams) in warmup._DONE


@pytest.mark.skipif(DEVICE != "cuda", reason="full-size shapes: compiled kernels only")
@pytest.mark.parametrize(("group", "max_slots"),
                         [(32, 1), (32, 4), (64, 4), (128, 4)])  # 1, 4, 2, 1 pages
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("head_dim", [128, 256])  # 256 with group 32: chunks span two groups
def test_decode_attention_full_size(bits, head_dim, group, max_slots, monkeypatch):
    """Llama-3.1-8B head layout (32 q heads, 8 KV heads, d=128; also d=256), long contexts
    that are not multiples of the group or of the pages per loop iteration, bf16 operands
    (the Triton page loop; decode v7 has its own test below)."""
    from kivi_vllm.kernels import attention

    monkeypatch.setattr(attention, "MAX_SLOTS", max_slots)
    monkeypatch.setattr(attention, "USE_GLUON", False)
    fmt = PageFormat(bits, group, head_dim, 8)
    ctx = [4097, 1000, 63, 2 * 32 * 4 + 31, 3000]
    sc = make_scenario(fmt, group, 32, ctx, [1] * len(ctx), dtype=torch.bfloat16, seed=bits)
    ref = reference_context_attention(sc, include_self=True)
    dev = sc.to(DEVICE)
    for splits in (1, 5):
        out = torch.full_like(dev.query, float("nan"))
        attend_context(dev.query, dev.key, dev.value, dev.cache, dev.tail, dev.block_table,
                       dev.seq_lens, dev.query_start_loc, dev.tail_slots,
                       torch.tensor(sc.valid_from, dtype=torch.int32, device=DEVICE), fmt,
                       group, sc.scale, out, decode=True, num_tiles=len(ctx),
                       num_splits=splits)  # residual = one group
        assert rel_err(out.float().cpu(), ref.float()) < 1e-2  # bf16 operands


@pytest.mark.skipif(DEVICE != "cuda", reason="Gluon kernels run on the GPU only")
@pytest.mark.parametrize(("residual", "sinks"), [(32, 0), (96, 32), (64, 0)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_v7_matches_reference(residual, sinks, dtype):
    """Decode v7 (the Gluon page loop, ``kernels/decode_gluon.py``) on its format: 2-bit,
    group 32, d=128, 32 query heads over 8 KV heads. Contexts of no pages, of fewer pages
    than one loop iteration, not multiples of 4 pages or of the group, up to 12k, with
    prefix hits (every third row) and sink groups; 1, 3 and 7 page splits (some of them
    empty); poisoned outputs; also against the Triton page loop."""
    from kivi_vllm.kernels import attention
    from kivi_vllm.kernels.decode_gluon import gluon_supports

    fmt = PageFormat(2, 32, 128, 8)
    assert gluon_supports(fmt, 4)
    ctx = [0, 5, 31, 32, 33, 95, 4 * 32, 4 * 32 + 1, 5 * 32 - 1, 300, 1000, 4097, 3000, 63,
           12289]
    sc = make_scenario(fmt, residual, 32, ctx, [1] * len(ctx), dtype=dtype, seed=residual,
                       sinks=sinks)
    ref = reference_context_attention(sc, include_self=True)
    dev = sc.to(DEVICE)
    args = (dev.query, dev.key, dev.value, dev.cache, dev.tail, dev.block_table, dev.seq_lens,
            dev.query_start_loc, dev.tail_slots,
            torch.tensor(sc.valid_from, dtype=torch.int32, device=DEVICE), fmt, residual,
            sc.scale)
    outs = {}
    default = attention.USE_GLUON, attention.GLUON_TAIL
    loops = {  # (Gluon loop, its tail)
        "v7": (True, True), "v7, tail by Triton": (True, False), "Triton": (False, True)}
    for name, (gluon, gluon_tail) in loops.items():
        attention.USE_GLUON, attention.GLUON_TAIL = gluon, gluon_tail
        try:
            for splits in (1, 3, 7):
                out = torch.full_like(dev.query, float("nan"))
                attend_context(*args, out, decode=True, num_tiles=len(ctx), num_splits=splits,
                               sinks=sinks)
                assert rel_err(out.float().cpu(), ref.float()) < 1e-2, (name, splits)
                outs[name, splits] = out.float().cpu()
        finally:
            attention.USE_GLUON, attention.GLUON_TAIL = default
    # the loops round differently (v7: p * s and subnormal codes; Triton: s * code + m), and
    # bf16 outputs then differ by one ulp where they straddle a rounding boundary
    close = 6e-3 if dtype == torch.bfloat16 else 2e-3
    for name in loops:
        for splits in (1, 3, 7):
            assert rel_err(outs[name, splits], outs["Triton", splits]) < close, (name, splits)


@pytest.mark.skipif(DEVICE != "cpu", reason="the GPU runs the compiled kernel (above)")
@pytest.mark.parametrize("gluon_tail", [True, False])
@pytest.mark.parametrize(("residual", "sinks", "key_mag", "value_mag"),
                         [(32, 0, 1, 1), (96, 32, 1, 1), (32, 0, 30, 200)])
def test_decode_v7_source_matches_reference(residual, sinks, key_mag, value_mag, gluon_tail,
                                            monkeypatch):
    """Decode v7's Gluon source, executed on the CPU by ``tests/gluon_shim.py`` (index
    arithmetic, masks, splits, tail, slot merge, float16 ranges; not the lane layouts),
    through ``attend_context`` as the backend calls it. ``key_mag``/``value_mag`` scale the
    keys and values (pages and tail) to where float16 operands need care: value scales of
    a few hundred, near-one-hot softmax rows."""
    from kivi_vllm.kernels import attention, decode_gluon
    from tests.gluon_shim import emulate

    monkeypatch.setattr(decode_gluon, "_kivi_decode_pages",
                        emulate(decode_gluon, "_kivi_decode_pages"))
    monkeypatch.setattr(attention, "USE_GLUON", True)
    monkeypatch.setattr(attention, "GLUON_TAIL", gluon_tail)
    fmt = PageFormat(2, 32, 128, 2)
    ctx = [0, 5, 33, 95, 4 * 32, 4 * 32 + 1, 5 * 32 - 1, 9 * 32 + 7, 13 * 32]
    sc = make_scenario(fmt, residual, 8, ctx, [1] * len(ctx), seed=residual + sinks,
                       sinks=sinks)
    views = fmt.views(sc.cache)
    for name, mag in (("k_scale", key_mag), ("k_min", key_mag), ("v_scale", value_mag),
                      ("v_min", value_mag)):
        views[name].mul_(mag)
    for x, mag in ((sc.tail[0], key_mag), (sc.key, key_mag), (sc.tail[1], value_mag),
                   (sc.value, value_mag)):
        x.mul_(mag)
    ref = reference_context_attention(sc, include_self=True)
    for splits in (1, 3):
        out = torch.full_like(sc.query, float("nan"))
        attend_context(sc.query, sc.key, sc.value, sc.cache, sc.tail, sc.block_table,
                       sc.seq_lens, sc.query_start_loc, sc.tail_slots,
                       torch.tensor(sc.valid_from, dtype=torch.int32), fmt, residual, sc.scale,
                       out, decode=True, num_tiles=len(ctx), num_splits=splits, sinks=sinks)
        assert rel_err(out, ref) < 5e-3, splits  # float16 dot operands


def test_per_row_vectors_need_unit_stride():
    """The kernels read per-row vectors as ``ptr + i``: a strided view is refused before
    any launch (a row of a Fortran-ordered plan once packed nothing this way)."""
    fmt = PageFormat(2, 32, 64, 1)
    plan = torch.zeros((2, 2), dtype=torch.int64).t()  # rows with stride 2
    key = torch.zeros((2, 1, 64))
    cache = torch.zeros((2, fmt.page_bytes), dtype=torch.uint8)
    tail = torch.zeros((2, 2, 32, 1, 64))
    qsl = torch.arange(3, dtype=torch.int32)
    lens = torch.ones(2, dtype=torch.int32)
    with pytest.raises(ValueError, match="slot_mapping must have unit stride"):
        store_step(key, key, cache, tail, plan[0], qsl, lens, lens, fmt, 32)


@triton.jit
def _fp8_codec(x_ptr, b_ptr, enc_ptr, dec_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(enc_ptr + i, fp8_nearest_bits(tl.load(x_ptr + i)))
    tl.store(dec_ptr + i, e4m3_to_f16(tl.load(b_ptr + i)))


def test_float8_scale_codes_match_torch():
    """The kernels' integer float8 e4m3 routines equal torch's casts: every non-negative
    byte decodes to its value, and float32 scales (normal, subnormal, exact ties, above
    448) encode to the nearest e4m3, ties to even, saturating at 448."""
    from kivi_vllm import reference

    grid = torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    mids = (grid[1:] + grid[:-1]) / 2  # exact ties
    gen = torch.Generator().manual_seed(8)
    spread = torch.rand(512, generator=gen) * 600 * torch.rand(512, generator=gen) ** 8
    x = torch.cat([grid, mids, spread, torch.tensor([449.0, 464.0, 1e4, 0.0])])
    n = 1 << (x.numel() - 1).bit_length()
    x = torch.cat([x, torch.zeros(n - x.numel())]).to(DEVICE)
    b = (torch.arange(n) % 127).to(torch.uint8).to(DEVICE)
    enc = torch.empty(n, dtype=torch.uint8, device=DEVICE)
    dec = torch.empty(n, dtype=torch.float16, device=DEVICE)
    _fp8_codec[(1,)](x, b, enc, dec, N=n)
    want = reference.fp8_nearest(x.cpu()).view(torch.uint8)
    assert torch.equal(enc.cpu(), want)
    assert torch.equal(dec.cpu().float(), b.cpu().view(torch.float8_e4m3fn).float())


@pytest.mark.parametrize(("n", "m", "rows", "hq", "hk", "d"), [
    (77, 77, None, 4, 2, 32),   # whole prompt, GQA 2, lengths not multiples of the block
    (96, 40, None, 2, 2, 16),   # q holds the last 40 positions only
    (70, 70, 23, 4, 1, 64),     # profile_rows: the last 23 rows
])
def test_fused_profile_equals_chunked_probabilities(n, m, rows, hq, hk, d):
    """FastGen's two-pass profiling kernels give the chunked float32 path's masses (each
    policy's recovery per head, float32 sums), heavy hitters and policies."""
    from kivi_vllm.fastgen.profile import profile_heads

    gen = torch.Generator().manual_seed(n + d)
    k = (torch.randn(n, hk, d, generator=gen) * 2).to(torch.bfloat16)
    q = (torch.randn(m, hq, d, generator=gen) * 2).to(torch.bfloat16)
    k[3] *= 4  # an attention sink, so the policies differ
    special = torch.zeros(n, dtype=torch.bool)
    special[0] = True
    punct = torch.rand(n, generator=gen) < 0.1
    kwargs = dict(recovery=0.9, frequent_ratio=0.1, local_ratio=0.2, scale=d ** -0.5,
                  rows=rows)
    want = profile_heads(q.float(), k.float(), special, punct, chunk=16, fused=False, **kwargs)
    dev = torch.device(DEVICE)
    got = profile_heads(q.to(dev), k.to(dev), special.to(dev), punct.to(dev), fused=True,
                        **kwargs)
    assert got.rows == want.rows and got.window == want.window
    assert (got.recovery.cpu() - want.recovery).abs().max() < 2e-5
    assert torch.equal(got.policy.cpu(), want.policy)
    assert torch.equal(got.frequent.cpu(), want.frequent)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("rows", [None, 23])
def test_profile_prompts_equals_each_prompt_alone(fused, rows):
    """One step's prompts profiled together (one launch pair, one policy choice) give
    each prompt's own profile: masses, heavy hitters, policies."""
    from kivi_vllm.fastgen.profile import Prompts, profile_heads, profile_prompts

    lengths, hq, hk, d = [77, 40, 129], 4, 2, 32
    gen = torch.Generator().manual_seed(7)
    total = sum(lengths)
    k = (torch.randn(total, hk, d, generator=gen) * 2).to(torch.bfloat16)
    q = (torch.randn(total, hq, d, generator=gen) * 2).to(torch.bfloat16)
    k[3] *= 4  # an attention sink in the first prompt
    special = torch.rand(total, generator=gen) < 0.05
    punct = torch.rand(total, generator=gen) < 0.1
    ratios = dict(frequent_ratio=0.1, local_ratio=0.2)
    dev = torch.device(DEVICE)
    prompts = Prompts.build(lengths, **ratios, rows=rows, device=dev)
    got = profile_prompts(q.to(dev), k.to(dev), prompts, special.to(dev), punct.to(dev),
                          recovery=0.9, scale=d ** -0.5, chunk=16, fused=fused)
    assert got.recovery.shape == (3, hq, 5) and got.frequent.shape == (hk, total)
    for p, (a, b) in enumerate(zip(prompts.starts[:-1], prompts.starts[1:], strict=True)):
        want = profile_heads(q[a:b].float(), k[a:b].float(), special[a:b], punct[a:b],
                             recovery=0.9, scale=d ** -0.5, chunk=16, fused=False, rows=rows,
                             **ratios)
        assert (got.recovery[p].cpu() - want.recovery).abs().max() < 2e-5, p
        assert torch.equal(got.policy[p].cpu(), want.policy), p
        assert torch.equal(got.frequent[:, a:b].cpu(), want.frequent), p
        assert torch.allclose(got.scores[:, a:b].cpu(), want.scores, atol=2e-5 * (b - a)), p
