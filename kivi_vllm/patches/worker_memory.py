"""Carve the full-precision tails out of the memory vLLM gives to KV pages."""

from __future__ import annotations

import functools

from vllm.logger import init_logger

from kivi_vllm.config import kivi_config_from_vllm
from kivi_vllm.memory import (
    layer_format,
    model_bytes_per_token,
    num_attention_layers,
    tail_budget_bytes,
)
from kivi_vllm.page_format import bf16_bytes_per_token

logger = init_logger("vllm.kivi")


def _wrap(worker_cls: type) -> None:
    original = worker_cls.determine_available_memory
    if getattr(original, "_kivi_wrapped", False):
        return

    @functools.wraps(original)
    def determine_available_memory(self) -> int:
        available = original(self)
        cfg = kivi_config_from_vllm(self.vllm_config)
        if cfg is None:
            return available
        tails = tail_budget_bytes(self.vllm_config, cfg)
        if tails >= available:
            raise RuntimeError(
                f"KIVI tails need {tails / 2**30:.2f} GiB but the KV budget is "
                f"{available / 2**30:.2f} GiB; lower max_num_seqs or kivi.residual"
            )
        fmt = layer_format(self.vllm_config, cfg)
        layers = num_attention_layers(self.vllm_config)
        dtype_size = self.vllm_config.model_config.dtype.itemsize
        per_token = model_bytes_per_token(self.vllm_config, cfg)
        kivi_tokens = int((available - tails) // (per_token * fmt.block_size)) * fmt.block_size
        bf16_per_token = bf16_bytes_per_token(fmt.num_kv_heads, fmt.head_dim, dtype_size)
        dense_tokens = available // (bf16_per_token * layers)
        logger.info(
            "KIVI %s: %.1f bytes/token/layer (unquantized: %d); %.3f of %.3f GiB hold "
            "full-precision tails; ~%d KV cache tokens vs ~%d unquantized (%.2fx)",
            cfg.name, per_token / layers, bf16_per_token, tails / 2**30, available / 2**30,
            kivi_tokens, dense_tokens, kivi_tokens / max(1, dense_tokens),
        )
        return available - tails

    determine_available_memory._kivi_wrapped = True  # type: ignore[attr-defined]
    worker_cls.determine_available_memory = determine_available_memory


def apply() -> None:
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from vllm.v1.worker.cpu_worker import CPUWorker

        _wrap(CPUWorker)
    else:
        from vllm.v1.worker.gpu_worker import Worker

        _wrap(Worker)
