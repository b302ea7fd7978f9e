"""The KV cache spec of a KIVI layer: vLLM's full-attention spec with KIVI pages."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Self

from vllm.v1.kv_cache_interface import FullAttentionSpec

from kivi_vllm.page_format import PageFormat


@dataclass(frozen=True, kw_only=True)
class KiviAttentionSpec(FullAttentionSpec):
    """Pages of ``block_size == group_size`` tokens in the KIVI format (uint8 storage)."""

    kivi_bits: int = 2
    kivi_group: int = 32

    @property
    def page_format(self) -> PageFormat:
        return PageFormat(self.kivi_bits, self.kivi_group, self.head_size, self.num_kv_heads)

    @property
    def real_page_size_bytes(self) -> int:
        return self.page_format.page_bytes

    @classmethod
    def merge(cls, specs: list[Self]) -> Self:
        merged = super().merge(specs)
        first = specs[0]
        assert all(
            (s.kivi_bits, s.kivi_group) == (first.kivi_bits, first.kivi_group)
            for s in specs
        ), "All KIVI layers of a KV cache group must share bits and group size."
        return replace(merged, kivi_bits=first.kivi_bits, kivi_group=first.kivi_group)


def register_spec() -> None:
    """Register the spec with vLLM's KV cache spec registry (full-attention manager)."""
    from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    KVCacheSpecRegistry.register(
        KiviAttentionSpec, FullAttentionManager, uniform_type_base_spec=FullAttentionSpec
    )
