"""How much memory the full-precision tails take, carved from vLLM's KV budget."""

from __future__ import annotations

import os
from typing import Any

from kivi_vllm.config import KiviConfig
from kivi_vllm.page_format import PageFormat, kivi_bytes_per_token, layer_page_format


def num_tail_slots(vllm_config: Any) -> int:
    """One slot per schedulable sequence (max_num_seqs)."""
    return int(vllm_config.scheduler_config.max_num_seqs)


def num_ring_slots(vllm_config: Any) -> int:
    """Rows of each layer's tail buffer: the sequence slots plus one scratch slot."""
    return num_tail_slots(vllm_config) + 1


def layer_format(vllm_config: Any, cfg: KiviConfig) -> PageFormat:
    """The page format of a layer without a key-width override (``kivi.layer_key_bits``)."""
    model_config = vllm_config.model_config
    return layer_page_format(cfg, None, model_config.get_head_size(),
                             model_config.get_num_kv_heads(vllm_config.parallel_config))


def num_attention_layers(vllm_config: Any) -> int:
    model_config = vllm_config.model_config
    return model_config.get_num_layers_by_block_type(
        vllm_config.parallel_config, "attention"
    )


def model_bytes_per_token(vllm_config: Any, cfg: KiviConfig) -> float:
    """KIVI page bytes per token of this worker's attention layers together (its
    pipeline stage's layers, its tensor-parallel share of the KV heads; no tails)."""
    fmt = layer_format(vllm_config, cfg)
    start, end = vllm_config.model_config.get_layers_start_end_indices(
        vllm_config.parallel_config)
    return kivi_bytes_per_token(cfg, fmt.head_dim, fmt.num_kv_heads, end - start, start)


def tail_bytes_per_layer(vllm_config: Any, cfg: KiviConfig) -> int:
    """Tail ring bytes of one layer: all slots plus the scratch slot."""
    fmt = layer_format(vllm_config, cfg)
    dtype_size = vllm_config.model_config.dtype.itemsize
    per_slot = fmt.tail_bytes_per_slot(cfg.residual, dtype_size)
    return per_slot * num_ring_slots(vllm_config) * tail_streams(cfg)


DEVICE_WORKER_ENV = "KIVI_FASTGEN_DEVICE_WORKER"


def fastgen_device_worker(cfg: KiviConfig) -> bool:
    """kivi.fastgen runs on the device worker (:mod:`kivi_vllm.fastgen.device`): on the
    GPU, and on the CPU when ``KIVI_FASTGEN_DEVICE_WORKER=1`` (its Triton kernels then
    run under ``TRITON_INTERPRET=1``: the GPU path's engine behaviour without a GPU)."""
    from vllm.platforms import current_platform

    on_cpu = current_platform.is_cpu() and os.environ.get(DEVICE_WORKER_ENV, "0") != "1"
    return cfg.fastgen is not None and not on_cpu


def tail_streams(cfg: KiviConfig) -> int:
    """Tail rings per KV head and slot: 2 for the FastGen device worker (a permanent and
    a local stream, :mod:`kivi_vllm.fastgen.device`), else 1."""
    return 2 if fastgen_device_worker(cfg) else 1


def tail_budget_bytes(vllm_config: Any, cfg: KiviConfig) -> int:
    """Bytes of all tails of this worker, subtracted from the KV cache budget."""
    return tail_bytes_per_layer(vllm_config, cfg) * num_attention_layers(vllm_config)
