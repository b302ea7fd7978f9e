"""Make KIVI layers report a :class:`KiviAttentionSpec` (smaller uint8 pages)."""

from __future__ import annotations

import functools

import torch
from vllm.model_executor.layers.attention.attention import Attention
from vllm.v1.core import single_type_kv_cache_manager as managers
from vllm.v1.kv_cache_interface import FullAttentionSpec, UniformTypeKVCacheSpecs
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from kivi_vllm import state
from kivi_vllm.config import (
    KiviConfig,
    KiviConfigError,
    config_fingerprint,
    kivi_config_from_vllm,
)
from kivi_vllm.fastgen.manager import FastGenAttentionSpec, register_fastgen_spec
from kivi_vllm.memory import num_attention_layers
from kivi_vllm.page_format import layer_page_format
from kivi_vllm.spec import KiviAttentionSpec, register_spec


def check_bound_config(kv_cache_config, vllm_config) -> None:
    """Where a worker binds its KV cache: every KIVI page must be in the format of the
    KIVI config this worker reads with (its engine config and the config its process
    activated), and a KIVI worker must not get pages of another format."""
    cfg = kivi_config_from_vllm(vllm_config)
    activated = state.activated_config()
    for group in kv_cache_config.kv_cache_groups:
        spec = group.kv_cache_spec
        specs = spec.kv_cache_specs.values() if isinstance(spec, UniformTypeKVCacheSpecs) else [
            spec]
        for s in specs:
            if isinstance(s, KiviAttentionSpec):
                s.check_config(cfg, "this worker's engine config")
                if activated is not None:
                    s.check_config(activated, "this worker process (activated config)")
            elif cfg is not None and isinstance(s, FullAttentionSpec):
                raise KiviConfigError(
                    f"KIVI config mismatch: layers {group.layer_names[:3]} got a "
                    f"{type(s).__name__} (unquantized {s.dtype} pages), but this worker "
                    f"has kivi config {config_fingerprint(cfg)}; every process must get "
                    "the same --additional-config"
                )


def _layer_key_bits(cfg: KiviConfig, layer_name: str, spec: FullAttentionSpec) -> int:
    """The layer's ``PageFormat.key_bits`` (0 = ``kivi.bits``) under ``kivi.layer_key_bits``."""
    if not cfg.layer_key_bits:
        return 0
    from vllm.model_executor.models.utils import extract_layer_index

    layer = extract_layer_index(layer_name)
    return layer_page_format(cfg, layer, spec.head_size, spec.num_kv_heads).key_bits


def apply() -> None:
    original_spec = Attention.get_kv_cache_spec

    @functools.wraps(original_spec)
    def get_kv_cache_spec(self: Attention, vllm_config):
        spec = original_spec(self, vllm_config)
        cfg = kivi_config_from_vllm(vllm_config)
        if cfg is None or spec is None:
            return spec
        if type(spec) is not FullAttentionSpec or spec.sliding_window is not None:
            raise KiviConfigError(
                f"layer {self.layer_name}: KIVI serves full decoder attention only, "
                f"not {type(spec).__name__}"
            )
        state.activate(cfg)
        fields = dict(
            block_size=spec.block_size,
            num_kv_heads=spec.num_kv_heads,
            head_size=spec.head_size,
            head_size_v=spec.head_size_v,
            dtype=torch.uint8,
            kivi_bits=cfg.bits,
            kivi_group=cfg.group_size,
            kivi_config=config_fingerprint(cfg),
            kivi_key_bits=_layer_key_bits(cfg, self.layer_name, spec),
            kivi_fp8_scales=cfg.fp8_scales,
        )
        if cfg.fastgen is not None:  # a block is one head-page of one (layer, KV head)
            heads = num_attention_layers(vllm_config) * spec.num_kv_heads
            return FastGenAttentionSpec(**fields, fastgen_heads=heads)
        return KiviAttentionSpec(**fields)

    Attention.get_kv_cache_spec = get_kv_cache_spec

    original_register = managers.register_all_kvcache_specs

    @functools.wraps(original_register)
    def register_all_kvcache_specs(vllm_config):
        original_register(vllm_config)
        register_spec()
        register_fastgen_spec()

    managers.register_all_kvcache_specs = register_all_kvcache_specs

    original_init_kv = GPUModelRunner.initialize_kv_cache

    @functools.wraps(original_init_kv)
    def initialize_kv_cache(self: GPUModelRunner, kv_cache_config, *args, **kwargs):
        check_bound_config(kv_cache_config, self.vllm_config)
        return original_init_kv(self, kv_cache_config, *args, **kwargs)

    GPUModelRunner.initialize_kv_cache = initialize_kv_cache
