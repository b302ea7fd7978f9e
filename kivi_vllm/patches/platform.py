"""Validate KIVI at start-up and point vLLM's backend selection at the KIVI backend."""

from __future__ import annotations

import functools
import os
from typing import Any

from vllm.config import get_current_vllm_config_or_none
from vllm.logger import init_logger
from vllm.platforms import current_platform
from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

from kivi_vllm.config import (
    ALLOWED_BITS,
    ALLOWED_GROUP_SIZES,
    KiviConfig,
    KiviConfigError,
    kivi_config_from_vllm,
)
from kivi_vllm.memory import DEVICE_WORKER_ENV, fastgen_device_worker

logger = init_logger("vllm.kivi")

BACKEND_PATH = "kivi_vllm.backend.KiviAttentionBackend"
_V2_RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"


def check_engine_config(vllm_config: Any, cfg: KiviConfig) -> None:
    """Raise :class:`KiviConfigError` for any engine feature KIVI cannot serve."""
    model_config = vllm_config.model_config
    cache_config = vllm_config.cache_config
    if cache_config.cache_dtype != "auto":
        raise KiviConfigError(
            f"kv_cache_dtype={cache_config.cache_dtype!r} cannot be combined with "
            "KIVI (the KIVI pages are the cache format); allowed: 'auto'"
        )
    if model_config.use_mla:
        raise KiviConfigError("KIVI does not support MLA models (use_mla=True)")
    if model_config.is_encoder_decoder:
        raise KiviConfigError("KIVI does not support encoder-decoder attention")
    if vllm_config.speculative_config is not None:
        raise KiviConfigError(
            "KIVI does not support speculative decoding yet; remove --speculative-config"
        )
    if getattr(model_config, "is_hybrid", False) or model_config.is_attention_free:
        raise KiviConfigError("KIVI supports pure-attention decoder models only")
    hf = model_config.hf_text_config
    layer_types = getattr(hf, "layer_types", None) or []
    if model_config.get_sliding_window() is not None or any(
        t != "full_attention" for t in layer_types
    ):
        raise KiviConfigError(
            "KIVI does not support sliding-window (or other non-full) attention layers"
        )
    head_size = model_config.get_head_size()
    from kivi_vllm.backend import KiviAttentionBackend

    if head_size not in KiviAttentionBackend.get_supported_head_sizes():
        raise KiviConfigError(
            f"head size {head_size} is not supported by KIVI; allowed: "
            f"{KiviAttentionBackend.get_supported_head_sizes()}"
        )
    cfg.check_head_size(head_size)
    cfg.check_num_layers(model_config.get_total_num_hidden_layers())
    if cache_config.user_specified_block_size and cache_config.block_size != cfg.group_size:
        raise KiviConfigError(
            f"--block-size {cache_config.block_size} conflicts with kivi.group_size="
            f"{cfg.group_size}: a KIVI page holds exactly one group; omit --block-size "
            f"or set it to {cfg.group_size}"
        )
    check_levers_supported(cfg)
    if os.environ.get(_V2_RUNNER_ENV, "") in ("1", "true", "True"):
        raise KiviConfigError(
            f"KIVI runs on vLLM's V1 model runner; unset {_V2_RUNNER_ENV} or set it to 0"
        )
    if cfg.fastgen is not None:
        check_fastgen_supported(cfg, vllm_config)
    if not current_platform.is_cpu():
        check_gpu_kernel_shape(cfg, head_size, model_config.get_total_num_kv_heads())
        backend = vllm_config.attention_config.backend
        if backend not in (None, AttentionBackendEnum.CUSTOM):
            raise KiviConfigError(
                f"--attention-backend {backend.name} cannot serve KIVI pages; "
                "allowed: CUSTOM (or leave it unset)"
            )


def check_gpu_kernel_shape(cfg: KiviConfig, head_size: int, kv_heads: int) -> None:
    """The CUDA read kernel covers fewer (bits, group, head size) combinations than the
    CPU reference path: refuse the others at start-up, naming what would work."""
    from kivi_vllm.kernels.attention import kernel_supports
    from kivi_vllm.page_format import PageFormat

    def ok(bits: int, group: int, key_bits: int = 0) -> bool:
        return head_size % group == 0 and kernel_supports(
            PageFormat(bits, group, head_size, kv_heads, key_bits=key_bits))

    if ok(cfg.bits, cfg.group_size):
        for _layer, key_bits in cfg.layer_key_bits:
            if not ok(cfg.bits, cfg.group_size, key_bits):
                raise KiviConfigError(
                    f"kivi.layer_key_bits: {key_bits}-bit keys with {cfg.bits}-bit values, "
                    f"kivi.group_size={cfg.group_size} and head size {head_size} are not "
                    "served by the GPU kernels; allowed: omit kivi.layer_key_bits on GPU "
                    "for this model")
        return
    allowed = [f"bits={b}, group_size={g}" for b in ALLOWED_BITS for g in ALLOWED_GROUP_SIZES
               if ok(b, g)]
    raise KiviConfigError(
        f"kivi.bits={cfg.bits} with kivi.group_size={cfg.group_size} and head size "
        f"{head_size} is not served by the GPU kernels yet; allowed on GPU for this "
        f"model: {allowed or 'none (use the CPU build)'}"
    )


# Levers (KiviConfig.levers) the CUDA path serves: rotate_keys is applied before dispatch
# (KiviAttentionImpl.forward), sink_groups and layer_key_bits (per-layer key widths of the
# page format) and fp8_scales (float8 scales, decoded with integer ops) are read and
# written by the Triton kernels.
GPU_LEVERS = ("rotate_keys", "sink_groups", "layer_key_bits", "fp8_scales")


def check_levers_supported(cfg: KiviConfig, on_cpu: bool | None = None) -> None:
    """Refuse on GPU the levers only the CPU reference path implements (none of today's;
    a lever added to the config must be added to ``GPU_LEVERS`` once the GPU serves it)."""
    if on_cpu is None:
        on_cpu = current_platform.is_cpu()
    missing = {k: v for k, v in cfg.levers.items() if k not in GPU_LEVERS}
    if missing and not on_cpu:
        names = ", ".join(f"kivi.{k}={v}" for k, v in missing.items())
        raise KiviConfigError(
            f"{names} is implemented in the CPU reference path only (the CUDA kernels do "
            f"not serve it yet); remove it on GPU (served on GPU: {', '.join(GPU_LEVERS)})"
        )


def check_fastgen_supported(cfg: KiviConfig, vllm_config: Any) -> None:
    """FastGen's head-pages: no sinks, no speculative decoding; on the GPU, whole prompts."""
    device_worker = fastgen_device_worker(cfg)
    if device_worker and current_platform.is_cpu() and os.environ.get("TRITON_INTERPRET") != "1":
        raise KiviConfigError(
            f"{DEVICE_WORKER_ENV}=1 runs FastGen's GPU worker on the CPU, where its Triton "
            f"kernels need TRITON_INTERPRET=1 (set both, or neither: the CPU worker)"
        )
    if device_worker and vllm_config.scheduler_config.enable_chunked_prefill:
        raise KiviConfigError(
            "kivi.fastgen on the GPU profiles each prompt in the step that prefills it whole: "
            "set enable_chunked_prefill=False (--no-enable-chunked-prefill) with "
            "max_num_batched_tokens >= max_model_len"
        )
    cfg.fastgen.require_token_classes(vllm_config.model_config.skip_tokenizer_init)
    if cfg.sink_groups:
        raise KiviConfigError(
            f"kivi.fastgen does not combine with kivi.sink_groups={cfg.sink_groups} "
            "(FastGen keeps special tokens itself); use kivi.sink_groups=0"
        )
    if vllm_config.speculative_config is not None:
        raise KiviConfigError(
            "kivi.fastgen does not serve speculative decoding (the worker reports each "
            "request's head-pages for one new token per step); remove --speculative-config"
        )


def configure_engine(vllm_config: Any, cfg: KiviConfig) -> None:
    """Tie the block size to the group and select the KIVI backend and V1 runner."""
    cache_config = vllm_config.cache_config
    cache_config.block_size = cfg.group_size
    cache_config.user_specified_block_size = True
    vllm_config.model_config.disable_cascade_attn = True
    os.environ[_V2_RUNNER_ENV] = "0"
    if not current_platform.is_cpu():
        vllm_config.attention_config.backend = AttentionBackendEnum.CUSTOM
    logger.info("KIVI KV cache: %s (block size %d)", cfg.name, cfg.group_size)
    if cfg.fastgen is not None:
        cache_config.enable_prefix_caching = False
        vllm_config.scheduler_config.async_scheduling = False
        logger.warning(
            "KIVI FastGen (recovery %s): blocks are head-pages; prefix caching and async "
            "scheduling off (the scheduler frees evicted heads' pages from each step's "
            "report before it schedules the next; docs/fastgen.md)", cfg.fastgen.recovery,
        )


def apply() -> None:
    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)
    platform_cls = type(current_platform)
    original_check = platform_cls.check_and_update_config.__func__

    @functools.wraps(original_check)
    def check_and_update_config(cls, vllm_config) -> None:
        original_check(cls, vllm_config)
        cfg = kivi_config_from_vllm(vllm_config)
        if cfg is None or vllm_config.model_config is None:
            return
        check_engine_config(vllm_config, cfg)
        configure_engine(vllm_config, cfg)

    platform_cls.check_and_update_config = classmethod(check_and_update_config)

    if current_platform.is_cpu():
        _override_cpu_backend(platform_cls)


def _override_cpu_backend(platform_cls: type) -> None:
    """The CPU platform always returns CPU_ATTN: point it at KIVI when configured."""
    original_get = platform_cls.get_attn_backend_cls.__func__

    @functools.wraps(original_get)
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        cpu_attn = AttentionBackendEnum.CPU_ATTN
        if kivi_config_from_vllm(get_current_vllm_config_or_none()) is not None:
            register_backend(cpu_attn, BACKEND_PATH)
        elif cpu_attn.get_path() == BACKEND_PATH:
            cpu_attn.clear_override()
        return original_get(cls, selected_backend, attn_selector_config, num_heads)

    platform_cls.get_attn_backend_cls = classmethod(get_attn_backend_cls)
