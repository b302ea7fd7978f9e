"""Shared pieces of the benchmarks: the dummy Llama-3.1-8B shape and KV settings."""

from __future__ import annotations

import json
import os
import tempfile

LLAMA_8B_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}


def dummy_llama8b_dir() -> str:
    """A folder holding only the Llama-3.1-8B-shaped config.json (for load_format=dummy)."""
    path = os.path.join(tempfile.gettempdir(), "kivi-llama8b-shape")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(LLAMA_8B_CONFIG, f)
    return path


# name -> LLM keyword arguments of that KV cache setting
KV_SETTINGS: dict[str, dict] = {
    "bf16": {},
    "fp8": {"kv_cache_dtype": "fp8"},
    "int4_per_token_head": {
        "kv_cache_dtype": "int4_per_token_head",
        "attention_backend": "TRITON_ATTN",
    },
    "kivi4": {"additional_config": {"kivi": {"bits": 4, "group_size": 32, "residual": 32}}},
    "kivi2": {"additional_config": {"kivi": {"bits": 2, "group_size": 32, "residual": 32}}},
}


def kv_fields(name: str) -> dict:
    """Record fields that name a KV setting (group and residual for KIVI)."""
    kivi = KV_SETTINGS[name].get("additional_config", {}).get("kivi")
    if kivi is None:
        return {"kv": name}
    return {"kv": name, "group_size": kivi["group_size"], "residual": kivi["residual"]}


def kivi_env() -> dict[str, str]:
    """The ``KIVI_*`` environment settings of this run (kernel switches, launch settings)."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("KIVI_")}
