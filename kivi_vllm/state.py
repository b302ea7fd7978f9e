"""Per-process KIVI state: the active config, the tail rings and the step binding."""

from __future__ import annotations

import torch

from kivi_vllm.config import KiviConfig, KiviConfigError
from kivi_vllm.tail import STEP

__all__ = ["STEP", "activate", "active_config", "allocate_tails", "tail_for"]

_ACTIVE: KiviConfig | None = None
_TAILS: dict[str, torch.Tensor] = {}


def activate(cfg: KiviConfig) -> None:
    """Record the engine's KIVI config in this process (worker side)."""
    global _ACTIVE
    _ACTIVE = cfg


def activated_config() -> KiviConfig | None:
    """The config this process activated, or None (no fallback to the vLLM config)."""
    return _ACTIVE


def active_config() -> KiviConfig:
    if _ACTIVE is None:
        from vllm.config import get_current_vllm_config_or_none

        from kivi_vllm.config import kivi_config_from_vllm

        cfg = kivi_config_from_vllm(get_current_vllm_config_or_none())
        if cfg is None:
            raise KiviConfigError(
                "the KIVI backend was selected but no KIVI config is set; pass "
                """--additional-config '{"kivi": {"bits": 2}}'"""
            )
        activate(cfg)
    assert _ACTIVE is not None
    return _ACTIVE


def allocate_tails(
    layer_names: list[str],
    num_slots: int,
    residual: int,
    num_kv_heads: int,
    head_size: int,
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    """One ``[2, num_slots, residual, kv_heads, head_size]`` ring buffer per layer."""
    shape = (2, num_slots, residual, num_kv_heads, head_size)
    for name in layer_names:
        buf = _TAILS.get(name)
        if buf is None or buf.shape != shape or buf.device != device:
            _TAILS[name] = torch.zeros(shape, dtype=dtype, device=device)


def tail_for(layer_name: str) -> torch.Tensor:
    return _TAILS[layer_name]


def tail_bytes_allocated() -> int:
    return sum(t.numel() * t.element_size() for t in _TAILS.values())
