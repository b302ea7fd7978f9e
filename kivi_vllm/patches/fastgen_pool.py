"""FastGen's head-page pool in vLLM: one KV tensor for all layers, page reports.

With ``kivi.fastgen`` every layer reports a :class:`FastGenAttentionSpec` whose block is
one head-page. These wrappers (no-ops for any other spec) make vLLM

* allocate one tensor shared by all layers, ``num_blocks = budget // head_page``
  (vLLM's general case gives each layer its own tensor, so one block id would cost a
  page in every layer), and count a block as one page in its capacity figures;
* hand the worker's page reports (``ModelRunnerOutput.kivi_fastgen_reports``) to the
  FastGen manager in ``Scheduler.update_from_output``, before the next ``schedule()``.
"""

from __future__ import annotations

import functools
from typing import Any

from vllm.utils.math_utils import cdiv
from vllm.v1.core import kv_cache_utils
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheTensor

from kivi_vllm.fastgen.manager import (
    FastGenAttentionSpec,
    apply_runner_reports,
    register_fastgen_spec,
)


def _fastgen_spec(kv_cache_groups: list[Any]) -> FastGenAttentionSpec | None:
    if len(kv_cache_groups) == 1 and isinstance(
        kv_cache_groups[0].kv_cache_spec, FastGenAttentionSpec
    ):
        return kv_cache_groups[0].kv_cache_spec
    return None


def head_page_pool_config(
    vllm_config: Any, kv_cache_groups: list[Any], available_memory: int
) -> KVCacheConfig:
    """One tensor of ``num_blocks`` head-pages, viewed by every layer."""
    spec = _fastgen_spec(kv_cache_groups)
    assert spec is not None
    register_fastgen_spec(vllm_config)  # before the scheduler builds its managers
    num_blocks = available_memory // spec.page_size_bytes
    num_blocks = kv_cache_utils.may_override_num_blocks(vllm_config, num_blocks)
    tensor = KVCacheTensor(
        size=num_blocks * spec.page_size_bytes, shared_by=list(kv_cache_groups[0].layer_names)
    )
    return KVCacheConfig(
        num_blocks=num_blocks, kv_cache_tensors=[tensor], kv_cache_groups=kv_cache_groups
    )


def apply() -> None:
    original_config = kv_cache_utils.get_kv_cache_config_from_groups

    @functools.wraps(original_config)
    def get_kv_cache_config_from_groups(vllm_config, kv_cache_groups, available_memory):
        if _fastgen_spec(kv_cache_groups) is not None:
            return head_page_pool_config(vllm_config, kv_cache_groups, available_memory)
        return original_config(vllm_config, kv_cache_groups, available_memory)

    kv_cache_utils.get_kv_cache_config_from_groups = get_kv_cache_config_from_groups

    original_pool_bytes = kv_cache_utils._pool_bytes_per_block

    @functools.wraps(original_pool_bytes)
    def _pool_bytes_per_block(vllm_config, kv_cache_groups):
        spec = _fastgen_spec(kv_cache_groups)
        if spec is not None:
            return spec.page_size_bytes
        return original_pool_bytes(vllm_config, kv_cache_groups)

    kv_cache_utils._pool_bytes_per_block = _pool_bytes_per_block

    original_concurrency = kv_cache_utils.get_max_concurrency_for_kv_cache_config

    @functools.wraps(original_concurrency)
    def get_max_concurrency_for_kv_cache_config(vllm_config, kv_cache_config):
        spec = _fastgen_spec(kv_cache_config.kv_cache_groups)
        if spec is None:
            return original_concurrency(vllm_config, kv_cache_config)
        max_len = vllm_config.model_config.max_model_len
        per_request = spec.fastgen_heads * cdiv(max_len, spec.block_size)  # unprofiled
        return kv_cache_config.num_blocks / per_request

    kv_cache_utils.get_max_concurrency_for_kv_cache_config = (
        get_max_concurrency_for_kv_cache_config
    )

    original_update = Scheduler.update_from_output

    @functools.wraps(original_update)
    def update_from_output(self, scheduler_output, model_runner_output):
        apply_runner_reports(self.kv_cache_manager, model_runner_output)
        return original_update(self, scheduler_output, model_runner_output)

    Scheduler.update_from_output = update_from_output
