#!/usr/bin/env bash
# ./run.sh serve [MODEL] [flags]  - set up, then serve with KIVI (default: SmolLM2, KIVI-4)
# ./run.sh test [pytest args]     - set up, then run the test suite
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
cmd=${1:-serve}
shift || true
case "$cmd" in
  serve) exec .venv/bin/kivi-vllm serve "$@" ;;
  test) exec .venv/bin/python -m pytest "$@" ;;
  *) echo "usage: ./run.sh serve|test [args]" >&2; exit 2 ;;
esac
