"""Levers ``kivi.rotate_keys``, ``kivi.layer_key_bits`` and ``kivi.fp8_scales``:
KiviAttentionImpl.forward driven directly (no engine).

The backend multiplies queries and keys by a normalized Hadamard matrix before both the
attention and the store; a layer named in ``layer_key_bits`` stores its keys with that
many bits. Checked here: with an exact (unquantized) context the attention output is
unchanged up to rounding; stored pages and tail rows hold the rotated keys (values
untouched) at the layer's key width; the output equals an independent fp32 computation
over the rotated, KIVI-reconstructed keys; start-up validation and the GPU refusal.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kivi_vllm import reference, state
from kivi_vllm.backend import KiviAttentionImpl, KiviMetadata
from kivi_vllm.config import KiviConfig, KiviConfigError
from kivi_vllm.page_format import PageFormat, layer_page_format

LAYER = "model.layers.0.self_attn.attn"
HEADS, KV_HEADS, D, G = 4, 2, 64, 32


class FakeLayer:
    layer_name = LAYER


@pytest.fixture
def fresh_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state, "_ACTIVE", None)
    monkeypatch.setattr(state, "_TAILS", {})


def _metadata(ctx: int, q_len: int, blocks: torch.Tensor) -> KiviMetadata:
    qsl = torch.tensor([0, q_len], dtype=torch.int32)
    seq_lens = torch.tensor([ctx + q_len], dtype=torch.int32)
    slots, valid_from = np.array([0], dtype=np.int32), np.array([0], dtype=np.int32)
    return KiviMetadata(
        num_actual_tokens=q_len, num_reqs=1, num_decodes=int(q_len == 1),
        num_decode_tokens=int(q_len == 1), max_query_len=q_len, max_seq_len=ctx + q_len,
        query_start_loc=qsl, seq_lens=seq_lens, block_table=blocks[None],
        slot_mapping=torch.arange(q_len, dtype=torch.int64),
        tail_slots=torch.from_numpy(slots), valid_from=torch.from_numpy(valid_from),
        query_start_loc_cpu=qsl, seq_lens_cpu=seq_lens, tail_slots_cpu=slots,
        valid_from_cpu=valid_from,
    )


def _run(cfg: KiviConfig, q, k, v, chunk: int, dtype: torch.dtype):
    """Feed one sequence chunk by chunk; return the outputs, the cache and the tail."""
    state.activate(cfg)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # as vLLM builds the model's layers
    try:
        impl = KiviAttentionImpl(HEADS, D, D**-0.5, KV_HEADS)
    finally:
        torch.set_default_dtype(default)
    state.allocate_tails([LAYER], 2, cfg.residual, KV_HEADS, D, dtype, torch.device("cpu"))
    n = q.shape[0]
    blocks = torch.arange(n // G + 1, dtype=torch.int32)
    fmt = layer_page_format(cfg, 0, D, KV_HEADS)  # LAYER is layer 0
    kv_cache = torch.zeros(len(blocks), fmt.page_bytes, dtype=torch.uint8)
    outs = []
    for start in range(0, n, chunk):
        sl = slice(start, min(start + chunk, n))
        m = sl.stop - sl.start
        out = torch.zeros(m, HEADS * D, dtype=dtype)
        impl.forward(FakeLayer(), q[sl].flatten(1).to(dtype), k[sl].flatten(1).to(dtype),
                     v[sl].flatten(1).to(dtype), kv_cache, _metadata(start, m, blocks),
                     output=out)
        outs.append(out.view(m, HEADS, D).float())
    return torch.cat(outs), impl, kv_cache, state.tail_for(LAYER)


def _qkv(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(n, h, D, generator=gen) for h in (HEADS, KV_HEADS, KV_HEADS))
    k[..., 3] *= 8  # an outlier channel, as real keys have
    return q, k, v


def _attention(q, k, v):
    """fp32 causal GQA over the whole sequence (independent of reference.attend)."""
    rep = HEADS // KV_HEADS
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = torch.einsum("qhd,khd->hqk", q, k) * D**-0.5
    s = s.masked_fill(torch.ones(len(q), len(q), dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), v)


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_rotation_leaves_exact_attention_unchanged(fresh_state, dtype, atol) -> None:
    """Every context row in the tail (96 tokens, residual 128): nothing is quantized, so
    rotating q and k changes the output only by rounding."""
    q, k, v = _qkv(96)
    plain, *_ = _run(KiviConfig(bits=2, residual=128), q, k, v, 32, dtype)
    rot, impl, _, tail = _run(KiviConfig(bits=2, residual=128, rotate_keys=True),
                              q, k, v, 32, dtype)
    assert impl.rotation is not None
    err = (rot - plain).abs().max().item()
    assert err <= atol, err
    if dtype == torch.float32:
        exact = _attention(q, k, v)
        assert (rot - exact).abs().max().item() <= atol
        h = reference.hadamard(D)
        assert torch.allclose(h @ h.T, torch.eye(D), atol=1e-6)
        assert torch.allclose(tail[0, 0, :96], k @ h, atol=1e-5)  # the tail holds k @ H
        assert torch.equal(tail[1, 0, :96], v)  # values untouched


LEVER_CASES = {  # name -> (config options, key bits of LAYER)
    "rotate": ({"rotate_keys": True}, 2),
    "key4": ({"layer_key_bits": {"0": 4}}, 4),
    "rotate+key4": ({"rotate_keys": True, "layer_key_bits": {"0": 4, "5": 4}}, 4),
    "other-layer": ({"layer_key_bits": {"1": 4}}, 2),
    "fp8": ({"fp8_scales": True}, 2),
    "rotate+key4+fp8": ({"rotate_keys": True, "layer_key_bits": {"0": 4},
                         "fp8_scales": True}, 4),
}


@pytest.mark.parametrize("case", list(LEVER_CASES))
@pytest.mark.parametrize("chunk", [32, 13, 1])
def test_levers_store_and_read_consistently(fresh_state, chunk, case) -> None:
    """Pages hold KIVI(k @ H) with the layer's key bits, values at 2 bits (and unrotated);
    the output equals fp32 attention of q @ H over the keys the cache must return."""
    options, key_bits = LEVER_CASES[case]
    n, cfg = 160, KiviConfig(bits=2, residual=32, **options)
    q, k, v = _qkv(n, seed=1)
    out, impl, kv_cache, _ = _run(cfg, q, k, v, chunk, torch.float32)
    assert (impl.fmt.k_bits, impl.fmt.v_bits) == (key_bits, 2)
    fp8 = cfg.fp8_scales
    assert kv_cache.shape[1] == PageFormat(2, G, D, KV_HEADS, key_bits=key_bits,
                                           fp8_scales=fp8).page_bytes
    h = reference.hadamard(D) if cfg.rotate_keys else torch.eye(D)
    kr = k @ h
    views = impl.fmt.views(kv_cache)
    pk, pv = reference.dequantize_pages(views, torch.arange(n // G), impl.fmt)
    want_k, want_v = kr.clone(), v.clone()
    for j in range(n // G):  # the pages: independent (de)quantization of each group
        sl = slice(j * G, (j + 1) * G)
        c, s, m = reference.quantize(kr[sl], dim=0, bits=key_bits, fp8_scale=fp8)
        want_k[sl] = reference.dequantize(c, s, m)
        c, s, m = reference.quantize(v[sl].unflatten(-1, (D // G, G)), dim=-1, bits=2,
                                     fp8_scale=fp8)
        want_v[sl] = reference.dequantize(c, s, m).flatten(-2)
    assert torch.allclose(pk, want_k[: n // G * G], atol=1e-5)
    assert torch.allclose(pv, want_v[: n // G * G], atol=1e-6)
    # expected output, query by query: groups older than the tail window read their page
    expected = torch.empty_like(out)
    for p in range(n):
        start = chunk * (p // chunk)  # the step's context length
        bound = reference.tail_start(start, 0, G, cfg.residual)
        kk = torch.cat([want_k[:bound], kr[bound : p + 1]])
        vv = torch.cat([want_v[:bound], v[bound : p + 1]])
        expected[p] = _attention((q @ h)[: p + 1], kk, vv)[p]
    assert (out - expected).abs().max().item() <= 1e-4
    plain, *_ = _run(KiviConfig(bits=2, residual=32), q, k, v, chunk, torch.float32)
    changed = (out - plain).abs().max().item()
    if case == "other-layer":  # another layer's key width leaves this one unchanged
        assert changed == 0.0
    else:
        assert changed > 1e-3  # the lever changes what is lost


def test_rotate_keys_config_and_gpu_refusal() -> None:
    from kivi_vllm.patches.platform import check_levers_supported

    cfg = KiviConfig.from_dict({"bits": 2, "residual": 96, "sink_groups": 1,
                                "rotate_keys": True})
    assert cfg.name == "kivi2-g32-r96-s1-rot" and cfg.to_dict()["rotate_keys"] is True
    assert "rotate_keys" not in KiviConfig().to_dict()
    with pytest.raises(KiviConfigError, match="kivi.rotate_keys must be true or false"):
        KiviConfig(rotate_keys=1)
    cfg.check_head_size(64)
    with pytest.raises(KiviConfigError, match="rotate_keys=true needs a power-of-two head "
                                              "size .* 96"):
        cfg.check_head_size(96)
    check_levers_supported(cfg, on_cpu=True)
    check_levers_supported(KiviConfig(rotate_keys=True), on_cpu=False)  # served on GPU
    with pytest.raises(ValueError, match="power-of-two"):
        reference.hadamard(96)


def test_random_hadamard_is_a_fixed_signed_hadamard() -> None:
    """diag(s) @ H with s in {-1, +1} drawn from the seed: orthogonal, reproducible
    (pinned signs: every process must build the same matrix), different per seed."""
    h = reference.hadamard(D)
    r0 = reference.random_hadamard(D, 0)
    assert r0.dtype == torch.float32
    assert torch.allclose(r0 @ r0.T, torch.eye(D), atol=1e-6)
    signs = r0[:, 0] * D**0.5  # hadamard's first column is all +1/sqrt(D)
    assert torch.equal(signs.abs(), torch.ones(D))
    assert torch.equal(r0, signs[:, None] * h)
    assert torch.equal(r0, reference.random_hadamard(D, 0))
    assert not torch.equal(r0, reference.random_hadamard(D, 1))
    pinned = [1, 1, -1, -1, 1, 1, 1, 1]  # torch.Generator().manual_seed(1), n = 8
    assert (reference.random_hadamard(8, 1)[:, 0] * 8**0.5).round().int().tolist() == pinned
    q, k = torch.randn(5, D), torch.randn(7, D)
    assert torch.allclose(reference.rotate(q, r0) @ reference.rotate(k, r0).T, q @ k.T,
                          atol=1e-5)
    with pytest.raises(ValueError, match="power-of-two"):
        reference.random_hadamard(96, 0)


def test_layer_key_bits_config() -> None:
    from kivi_vllm.patches.platform import check_levers_supported

    cfg = KiviConfig.from_dict({"bits": 2, "layer_key_bits": {"18": 4, "0": 4}})
    assert cfg.layer_key_bits == ((0, 4), (18, 4))
    assert (cfg.key_bits_of(0), cfg.key_bits_of(18), cfg.key_bits_of(1)) == (4, 4, 2)
    assert cfg.name == "kivi2-g32-r32-k0:4.18:4"
    assert cfg.to_dict()["layer_key_bits"] == {"0": 4, "18": 4}
    assert KiviConfig.from_dict(cfg.to_dict()) == cfg
    assert "layer_key_bits" not in KiviConfig().to_dict()
    cfg.check_num_layers(19)
    with pytest.raises(KiviConfigError, match=r"layer\(s\) \[18\].* 0 to 17"):
        cfg.check_num_layers(18)
    for bad, fragment in [({"0": 3}, r"kivi.layer_key_bits\[0\]=3 .* \(2, 4\)"),
                          ({"x": 4}, "layer indices >= 0"), ([0, 18], "mapping decoder layer"),
                          ({"0": True}, "allowed key bits")]:
        with pytest.raises(KiviConfigError, match=fragment):
            KiviConfig(bits=2, layer_key_bits=bad)
    with pytest.raises(KiviConfigError, match="layer_key_bits cannot be combined with "
                                              "kivi.fastgen"):
        KiviConfig(bits=2, layer_key_bits={"0": 4}, fastgen={"recovery": 0.95})
    check_levers_supported(cfg, on_cpu=False)  # served by the GPU kernels


def test_offline_lever_raising_values_only() -> None:
    """benchmarks/quality_levers.py: 4-bit values only (``hi_values``) reconstruct keys as
    2-bit and values as 4-bit, and cost what 4-bit keys only cost."""
    from types import SimpleNamespace

    from benchmarks.quality_levers import Lever, cost, fake_kv

    keys_only = Lever(hi_list=(0,), hi_keys=True)
    values_only = Lever(hi_list=(0,), hi_values=True)
    assert (keys_only.name, values_only.name) == ("kivi2-g32-r32+hi0k", "kivi2-g32-r32+hi0v")
    hf = SimpleNamespace(num_key_value_heads=3, num_hidden_layers=4, head_dim=64,
                         hidden_size=576, num_attention_heads=9)
    assert cost(keys_only, hf) == cost(values_only, hf) != cost(Lever(hi_list=(0,)), hf)
    k, v = torch.randn(2, 1, 2, 64, 64).unbind(0)
    kh2, vh4 = fake_kv(k, v, values_only, 2, 4)
    kh4, _ = fake_kv(k, v, values_only, 4, 4)
    _, vh2 = fake_kv(k, v, values_only, 2, 2)
    assert (v - vh4).norm() < 0.5 * (v - vh2).norm()
    assert (k - kh4).norm() < 0.5 * (k - kh2).norm()


def test_fp8_scales_round_to_the_nearest_e4m3_and_are_validated() -> None:
    """Scales become the nearest float8 e4m3 to the float32 scale (reconstruction within
    half a step plus the clamped codes' share of the rounding); the page shrinks by a byte
    per scale; config validation; FastGen refuses the option at start-up, the GPU serves
    it."""
    from kivi_vllm.patches.platform import check_levers_supported

    grid = torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # >= 0
    x = torch.rand(4000) * 500 * torch.rand(4000) ** 6
    got = reference.fp8_nearest(x).float()
    assert torch.all(got <= 448) and torch.all((got == 448) | (x < 448))
    best = (grid[None, :] - x.clamp(max=448)[:, None]).abs().amin(dim=1)
    assert torch.equal((got - x.clamp(max=448)).abs(), best)  # no e4m3 value is nearer
    xs = torch.randn(64, 8) * 3 + 5
    codes, scale, mn = reference.quantize(xs, dim=0, bits=2, fp8_scale=True)
    assert scale.dtype == torch.float8_e4m3fn and mn.dtype == torch.float16
    exact = (xs.amax(dim=0) - mn.float()) / 3
    assert (scale.float() - exact).abs().max() <= exact.max() / 16
    clipped = 3 * (exact - scale.float()).clamp(min=0)
    assert torch.all((reference.dequantize(codes, scale, mn) - xs).abs()
                     <= scale.float() / 2 + clipped + 1e-5)
    per_token = {fp8: PageFormat(2, G, D, 3, fp8_scales=fp8).page_bytes / G
                 for fp8 in (False, True)}
    assert per_token == {False: 144, True: 132}  # (64 + 64 / 32) scales x 3 heads
    cfg = KiviConfig(bits=2, fp8_scales=True)
    assert cfg.name == "kivi2-g32-r32-fp8s" and cfg.to_dict()["fp8_scales"] is True
    assert "fp8_scales" not in KiviConfig().to_dict()
    with pytest.raises(KiviConfigError, match="kivi.fp8_scales must be true or false"):
        KiviConfig(fp8_scales="yes")
    with pytest.raises(KiviConfigError, match="fp8_scales cannot be combined with kivi.fastgen"):
        KiviConfig(fp8_scales=True, fastgen={"recovery": 0.95})
    check_levers_supported(cfg, on_cpu=True)
    check_levers_supported(cfg, on_cpu=False)
