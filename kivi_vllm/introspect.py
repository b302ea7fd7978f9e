"""Worker-side figures for tests, metrics and benchmarks (``LLM.collective_rpc``)."""

from __future__ import annotations

from typing import Any

from kivi_vllm import state


def kivi_stats(worker: Any = None) -> dict[str, int]:
    """Tail slots in use (now and at most), slot count, packed groups and tail bytes."""
    tails = state.STEP.tails
    return {
        "tail_slots_in_use": tails.in_use if tails else 0,
        "tail_slots": tails.num_slots if tails else 0,
        "tail_slots_peak": tails.peak_in_use if tails else 0,
        "quantized_groups": tails.quantized_groups if tails else 0,
        "tail_bytes": state.tail_bytes_allocated(),
    }
