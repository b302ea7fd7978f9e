"""Carve the full-precision tails out of the memory vLLM gives to KV pages."""

from __future__ import annotations

import functools

from vllm.logger import init_logger

from kivi_vllm.config import kivi_config_from_vllm
from kivi_vllm.memory import tail_budget_bytes

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
        logger.info(
            "KIVI: %.3f GiB of the %.3f GiB KV budget holds full-precision tails",
            tails / 2**30,
            available / 2**30,
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
