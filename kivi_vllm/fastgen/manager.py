"""Scheduler side of FastGen: head-page accounting in vLLM's block pool.

With FastGen a vLLM block is a *head-page*: ``G`` kept tokens of one (layer, KV head)
in KIVI form (docs/fastgen.md, section 3). Until a request is profiled every head is
full, so it holds ``heads x cdiv(tokens, G)`` head-pages (``heads`` = layers x KV
heads: exactly the bytes of the unmodified KIVI cache). After profiling, the worker
compacts each head's kept tokens into the front of the request's page list and
reports ``(keep, need)``: the manager frees the entries past ``keep`` to the block
pool at once, where the next ``allocate_slots`` of any request finds them, and from
then on holds ``need`` pages (the worker's bound for its next step) instead of the
token count's.

The worker side (per-head pages, compaction, the reports) is
:mod:`kivi_vllm.fastgen.engine`; the patches that make the pool and carry the reports
are in :mod:`kivi_vllm.patches.fastgen_pool`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Self

from vllm.utils.math_utils import cdiv
from vllm.v1.core.kv_cache_utils import KVCacheBlock
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager

from kivi_vllm.page_format import PageFormat
from kivi_vllm.spec import KiviAttentionSpec

REPORT_ATTR = "kivi_fastgen_reports"  # attribute the worker sets on ModelRunnerOutput


@dataclass(frozen=True, kw_only=True)
class FastGenAttentionSpec(KiviAttentionSpec):
    """KIVI spec whose block is one head-page; ``fastgen_heads`` (layers x KV heads)
    head-pages make one token-block of an unprofiled request."""

    fastgen_heads: int = 1

    @property
    def real_page_size_bytes(self) -> int:
        return PageFormat(self.kivi_bits, self.kivi_group, self.head_size, 1).page_bytes

    def max_num_blocks_per_req(self, vllm_config: Any, max_len: int) -> int:
        """Block-table row width: every head of every layer, whole length."""
        return self.fastgen_heads * cdiv(max_len, self.block_size)

    def max_memory_usage_bytes(self, vllm_config: Any) -> int:
        """Per layer (vLLM sums over layers): all KV heads of the layer, unprofiled."""
        return self.num_kv_heads * super().max_memory_usage_bytes(vllm_config)

    @classmethod
    def merge(cls, specs: list[Self]) -> Self:
        merged = super().merge(specs)
        assert len({s.fastgen_heads for s in specs}) == 1
        return replace(merged, fastgen_heads=specs[0].fastgen_heads)


@dataclass(frozen=True)
class PageReport:
    """A worker's word on one request: keep the first ``keep`` list entries (free the
    rest) and hold ``need`` head-pages for its next token.

    With ``tokens >= 0`` (tokens stored so far) and ``streams`` (kept-token streams) a
    step of ``k > 1`` tokens may take up to ``keep + streams * cdiv(k, G)`` head-pages
    (each stream packs at most ``cdiv(k, G)`` new pages); ``need`` covers ``k = 1``.
    """

    keep: int
    need: int
    tokens: int = -1
    streams: int = 0


class FastGenManager(FullAttentionManager):
    """Allocates head-pages: token-count demand until profiled, the worker's after."""

    def __init__(self, kv_cache_spec: FastGenAttentionSpec, **kwargs: Any) -> None:
        if kwargs.get("enable_caching"):
            raise ValueError("FastGen requires prefix caching off (enable_prefix_caching=False)")
        super().__init__(kv_cache_spec, **kwargs)
        self.heads = kv_cache_spec.fastgen_heads
        self._need: dict[str, PageReport] = {}  # profiled requests -> latest report

    def required_pages(self, request_id: str, num_tokens: int) -> int:
        report = self._need.get(request_id)
        if report is None:
            return self.heads * cdiv(num_tokens, self.block_size)
        new_tokens = num_tokens - report.tokens
        if report.tokens < 0 or new_tokens <= 1:
            return report.need
        return max(report.need, report.keep + report.streams * cdiv(new_tokens, self.block_size))

    def get_num_blocks_to_allocate(
        self,
        request_id: str,
        num_tokens: int,
        new_computed_blocks: Sequence[KVCacheBlock],
        total_computed_tokens: int,
        num_local_computed_tokens: int,
        num_tokens_main_model: int,
        apply_admission_cap: bool = False,
    ) -> int:
        assert not new_computed_blocks, "FastGen runs without prefix caching"
        held = len(self.req_to_blocks.get(request_id, ()))
        return max(self.required_pages(request_id, num_tokens) - held, 0)

    def allocate_new_blocks(
        self, request_id: str, num_tokens: int, num_tokens_main_model: int
    ) -> list[KVCacheBlock]:
        blocks = self.req_to_blocks[request_id]
        missing = self.required_pages(request_id, num_tokens) - len(blocks)
        if missing <= 0:
            return []
        new = self.block_pool.get_new_blocks(missing)
        blocks.extend(new)
        return new

    def apply_report(self, request_id: str, report: PageReport) -> int:
        """Free the entries past ``report.keep``; returns how many went back to the pool.

        Reports for requests that finished or were preempted meanwhile are dropped.
        """
        if request_id not in self.req_to_blocks:
            return 0
        blocks = self.req_to_blocks[request_id]
        if not 0 <= report.keep <= len(blocks) or report.need < report.keep:
            raise ValueError(
                f"bad FastGen report for {request_id}: keep={report.keep}, "
                f"need={report.need}, held={len(blocks)}"
            )
        freed = blocks[report.keep :]
        del blocks[report.keep :]
        self.block_pool.free_blocks(reversed(freed))
        self._need[request_id] = report
        return len(freed)

    def free(self, request_id: str) -> None:
        self._need.pop(request_id, None)
        super().free(request_id)

    def pop_blocks_for_free(self, request_id: str) -> list[KVCacheBlock]:
        self._need.pop(request_id, None)
        return super().pop_blocks_for_free(request_id)

    @property
    def profiled_requests(self) -> int:
        return len(self._need)


def apply_runner_reports(kv_cache_manager: Any, model_runner_output: Any) -> int:
    """Hand the worker's reports (``ModelRunnerOutput.kivi_fastgen_reports``:
    ``{req_id: PageReport}``) to the FastGen managers; returns head-pages freed.

    Meant for a wrapper of ``Scheduler.update_from_output`` (before the next schedule).
    """
    reports: Mapping[str, PageReport] = getattr(model_runner_output, REPORT_ATTR, None) or {}
    freed = 0
    for manager in kv_cache_manager.coordinator.single_type_managers:
        if isinstance(manager, FastGenManager):
            for req_id, report in reports.items():
                freed += manager.apply_report(req_id, report)
    return freed


def register_fastgen_spec(vllm_config: Any = None) -> None:
    """Register the head-page spec with vLLM's spec registry (FastGen manager).

    vLLM registers its built-in specs only while the registry is empty, so they go
    first; without this entry the MRO lookup would give the spec vLLM's
    ``FullAttentionManager`` (token blocks, no reports)."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    KVCacheSpecRegistry._ensure_registered(vllm_config)
    KVCacheSpecRegistry.register(
        FastGenAttentionSpec, FastGenManager, uniform_type_base_spec=FullAttentionSpec
    )
