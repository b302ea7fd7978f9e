"""The KIVI config between processes: corrupted input fails at start-up with the option
and its allowed values; a worker whose KIVI config differs from the one its KV cache
pages were built for fails where the cache is bound, naming both configs.

How the config travels: ``additional_config={"kivi": {...}}`` (``--kv-bits``/
``--additional-config``) is parsed when the front end creates the engine config (the
platform hook; bad input fails there, before any process starts), then again in each
worker, whose ``Attention.get_kv_cache_spec`` builds a :class:`KiviAttentionSpec` carrying
the config's fingerprint. The engine core sizes the pages from those specs and sends the
resulting ``KVCacheConfig`` back to the workers, which check it in
``initialize_kv_cache``. No engine is started here.
"""

from __future__ import annotations

import json
import pickle
from types import SimpleNamespace

import pytest
import torch
from conftest import KIVI2, KIVI4

from kivi_vllm import state
from kivi_vllm.config import KiviConfig, KiviConfigError, config_fingerprint, kivi_config_from_vllm
from kivi_vllm.page_format import PageFormat

CORRUPTED = [  # additional_config["kivi"], fragments the error must name
    ("two", ["additional_config['kivi']", "JSON object", "'two'", "true", "false"]),
    ([2, 32], ["additional_config['kivi']", "JSON object"]),
    ('{"bits": 2}', ["additional_config['kivi']", "JSON object"]),  # JSON inside a string
    (None, ["additional_config['kivi'] is null", '{"bits": 2}', "false (KIVI off)"]),
    ({"bits": "two"}, ["kivi.bits", "integer", "'two'", "(2, 4)"]),
    ({"bits": None}, ["kivi.bits", "integer", "None", "(2, 4)"]),
    ({"bits": 2.0}, ["kivi.bits", "integer", "(2, 4)"]),
    ({"bits": {"value": 2}}, ["kivi.bits", "integer", "(2, 4)"]),
    ({"group_size": [32]}, ["kivi.group_size", "integer", "(32, 64, 128)"]),
    ({"residual": "32"}, ["kivi.residual", "integer", "multiple of group_size"]),
    ({"sink_groups": None}, ["kivi.sink_groups", "integer", ">= 0"]),
    ({"bits": True}, ["kivi.bits", "integer", "(2, 4)"]),
    ({"fastgen": "on"}, ["kivi.fastgen", "JSON object", "recovery"]),
    ({"fastgen": {"recovery": "high"}}, ["kivi.fastgen.recovery", "number"]),
    ({"fastgen": {"recovery": 0.9, "nested": {"x": 1}}}, ["nested", "recovery"]),
    ({"bits": 2, "kivi": {"bits": 4}}, ["['kivi']", "allowed options", "'bits'"]),
]


def _vllm_config(kivi, block_size: int = 32) -> SimpleNamespace:
    extra = {} if kivi is ... else {"kivi": kivi}
    return SimpleNamespace(additional_config=extra,
                           cache_config=SimpleNamespace(block_size=block_size))


@pytest.mark.parametrize("raw,fragments", CORRUPTED, ids=[repr(c[0]) for c in CORRUPTED])
def test_corrupted_kivi_config_fails(raw, fragments) -> None:
    with pytest.raises(KiviConfigError) as info:
        kivi_config_from_vllm(_vllm_config(raw))
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_kivi_switches() -> None:
    assert kivi_config_from_vllm(_vllm_config(...)) is None
    assert kivi_config_from_vllm(_vllm_config(False)) is None
    assert kivi_config_from_vllm(_vllm_config(True)) == KiviConfig()
    assert kivi_config_from_vllm(_vllm_config(KIVI2)) == KiviConfig(**KIVI2)


def test_cli_corrupted_input(default_model_path, capsys) -> None:
    """CLI paths: a --kv-bits that is no number, --additional-config that is not JSON
    (vLLM keeps a non-object string and its config validation names the option), and a
    kivi entry that is null reach the user as start-up errors, before any process."""
    from vllm.engine.arg_utils import EngineArgs

    from kivi_vllm.cli import build_vllm_argv

    with pytest.raises(SystemExit):
        build_vllm_argv([default_model_path, "--kv-bits", "two"])
    assert "--kv-bits" in capsys.readouterr().err
    for options, fragment in (("{oops", "--kv-options is not valid JSON"),
                              ("[1]", "must be a JSON object"),
                              ('{"bits": 2}', "use --kv-bits"),
                              ('{"layer_key_bits": {"0": 3}}', "allowed key bits")):
        with pytest.raises(KiviConfigError, match=fragment):
            build_vllm_argv([default_model_path, "--kv-options", options])
    argv = build_vllm_argv([default_model_path, "--kv-bits", "2", "--kv-residual", "96",
                            "--kv-options", '{"sink_groups": 1, "layer_key_bits": {"0": 4}}'])
    config = json.loads(argv[argv.index("--additional-config") + 1])["kivi"]
    assert config == {"bits": 2, "group_size": 32, "residual": 96, "sink_groups": 1,
                      "layer_key_bits": {"0": 4}}
    for bad, fragments in (("notjson", ["additional_config", "valid dictionary"]),
                           ({"kivi": None}, ["additional_config['kivi'] is null"])):
        with pytest.raises(ValueError) as info:
            EngineArgs(model=default_model_path, additional_config=bad).create_engine_config()
        for fragment in fragments:
            assert fragment in str(info.value), (fragment, str(info.value))


# ------------------------------------------------------------- mismatch between processes


@pytest.fixture
def patched(monkeypatch):
    """vLLM with the KIVI patches applied; this process's activated config restored."""
    from kivi_vllm.patches import apply_all

    apply_all()
    monkeypatch.setattr(state, "_ACTIVE", None)


def _layer(name: str) -> SimpleNamespace:
    """The attributes ``Attention.get_kv_cache_spec`` reads (SmolLM2: 3 KV heads of 64)."""
    from vllm.v1.attention.backend import AttentionType

    return SimpleNamespace(
        layer_name=name, attn_type=AttentionType.DECODER, kv_cache_dtype="auto",
        sliding_window=None, num_kv_heads=3, head_size=64, head_size_v=64,
        kv_cache_torch_dtype=torch.bfloat16,
    )


def _worker_specs(kivi) -> dict:
    """The specs a worker reports, through the patched ``Attention.get_kv_cache_spec``."""
    from vllm.model_executor.layers.attention.attention import Attention

    cfg = _vllm_config(kivi)
    return {n: Attention.get_kv_cache_spec(_layer(n), cfg)
            for n in (f"model.layers.{i}.self_attn.attn" for i in range(4))}


@pytest.fixture(scope="module")
def engine_config(default_model_path):
    """A real engine config (KIVI-2 on SmolLM2), as the front end creates it."""
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=default_model_path, max_model_len=1024,
                      additional_config={"kivi": KIVI2}).create_engine_config()


def _engine_core_config(engine_config, specs: dict, num_blocks: int = 64):
    """The engine core's KVCacheConfig for one worker, after the trip to the worker."""
    from vllm.v1.core.kv_cache_utils import get_kv_cache_configs

    page = next(iter(specs.values())).page_size_bytes
    (config,) = get_kv_cache_configs(engine_config, [specs], [num_blocks * page * len(specs)])
    assert config.num_blocks == num_blocks
    return pickle.loads(pickle.dumps(config))


def test_spec_carries_the_config(patched) -> None:
    from kivi_vllm.spec import KiviAttentionSpec

    specs = _worker_specs(KIVI2)
    spec = next(iter(specs.values()))
    assert isinstance(spec, KiviAttentionSpec)
    assert spec.kivi_config == config_fingerprint(KiviConfig(**KIVI2))
    assert '"bits":2' in spec.kivi_config and '"residual":32' in spec.kivi_config
    assert config_fingerprint(KiviConfig(**KIVI2)) != config_fingerprint(
        KiviConfig(**{**KIVI2, "residual": 64}))


def test_layer_key_bits_specs_form_one_group(patched, engine_config) -> None:
    """kivi.layer_key_bits: a wider layer's spec has larger pages, so the specs do not
    merge; vLLM keeps one group of per-layer specs (one block table) and sizes each
    layer's tensor by its own page."""
    from vllm.v1.core.kv_cache_utils import get_kv_cache_configs
    from vllm.v1.kv_cache_interface import UniformTypeKVCacheSpecs

    from kivi_vllm.patches.attention_spec import check_bound_config

    kivi = {**KIVI2, "layer_key_bits": {"1": 4}}
    specs = _worker_specs(kivi)
    names = list(specs)
    assert [specs[n].kivi_key_bits for n in names] == [0, 4, 0, 0]
    assert specs[names[1]].page_format == PageFormat(2, 32, 64, 3, key_bits=4)
    plain, wide = specs[names[0]].page_size_bytes, specs[names[1]].page_size_bytes
    assert wide > plain
    with pytest.raises(AssertionError, match="different key bits"):
        type(specs[names[0]]).merge(list(specs.values()))
    (config,) = get_kv_cache_configs(engine_config, [specs], [64 * (3 * plain + wide)])
    (group,) = config.kv_cache_groups
    assert isinstance(group.kv_cache_spec, UniformTypeKVCacheSpecs)
    assert config.num_blocks == 64
    assert {t.shared_by[0]: t.size for t in config.kv_cache_tensors} == {
        n: 64 * specs[n].page_size_bytes for n in names}
    check_bound_config(config, _vllm_config(kivi))  # every layer's spec checked


def test_matching_config_binds(patched, engine_config) -> None:
    from kivi_vllm.patches.attention_spec import check_bound_config

    kv_cache_config = _engine_core_config(engine_config, _worker_specs(KIVI2))
    (group,) = kv_cache_config.kv_cache_groups
    assert group.kv_cache_spec.kivi_config == config_fingerprint(KiviConfig(**KIVI2))
    check_bound_config(kv_cache_config, _vllm_config(KIVI2))  # no error


@pytest.mark.parametrize("worker_kivi,activated,fragments", [
    (KIVI4, None, ["this worker's engine config", '"bits":4']),  # the worker was given KIVI-4
    (KIVI2, KIVI4, ["activated config", '"bits":4']),  # its process activated KIVI-4 since
    ({**KIVI2, "residual": 64}, None, ['"residual":64']),  # same page bytes, another tail
    (..., None, ["none (KIVI off)"]),  # the worker runs without KIVI
], ids=["engine-config", "process-activated", "residual", "kivi-off"])
def test_mismatched_worker_fails_at_binding(
    patched, engine_config, worker_kivi, activated, fragments
) -> None:
    """Pages built for KIVI-2 (G32, R32) bound by a worker reading another config: the
    patched ``initialize_kv_cache`` fails before any tensor is made, naming both."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    kv_cache_config = _engine_core_config(engine_config, _worker_specs(KIVI2))
    if activated is not None:
        state.activate(KiviConfig(**activated))
    runner = SimpleNamespace(vllm_config=_vllm_config(worker_kivi))
    with pytest.raises(KiviConfigError) as info:
        GPUModelRunner.initialize_kv_cache(runner, kv_cache_config)
    message = str(info.value)
    for fragment in ["KIVI config mismatch", config_fingerprint(KiviConfig(**KIVI2)),
                     "bits=2, group_size=32", *fragments]:
        assert fragment in message, (fragment, message)


def test_kivi_worker_refuses_unquantized_pages(patched, engine_config) -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    kv_cache_config = _engine_core_config(engine_config, _worker_specs(...))  # stock bf16 specs
    runner = SimpleNamespace(vllm_config=_vllm_config(KIVI2))
    with pytest.raises(KiviConfigError, match=r"FullAttentionSpec \(unquantized "
                       r"torch.bfloat16 pages\).*\"bits\":2"):
        GPUModelRunner.initialize_kv_cache(runner, kv_cache_config)


def test_group_of_mixed_configs_fails(patched) -> None:
    from kivi_vllm.spec import KiviAttentionSpec

    a = next(iter(_worker_specs(KIVI2).values()))
    b = next(iter(_worker_specs({**KIVI2, "residual": 64}).values()))
    assert a.page_size_bytes == b.page_size_bytes
    with pytest.raises(KiviConfigError, match="different KIVI configs"):
        KiviAttentionSpec.merge([a, b])
    assert KiviAttentionSpec.merge([a, a]).kivi_config == a.kivi_config


def test_cpu_amx_switch_keeps_stock_attention_off_amx(monkeypatch):
    """KIVI_CPU_ATTN_NO_AMX=1 maps vLLM's CPU attention ISA "amx" to "vec" and leaves the
    other choices alone; without it the stock choice is untouched."""
    from vllm.v1.attention.backends import cpu_attn

    from kivi_vllm.patches import cpu_amx

    stock = cpu_attn._get_attn_isa
    while hasattr(stock, "__wrapped__"):  # the patch this process applied at start-up
        stock = stock.__wrapped__
    monkeypatch.setattr(cpu_attn, "_get_attn_isa", stock)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    monkeypatch.delenv(cpu_amx.ENV, raising=False)
    cpu_amx.apply()
    assert cpu_attn._get_attn_isa(torch.bfloat16, 128) == "amx"
    monkeypatch.setenv(cpu_amx.ENV, "1")
    cpu_amx.apply()
    assert cpu_attn._get_attn_isa(torch.bfloat16, 128) == "vec"
    assert cpu_attn._get_attn_isa(torch.bfloat16, 16) == "vec16"  # not AMX: unchanged
