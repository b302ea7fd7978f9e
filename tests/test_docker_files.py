"""What can be checked of the Docker deployment without a Docker engine (fast)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from kivi_vllm.patches import SUPPORTED_VLLM

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE = ROOT / "docker" / "compose.yaml"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_serve_help_runs() -> None:
    for cmd in (
        [sys.executable, "-m", "kivi_vllm.cli", "serve", "--help"],
        [shutil.which("kivi-vllm") or str(Path(sys.executable).parent / "kivi-vllm"), "serve",
         "--help"],
    ):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        for flag in ("--kv-bits", "--kv-group", "--kv-residual", "--kv-options", "--no-kivi"):
            assert flag in out.stdout


def test_dockerfile_base_image_matches_pinned_vllm() -> None:
    froms = [args for word, args in instructions(DOCKERFILE) if word == "FROM"]
    assert froms == [f"vllm/vllm-openai:v{SUPPORTED_VLLM}"]
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(rf'^gpu = \[[^]]*"vllm=={re.escape(SUPPORTED_VLLM)}"', pyproject, re.M)


def test_dockerfile_entrypoint_and_copies() -> None:
    ins = instructions(DOCKERFILE)
    entry = [json.loads(args) for word, args in ins if word == "ENTRYPOINT"]
    assert entry == [["kivi-vllm", "serve"]]
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^kivi-vllm = "kivi_vllm\.cli:main"$', pyproject, re.M)
    for word, args in ins:
        if word == "COPY":
            for src in args.split()[:-1]:
                assert (ROOT / src).exists(), f"COPY source {src} missing"
    ignore = (ROOT / "docker" / "Dockerfile.dockerignore").read_text().split()
    for word, args in ins:  # every COPY source survives the ignore file
        if word == "COPY":
            for src in args.split()[:-1]:
                assert f"!{src}" in ignore or f"!{src}/" in ignore, src


def test_compose_references_the_dockerfile() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    (service,) = compose["services"].values()
    build = service["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert context == ROOT
    assert (context / build["dockerfile"]).resolve() == DOCKERFILE
    assert any(p.endswith(":8000") for p in service["ports"])
    mounts = [v.split(":")[1] for v in service["volumes"]]
    assert "/root/.cache/huggingface" in mounts and "/root/.cache/kivi-vllm" in mounts


def test_readme_documents_docker_metrics_and_ray() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "docker build -f docker/Dockerfile" in readme
    assert "docker/compose.yaml" in readme
    assert "--distributed-executor-backend ray" in readme
    from kivi_vllm.metrics import METRIC_NAMES

    for name in METRIC_NAMES:
        assert name in readme, name
