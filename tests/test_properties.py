"""Property-based tests (hypothesis) of the KIVI quantizer, bit packing and page format.

Random shapes, bits and groups, constant groups, magnitudes from float16 subnormals to
the float16 maximum, and non-finite inputs. No engine; bounded example counts (< 30 s).

Rule for values the fp16 (scale, min) pair cannot describe (tested below): a slice
(one quantization group) that holds inf or NaN, or whose values leave the float16 range
so far that its min or scale overflows, gets a non-finite scale or min and dequantizes
to NaN in *every* element: the fault propagates into attention instead of turning into
finite garbage. Its codes are still in ``[0, 2**bits - 1]`` (so packing never spills
into a neighbouring bit plane), and other slices are unaffected. Any slice whose values
lie within +-65504 gets a finite scale and min, and the error bound holds.
"""

from __future__ import annotations

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kivi_vllm import reference  # noqa: E402
from kivi_vllm.page_format import PageFormat  # noqa: E402

FP16_MAX = 65504.0
REL_SLACK = 1e-6  # fp32 arithmetic, relative to the magnitudes involved
SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])

bits_st = st.sampled_from([2, 4])
finite_fp16 = st.floats(min_value=-FP16_MAX, max_value=FP16_MAX, allow_nan=False)
tiny = st.floats(min_value=-1e-6, max_value=1e-6, allow_nan=False)
moderate = st.floats(min_value=-100.0, max_value=100.0, allow_nan=False)
near_max = st.floats(min_value=6.0e4, max_value=FP16_MAX).flatmap(
    lambda v: st.sampled_from([v, -v]))
element = st.one_of(moderate, tiny, near_max, finite_fp16, st.just(0.0))


@st.composite
def groups(draw, elements=element, max_rows: int = 4, max_len: int = 64) -> torch.Tensor:
    """[rows, length] float32: each row one quantization slice (dim=1)."""
    rows = draw(st.integers(1, max_rows))
    length = draw(st.integers(1, max_len))
    data = draw(st.lists(elements, min_size=rows * length, max_size=rows * length))
    return torch.tensor(data, dtype=torch.float32).view(rows, length)


def _check_bound(x: torch.Tensor, codes, scale, mn, bits: int) -> None:
    qmax = (1 << bits) - 1
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert int(codes.max()) <= qmax
    assert torch.isfinite(scale).all() and torch.isfinite(mn).all() and (scale >= 0).all()
    assert (mn.float() <= x.amin(dim=1, keepdim=True)).all()
    xhat = reference.dequantize(codes, scale, mn)
    err = (x - xhat).abs()
    s, m = scale.float().expand_as(x), mn.float().expand_as(x)
    bound = s / 2 + REL_SLACK * (x.abs() + m.abs() + s)
    assert (err <= bound).all(), f"worst excess {(err - bound).max().item():.3g}"


@SETTINGS
@given(x=groups(), bits=bits_st)
def test_quantize_error_bound_within_fp16_range(x: torch.Tensor, bits: int) -> None:
    codes, scale, mn = reference.quantize(x, dim=1, bits=bits)
    assert scale.shape == mn.shape == (x.shape[0], 1)
    _check_bound(x, codes, scale, mn, bits)


@SETTINGS
@given(value=element, length=st.integers(1, 128), bits=bits_st)
def test_quantize_constant_group(value: float, length: int, bits: int) -> None:
    x = torch.full((1, length), value)
    codes, scale, mn = reference.quantize(x, dim=1, bits=bits)
    _check_bound(x, codes, scale, mn, bits)
    if float(torch.tensor(value).half().float()) == value:  # exactly representable
        assert scale.item() == 0 and (codes == 0).all()
        assert torch.equal(reference.dequantize(codes, scale, mn), x)


@SETTINGS
@given(
    x=groups(elements=st.one_of(moderate, tiny), max_rows=6),
    bad=st.sampled_from([math.inf, -math.inf, math.nan, 1e6, -1e6, 3e38]),
    data=st.data(), bits=bits_st,
)
def test_quantize_non_finite_or_out_of_range_poisons_only_its_group(
    x: torch.Tensor, bad: float, data, bits: int
) -> None:
    row = data.draw(st.integers(0, x.shape[0] - 1))
    col = data.draw(st.integers(0, x.shape[1] - 1))
    x[row, col] = bad
    codes, scale, mn = reference.quantize(x, dim=1, bits=bits)
    assert int(codes.max()) <= (1 << bits) - 1  # defined codes, even for NaN quotients
    xhat = reference.dequantize(codes, scale, mn)
    poisoned = ~(torch.isfinite(scale) & torch.isfinite(mn)).squeeze(1)
    # A lone +-1e6 among values <= 100 always overflows the fp16 scale (or min).
    assert poisoned.tolist() == [r == row for r in range(x.shape[0])]
    assert torch.isnan(xhat[row]).all()
    keep = [r for r in range(x.shape[0]) if r != row]
    if keep:
        _check_bound(x[keep], codes[keep], scale[keep], mn[keep], bits)


@SETTINGS
@given(x=groups(elements=st.floats(min_value=-3e38, max_value=3e38)), bits=bits_st)
def test_quantize_any_finite_input_is_bounded_or_poisoned(x: torch.Tensor, bits: int) -> None:
    """Beyond the fp16 range (bf16 activations can be): a slice either keeps the bound
    or (its scale or min overflowed) dequantizes to NaN entirely, never finite garbage."""
    codes, scale, mn = reference.quantize(x, dim=1, bits=bits)
    assert int(codes.max()) <= (1 << bits) - 1
    ok = (torch.isfinite(scale) & torch.isfinite(mn)).squeeze(1)
    xhat = reference.dequantize(codes, scale, mn)
    assert torch.isnan(xhat[~ok]).all()
    within = x.abs().amax(dim=1) <= FP16_MAX
    assert ok[within].all()
    if ok.any():
        _check_bound(x[ok], codes[ok], scale[ok], mn[ok], bits)


@SETTINGS
@given(
    bits=bits_st, lead=st.lists(st.integers(1, 4), max_size=3),
    planes=st.integers(1, 32), seed=st.integers(0, 2**31 - 1),
)
def test_pack_unpack_round_trip(bits: int, lead: list[int], planes: int, seed: int) -> None:
    cpb = 8 // bits
    shape = (*lead, planes * cpb)
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, shape, generator=g, dtype=torch.uint8)
    packed = reference.pack_planar(codes, bits)
    assert packed.shape == (*lead, planes) and packed.dtype == torch.uint8
    assert torch.equal(reference.unpack_planar(packed, bits), codes)
    # and every byte is a valid packing: unpack then pack is the identity on bytes
    raw = torch.randint(0, 256, (*lead, planes), generator=g, dtype=torch.uint8)
    assert torch.equal(reference.pack_planar(reference.unpack_planar(raw, bits), bits), raw)


@st.composite
def page_formats(draw) -> PageFormat:
    bits = draw(bits_st)
    group = draw(st.sampled_from([8, 16, 32, 64, 128]))
    head_dim = group * draw(st.integers(1, 4))
    if head_dim % 8:
        head_dim *= 8
    return PageFormat(bits, group, head_dim, draw(st.integers(1, 8)), key_bits=draw(bits_st))


@SETTINGS
@given(fmt=page_formats())
def test_page_sections_disjoint_aligned_and_views_own_their_bytes(fmt: PageFormat) -> None:
    spans = []
    for offset, shape, dtype in fmt.sections.values():
        assert offset % dtype.itemsize == 0
        spans.append((offset, offset + math.prod(shape) * dtype.itemsize))
    assert spans[0][0] == 0
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert end == start  # in order, disjoint, no gaps
    assert fmt.page_bytes % 16 == 0 and 0 <= fmt.page_bytes - spans[-1][1] < 16
    cache = torch.zeros(3, fmt.page_bytes, dtype=torch.uint8)
    views = fmt.views(cache)
    for i, name in enumerate(fmt.sections):
        views[name][1].view(torch.uint8).fill_(i + 1)
    for i, (start, end) in enumerate(spans):
        assert (cache[1, start:end] == i + 1).all()
    assert (cache[1, spans[-1][1]:] == 0).all() and (cache[[0, 2]] == 0).all()


@settings(max_examples=25, deadline=None, derandomize=True)
@given(fmt=page_formats(), seed=st.integers(0, 2**31 - 1),
       magnitude=st.sampled_from([1e-4, 1.0, 300.0, 3e4]))
def test_page_round_trip_bound(fmt: PageFormat, seed: int, magnitude: float) -> None:
    g = torch.Generator().manual_seed(seed)
    shape = (fmt.group_size, fmt.num_kv_heads, fmt.head_dim)
    k = (torch.rand(shape, generator=g) * 2 - 1) * magnitude
    v = (torch.rand(shape, generator=g) * 2 - 1) * magnitude
    cache = torch.randint(0, 256, (2, fmt.page_bytes), generator=g, dtype=torch.uint8)
    views = fmt.views(cache)
    for name, data in reference.quantize_page(k, v, fmt).items():
        views[name][1] = data
    k_hat, v_hat = reference.dequantize_pages(views, torch.tensor([1]), fmt)
    # per-element bound: half the largest step any slice may use, + fp16 min rounding
    for x, xh, bits in ((k, k_hat, fmt.k_bits), (v, v_hat, fmt.v_bits)):
        qmax = (1 << bits) - 1
        step = 2 * magnitude / qmax * (1 + 2**-10) + 6e-8
        assert ((x - xh).abs() <= step / 2 + REL_SLACK * magnitude + 2 * magnitude * 2**-11).all()
