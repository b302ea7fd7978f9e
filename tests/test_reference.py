"""The pure-PyTorch KIVI reference: quantizer bound, packing, page format, store/read.

Fast (no engine). Every check compares against an independently written expectation
(analytic error bound, bit arithmetic done here, the true tokens kept by the test).
"""

from __future__ import annotations

import pytest
import torch

from kivi_vllm import reference
from kivi_vllm.config import KiviConfig
from kivi_vllm.page_format import (
    PageFormat,
    bf16_bytes_per_token,
    kivi_bytes_per_token,
    layer_page_format,
)

REL_SLACK = 1e-6  # fp32 arithmetic slack, relative to the magnitudes involved


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _assert_within_bound(
    x: torch.Tensor, xhat: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor
) -> None:
    """|x - xhat| <= scale / 2 (+ relative fp32 slack), element-wise (scale broadcast)."""
    x = x.float()
    s = scale.float().expand_as(x)
    m = mn.float().expand_as(x)
    err = (x - xhat).abs()
    bound = s / 2 + REL_SLACK * (x.abs() + m.abs() + s)
    worst = (err - bound).max().item()
    assert worst <= 0, f"quantization error exceeds scale/2 by {worst:.3g}"


def _check_quantize(x: torch.Tensor, dim: int, bits: int) -> None:
    qmax = (1 << bits) - 1
    codes, scale, mn = reference.quantize(x, dim=dim, bits=bits)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert scale.dtype == torch.float16 and mn.dtype == torch.float16
    assert int(codes.max()) <= qmax
    assert torch.isfinite(scale).all() and (scale >= 0).all()
    xf = x.float()
    lo = xf.amin(dim=dim, keepdim=True)
    hi = xf.amax(dim=dim, keepdim=True)
    # min is rounded *down* to fp16, by less than one fp16 step of the true min.
    assert (mn.float() <= lo).all()
    step = (torch.nextafter(mn, torch.full_like(mn, float("inf"))).float() - mn.float())
    assert (lo - mn.float() <= step).all()
    # The code range covers the data and the scale is not larger than needed
    # (fp16 rounding up costs at most a relative 2**-10).
    top = mn.float() + qmax * scale.float()
    assert (top >= hi - REL_SLACK * (hi.abs() + 1)).all()
    tight = (hi - mn.float()) / qmax
    assert (scale.float() <= tight * (1 + 2**-10) + 6e-8).all()
    xhat = reference.dequantize(codes, scale, mn)
    assert xhat.dtype == torch.float32
    _assert_within_bound(x, xhat, scale, mn)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("offset", [0.0, 37.5, -900.0, 12000.0])
def test_quantize_bound_random(bits: int, group: int, offset: float) -> None:
    g = _gen(1000 * bits + group + int(offset))
    for spread in (1e-3, 1.0, 30.0):
        # keys: per channel over tokens (dim 1 of [heads, group, head_dim])
        k = torch.randn(3, group, 64, generator=g) * spread + offset
        _check_quantize(k, dim=1, bits=bits)
        # values: per token over a channel group (last dim)
        v = torch.randn(5, 7, 2, group, generator=g) * spread + offset
        _check_quantize(v, dim=-1, bits=bits)


@pytest.mark.parametrize("bits", [2, 4])
def test_quantize_odd_shapes_and_outliers(bits: int) -> None:
    g = _gen(7 + bits)
    cases = [((1, 1), 0), ((3, 1), 0), ((1, 33), 1), ((5, 17, 3), 1), ((2, 3, 4, 5, 6), 2)]
    for shape, dim in cases:
        x = torch.randn(*shape, generator=g) * 4
        _check_quantize(x, dim=dim, bits=bits)
    # heavy-tailed data with a few huge outliers (KIVI's motivating case for keys)
    x = torch.randn(4, 32, 64, generator=g)
    x[:, 3, 5] = 250.0
    x[:, 7, 9] = -180.0
    _check_quantize(x, dim=1, bits=bits)
    # inputs in half precision
    for dtype in (torch.float16, torch.bfloat16):
        _check_quantize((torch.randn(3, 32, 64, generator=g) * 3).to(dtype), dim=1, bits=bits)


@pytest.mark.parametrize("bits", [2, 4])
def test_quantize_constant_groups(bits: int) -> None:
    g = _gen(11)
    # fp16-representable constants: scale 0, exact reconstruction
    consts = (torch.randn(6, 1, 8, generator=g) * 100).half().float()
    consts[0, 0, 0] = 0.0
    x = consts.expand(6, 32, 8).contiguous()
    codes, scale, mn = reference.quantize(x, dim=1, bits=bits)
    assert (scale == 0).all()
    assert (codes == 0).all()
    assert torch.equal(reference.dequantize(codes, scale, mn), x)
    # constants that fp16 cannot represent still obey the bound
    y = torch.full((2, 32, 4), 1.0 + 2**-14)
    y[1] = -3.14159265
    _check_quantize(y, dim=1, bits=bits)
    # a group that is constant next to groups that are not
    z = torch.randn(3, 32, 8, generator=g)
    z[1] = 0.5
    codes, scale, mn = reference.quantize(z, dim=1, bits=bits)
    assert (scale[1] == 0).all() and (scale[0] > 0).all()
    assert torch.equal(reference.dequantize(codes, scale, mn)[1], z[1])


@pytest.mark.parametrize("bits", [2, 4])
def test_quantize_uses_all_levels(bits: int) -> None:
    """A ramp over the full range hits every code, the endpoints exactly."""
    qmax = (1 << bits) - 1
    x = torch.linspace(-2.0, 1.0, 64).reshape(1, 64)
    codes, scale, mn = reference.quantize(x, dim=1, bits=bits)
    assert sorted(set(codes.flatten().tolist())) == list(range(qmax + 1))
    assert codes[0, 0] == 0 and codes[0, -1] == qmax


def test_fp16_rounding_helpers() -> None:
    g = _gen(3)
    x = torch.randn(10000, generator=g) * 1000
    lo, hi = reference.fp16_floor(x), reference.fp16_ceil(x)
    assert lo.dtype == hi.dtype == torch.float16
    assert (lo.float() <= x).all() and (hi.float() >= x).all()
    # no fp16 value strictly between the rounded result and x
    assert (torch.nextafter(lo, torch.full_like(lo, float("inf"))).float() > x).all()
    assert (torch.nextafter(hi, torch.full_like(hi, float("-inf"))).float() < x).all()


def _pack_expected(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Planar packing written out per channel: c -> byte c % P, bit (c // P) * bits."""
    d = codes.shape[-1]
    p = d // (8 // bits)
    out = torch.zeros(*codes.shape[:-1], p, dtype=torch.int64)
    for c in range(d):
        out[..., c % p] |= codes[..., c].long() << ((c // p) * bits)
    return out.to(torch.uint8)


@pytest.mark.parametrize("bits", [2, 4])
def test_pack_unpack_round_trip(bits: int) -> None:
    g = _gen(5 + bits)
    for shape in [(8,), (3, 64), (2, 5, 32, 64), (7, 128), (1, 1, 16)]:
        codes = torch.randint(0, 1 << bits, shape, generator=g, dtype=torch.uint8)
        packed = reference.pack_planar(codes, bits)
        assert packed.dtype == torch.uint8
        assert packed.shape == (*shape[:-1], shape[-1] * bits // 8)
        assert torch.equal(packed, _pack_expected(codes, bits))
        assert torch.equal(reference.unpack_planar(packed, bits), codes)


def test_pack_known_answer() -> None:
    codes = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0], dtype=torch.uint8)
    # bits 2, P = 2: byte0 = c0 | c2<<2 | c4<<4 | c6<<6, byte1 = c1 | c3<<2 | c5<<4 | c7<<6
    assert reference.pack_planar(codes, 2).tolist() == [0 | 2 << 2 | 3 << 4 | 1 << 6,
                                                         1 | 3 << 2 | 2 << 4 | 0 << 6]
    codes4 = torch.tensor([1, 15, 7, 8], dtype=torch.uint8)
    assert reference.pack_planar(codes4, 4).tolist() == [1 | 7 << 4, 15 | 8 << 4]


# ----------------------------------------------------------------------------- page format


def _formats() -> list[PageFormat]:
    out = []
    for bits in (2, 4):
        for group, head_dim in [(32, 64), (64, 64), (32, 128), (64, 128), (128, 128), (32, 96)]:
            for heads in (1, 3, 8):
                out.append(PageFormat(bits, group, head_dim, heads))
    # kivi.layer_key_bits: keys wider (or narrower) than the values
    out += [PageFormat(2, 32, 64, 3, key_bits=4), PageFormat(4, 64, 128, 2, key_bits=2)]
    return out


def _fmt_id(f: PageFormat) -> str:
    return f"k{f.k_bits}v{f.v_bits}g{f.group_size}d{f.head_dim}h{f.num_kv_heads}"


@pytest.mark.parametrize("fmt", _formats(), ids=_fmt_id)
def test_page_format_sections(fmt: PageFormat) -> None:
    h, g, d = fmt.num_kv_heads, fmt.group_size, fmt.head_dim
    expected_sizes = {
        "k_codes": h * g * d * fmt.k_bits // 8,
        "v_codes": h * g * d * fmt.v_bits // 8,
        "k_scale": h * d * 2,
        "k_min": h * d * 2,
        "v_scale": h * g * (d // g) * 2,
        "v_min": h * g * (d // g) * 2,
    }
    assert set(fmt.sections) == set(expected_sizes)
    spans = []
    for name, (offset, shape, dtype) in fmt.sections.items():
        size = dtype.itemsize
        for s in shape:
            size *= s
        assert size == expected_sizes[name], name
        assert offset % 16 == 0, f"{name} at {offset} is not 16-byte aligned"
        spans.append((offset, offset + size, name))
    spans.sort()
    assert spans[0][0] == 0
    for (_, end, a), (start, _, b) in zip(spans, spans[1:], strict=False):
        assert end <= start, f"{a} overlaps {b}"
    used = sum(expected_sizes.values())
    assert spans[-1][1] <= fmt.page_bytes < used + 16
    assert fmt.page_bytes % 16 == 0
    assert fmt.block_size == g
    assert fmt.bytes_per_token == fmt.page_bytes / g
    # per token per head: codes for K and V, fp16 scale+min for K (per channel,
    # shared by the group) and for V (per channel group of this token)
    per_head = d * (fmt.k_bits + fmt.v_bits) / 8 + 2 * 2 * d / g + 2 * 2 * d / g
    assert fmt.bytes_per_token == pytest.approx(per_head * h, abs=16 / g)


def test_page_format_smollm2_bytes_per_token() -> None:
    kivi2 = PageFormat(2, 32, 64, 3)
    kivi4 = PageFormat(4, 32, 64, 3)
    assert kivi2.bytes_per_token == 48 * 3
    assert kivi4.bytes_per_token == 80 * 3
    assert bf16_bytes_per_token(3, 64) == 256 * 3
    assert kivi2.page_bytes == 48 * 3 * 32
    assert kivi2.tail_bytes_per_slot(32, 2) == 2 * 32 * 3 * 64 * 2
    assert PageFormat(2, 32, 64, 3, key_bits=4).bytes_per_token == 64 * 3  # +16 B/head


def test_layer_page_format_and_model_bytes() -> None:
    cfg = KiviConfig(bits=2, layer_key_bits={"0": 4, "18": 4})
    assert layer_page_format(cfg, 0, 64, 3) == PageFormat(2, 32, 64, 3, key_bits=4)
    assert layer_page_format(cfg, 1, 64, 3) == PageFormat(2, 32, 64, 3)
    plain = KiviConfig(bits=2)
    assert kivi_bytes_per_token(plain, 64, 3, 30) == 144 * 30
    assert kivi_bytes_per_token(cfg, 64, 3, 30) == 144 * 28 + 192 * 2


def test_page_format_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError):
        PageFormat(3, 32, 64, 3)
    with pytest.raises(ValueError, match="key_bits"):
        PageFormat(2, 32, 64, 3, key_bits=8)
    with pytest.raises(ValueError):
        PageFormat(2, 128, 64, 3)
    with pytest.raises(ValueError):
        PageFormat(2, 32, 64, 3).views(torch.zeros(4, 100, dtype=torch.uint8))
    with pytest.raises(ValueError):
        PageFormat(2, 32, 64, 3).views(torch.zeros(4, 4608, dtype=torch.float16))


@pytest.mark.parametrize("fmt", [PageFormat(2, 32, 64, 3), PageFormat(4, 64, 128, 2),
                                 PageFormat(2, 32, 64, 3, key_bits=4)], ids=str)
def test_views_address_their_own_bytes(fmt: PageFormat) -> None:
    cache = torch.zeros(5, fmt.page_bytes, dtype=torch.uint8)
    views = fmt.views(cache)
    for i, name in enumerate(fmt.sections):
        offset, shape, dtype = fmt.sections[name]
        assert views[name].shape == (5, *shape) and views[name].dtype == dtype
        raw = views[name][3].view(torch.uint8)
        raw.fill_(i + 1)
    page = cache[3]
    for i, (_name, (offset, shape, dtype)) in enumerate(fmt.sections.items()):
        size = dtype.itemsize
        for s in shape:
            size *= s
        assert (page[offset : offset + size] == i + 1).all()
    assert (cache[[0, 1, 2, 4]] == 0).all()  # other pages untouched


# ----------------------------------------------------------------------------- pages


def _unpack_expected(packed: torch.Tensor, bits: int) -> torch.Tensor:
    p = packed.shape[-1]
    cpb = 8 // bits
    out = torch.empty(*packed.shape[:-1], p * cpb, dtype=torch.uint8)
    for c in range(p * cpb):
        out[..., c] = (packed[..., c % p].long() >> ((c // p) * bits)) & ((1 << bits) - 1)
    return out


@pytest.mark.parametrize("bits,key_bits", [(2, 2), (4, 4), (2, 4)])
@pytest.mark.parametrize(
    "group,head_dim,heads", [(32, 64, 3), (64, 64, 2), (32, 128, 1), (128, 128, 4)]
)
def test_quantize_page_round_trip(
    bits: int, key_bits: int, group: int, head_dim: int, heads: int
) -> None:
    fmt = PageFormat(bits, group, head_dim, heads, key_bits=key_bits)
    g = _gen(bits * 100 + key_bits * 7 + group + head_dim + heads)
    num_blocks = 6
    cache = torch.randint(0, 256, (num_blocks, fmt.page_bytes), generator=g, dtype=torch.uint8)
    views = fmt.views(cache)
    truth = {}
    for block in (4, 1, 2):  # not in order, some blocks never written
        k = torch.randn(group, heads, head_dim, generator=g) * 2 + 0.3 * block
        v = torch.randn(group, heads, head_dim, generator=g) * 0.5 - block
        k[:, :, 1] += 40.0  # an outlier channel, as keys have
        page = reference.quantize_page(k, v, fmt)
        for name, data in page.items():
            views[name][block] = data
        truth[block] = (k, v, page)
    ids = torch.tensor([2, 4, 1])
    k_hat, v_hat = reference.dequantize_pages(views, ids, fmt)
    assert k_hat.shape == v_hat.shape == (3 * group, heads, head_dim)
    for i, block in enumerate(ids.tolist()):
        k, v, page = truth[block]
        kh = k_hat[i * group : (i + 1) * group]
        vh = v_hat[i * group : (i + 1) * group]
        # keys: one (scale, min) per head and channel, shared by the group's tokens
        _assert_within_bound(k, kh, page["k_scale"][None], page["k_min"][None])
        # values: one (scale, min) per head, token and channel group (stored token-minor)
        vs = page["v_scale"].permute(2, 0, 1).repeat_interleave(group, dim=-1)
        vm = page["v_min"].permute(2, 0, 1).repeat_interleave(group, dim=-1)
        _assert_within_bound(v, vh, vs, vm)
        # the codes in the page are the quantizer's codes, at the documented bit positions
        kc, ks, km = reference.quantize(k.permute(1, 0, 2), dim=1, bits=key_bits)
        assert torch.equal(_unpack_expected(page["k_codes"], key_bits), kc)
        assert torch.equal(ks.squeeze(1), page["k_scale"])
        assert torch.equal(km.squeeze(1), page["k_min"])
        vq = v.permute(1, 0, 2).unflatten(-1, (head_dim // group, group))
        vc, vsc, vmn = reference.quantize(vq, dim=-1, bits=bits)
        v_codes = page["v_codes"].transpose(-1, -2)  # stored [h, P, g]: tokens contiguous
        assert torch.equal(_unpack_expected(v_codes, bits), vc.flatten(-2))
        assert torch.equal(vsc.squeeze(-1), page["v_scale"].transpose(-1, -2))
        # and the dequantized page equals the quantizer's own reconstruction
        assert torch.equal(kh, reference.dequantize(kc, ks, km).permute(1, 0, 2))
        assert torch.equal(vh, reference.dequantize(vc, vsc, vmn).flatten(-2).permute(1, 0, 2))


# ----------------------------------------------------------------------------- store + read


def _expected_tail_start(ctx: int, group: int, residual: int) -> int:
    """Tokens of complete groups beyond the newest (residual - group) ones are paged."""
    complete = ctx // group * group
    return max(0, complete - (residual - group))


@pytest.mark.parametrize(
    "bits,group,residual,dtype",
    [
        (2, 32, 32, torch.float16),
        (2, 32, 64, torch.bfloat16),
        (4, 32, 128, torch.float16),
        (2, 64, 64, torch.float32),
        (4, 64, 128, torch.bfloat16),
    ],
)
def test_store_then_context_kv_many_steps(bits: int, group: int, residual: int, dtype) -> None:
    heads, head_dim = 2, 64
    fmt = PageFormat(bits, group, head_dim, heads)
    g = _gen(bits + group + residual)
    num_seqs, num_blocks = 3, 64
    cache = torch.randint(0, 256, (num_blocks, fmt.page_bytes), generator=g, dtype=torch.uint8)
    views = fmt.views(cache)
    num_slots = num_seqs + 1
    tail = torch.randn(2, num_slots, residual, heads, head_dim, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g)
    tables = [perm[i * 20 : (i + 1) * 20].to(torch.int32) for i in range(num_seqs)]
    slots = [2, 0, 3]  # not the row index
    true_k: list[torch.Tensor] = [torch.zeros(0, heads, head_dim, dtype=dtype)] * num_seqs
    true_v = list(true_k)
    steps = 0
    while min(len(t) for t in true_k) < 20 * group - 80:
        steps += 1
        for s in range(num_seqs):
            ctx = len(true_k[s])
            limit = 20 * group - ctx
            if limit <= 0:
                continue
            choice = int(torch.randint(0, 4, (1,), generator=g))
            q = [1, int(torch.randint(1, group + 1, (1,), generator=g)),
                 int(torch.randint(group, 3 * residual, (1,), generator=g)), group][choice]
            q = min(q, limit)
            k = (torch.randn(q, heads, head_dim, generator=g) * 2).to(dtype)
            v = torch.randn(q, heads, head_dim, generator=g).to(dtype)
            seq = reference.SeqStep(ctx, q, tables[s], slots[s], 0)
            reference.store(views, tail, k, v, seq, fmt, residual)
            true_k[s] = torch.cat([true_k[s], k])
            true_v[s] = torch.cat([true_v[s], v])
            end = ctx + q
            # every group completed in this step is in its page, bit for bit
            for grp in range(ctx // group, end // group):
                lo = grp * group
                page = reference.quantize_page(
                    true_k[s][lo : lo + group], true_v[s][lo : lo + group], fmt
                )
                block = int(tables[s][grp])
                for name, data in page.items():
                    assert torch.equal(views[name][block], data), (s, grp, name)
            # reading the context back: pages before the window, exact tokens after
            nxt = reference.SeqStep(end, 1, tables[s], slots[s], 0)
            ck, cv = reference.context_kv(views, tail, nxt, fmt, residual)
            assert ck.dtype == torch.float32 and ck.shape == (end, heads, head_dim)
            start = _expected_tail_start(end, group, residual)
            assert reference.tail_start(end, 0, group, residual) == start
            assert end - start < residual
            assert torch.equal(ck[start:], true_k[s][start:].float())
            assert torch.equal(cv[start:], true_v[s][start:].float())
            for grp in range(start // group):
                lo = grp * group
                kk = true_k[s][lo : lo + group].permute(1, 0, 2)
                kc, ks, km = reference.quantize(kk, dim=1, bits=bits)
                khat = reference.dequantize(kc, ks, km).permute(1, 0, 2)
                assert torch.equal(ck[lo : lo + group], khat)
                vv = true_v[s][lo : lo + group].permute(1, 0, 2)
                vv = vv.unflatten(-1, (head_dim // group, group))
                vc, vs, vm = reference.quantize(vv, dim=-1, bits=bits)
                vhat = reference.dequantize(vc, vs, vm).flatten(-2).permute(1, 0, 2)
                assert torch.equal(cv[lo : lo + group], vhat)
            if start:  # quantization really happened: pages differ from the truth
                assert not torch.equal(ck[:start], true_k[s][:start].float())
    assert steps > 5
