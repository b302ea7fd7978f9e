"""kivi-vllm: KIVI 2/4-bit paged KV cache for vLLM 0.26."""

from kivi_vllm.config import KiviConfig, KiviConfigError

__version__ = "0.1.0"
__all__ = ["KiviConfig", "KiviConfigError", "register"]


def register() -> None:
    """vLLM general-plugin entry point: apply the version-gated patches."""
    from kivi_vllm.patches import apply_all

    apply_all()
