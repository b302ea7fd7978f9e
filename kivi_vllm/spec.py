"""The KV cache spec of a KIVI layer: vLLM's full-attention spec with KIVI pages."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Self

from vllm.v1.kv_cache_interface import FullAttentionSpec

from kivi_vllm.config import KiviConfig, KiviConfigError, config_fingerprint
from kivi_vllm.page_format import PageFormat


@dataclass(frozen=True, kw_only=True)
class KiviAttentionSpec(FullAttentionSpec):
    """Pages of ``block_size == group_size`` tokens in the KIVI format (uint8 storage).

    ``kivi_config`` is the fingerprint (:func:`config_fingerprint`) of the whole KIVI
    config the pages were sized for; the worker checks it where the cache is bound.
    ``kivi_key_bits``: this layer's key width where ``kivi.layer_key_bits`` sets one (0 =
    ``kivi_bits``); ``kivi_fp8_scales``: ``kivi.fp8_scales``. Layers whose widths differ
    do not merge: vLLM then keeps one KV cache group of per-layer specs
    (``UniformTypeKVCacheSpecs``: one block table, one tensor per layer sized by its own
    page).
    """

    kivi_bits: int = 2
    kivi_group: int = 32
    kivi_config: str = ""
    kivi_key_bits: int = 0
    kivi_fp8_scales: bool = False

    @property
    def page_format(self) -> PageFormat:
        return PageFormat(self.kivi_bits, self.kivi_group, self.head_size, self.num_kv_heads,
                          key_bits=self.kivi_key_bits, fp8_scales=self.kivi_fp8_scales)

    @property
    def real_page_size_bytes(self) -> int:
        return self.page_format.page_bytes

    @classmethod
    def merge(cls, specs: list[Self]) -> Self:
        merged = super().merge(specs)
        first = specs[0]
        configs = sorted({s.kivi_config for s in specs})
        if len(configs) > 1 or any(
            (s.kivi_bits, s.kivi_group) != (first.kivi_bits, first.kivi_group) for s in specs
        ):
            raise KiviConfigError(
                f"the KIVI layers of one KV cache group were built for different KIVI "
                f"configs {configs}; every layer must share one config"
            )
        # vLLM's signal (as FullAttentionSpec.merge gives it) that the layers' pages differ
        assert len({s.kivi_key_bits for s in specs}) == 1, (
            "KIVI layers with different key bits have different page sizes")
        return replace(merged, kivi_bits=first.kivi_bits, kivi_group=first.kivi_group,
                       kivi_config=first.kivi_config, kivi_key_bits=first.kivi_key_bits,
                       kivi_fp8_scales=first.kivi_fp8_scales)

    def check_config(self, cfg: KiviConfig | None, who: str) -> None:
        """Fail unless ``cfg`` (the KIVI config ``who`` reads pages with) is the one
        these pages were built for; None means ``who`` has KIVI switched off."""
        active = "none (KIVI off)" if cfg is None else config_fingerprint(cfg)
        if cfg is None or active != self.kivi_config or (cfg.bits, cfg.group_size) != (
            self.kivi_bits, self.kivi_group
        ):
            raise KiviConfigError(
                f"KIVI config mismatch: the KV cache spec (pages of {self.page_size_bytes} "
                f"bytes) was built for kivi config {self.kivi_config or '<unknown>'} "
                f"(bits={self.kivi_bits}, group_size={self.kivi_group}), but {who} has "
                f"kivi config {active}; every process must get the same "
                "--additional-config '{\"kivi\": ...}'"
            )


def register_spec() -> None:
    """Register the spec with vLLM's KV cache spec registry (full-attention manager)."""
    from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    KVCacheSpecRegistry.register(
        KiviAttentionSpec, FullAttentionManager, uniform_type_base_spec=FullAttentionSpec
    )
