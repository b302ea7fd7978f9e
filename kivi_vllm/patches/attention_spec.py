"""Make KIVI layers report a :class:`KiviAttentionSpec` (smaller uint8 pages)."""

from __future__ import annotations

import functools

import torch
from vllm.model_executor.layers.attention.attention import Attention
from vllm.v1.core import single_type_kv_cache_manager as managers
from vllm.v1.kv_cache_interface import FullAttentionSpec

from kivi_vllm import state
from kivi_vllm.config import KiviConfigError, kivi_config_from_vllm
from kivi_vllm.spec import KiviAttentionSpec, register_spec


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
        return KiviAttentionSpec(
            block_size=spec.block_size,
            num_kv_heads=spec.num_kv_heads,
            head_size=spec.head_size,
            head_size_v=spec.head_size_v,
            dtype=torch.uint8,
            kivi_bits=cfg.bits,
            kivi_group=cfg.group_size,
        )

    Attention.get_kv_cache_spec = get_kv_cache_spec

    original_register = managers.register_all_kvcache_specs

    @functools.wraps(original_register)
    def register_all_kvcache_specs(vllm_config):
        original_register(vllm_config)
        register_spec()

    managers.register_all_kvcache_specs = register_all_kvcache_specs
