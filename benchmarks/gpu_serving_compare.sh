#!/usr/bin/env bash
# Serving comparison on a GPU host: bf16 / fp8 / KIVI-4 / KIVI-2 servers in turn
# (Llama-3.1-8B shape from benchmarks/common.py, dummy weights, token-id prompts, no
# tokenizer, no network), the load test at rising concurrency against each, then the
# plot and a markdown table of every setting measured so far.
#
#   bash benchmarks/gpu_serving_compare.sh                 # all four settings
#   bash benchmarks/gpu_serving_compare.sh bf16 fp8        # some (e.g. to fit a time limit)
#   bash benchmarks/gpu_serving_compare.sh report          # only plot + table
#
# A setting whose JSON exists is skipped (FORCE=1 reruns it), so later calls finish the
# set: on an H100 a setting takes roughly 3-5 minutes (server start with compilation and
# CUDA graphs, then the levels), so run one or two settings per 10-minute call.
# Writes under $OUT_DIR (default: $OUT/serving if $OUT is set, else
# benchmarks/results/serving): <setting>.json, <setting>.log (server), serving.png,
# serving.md. Knobs (env): CONCURRENCY (1,16,64,256), INPUT_LEN (1024), OUTPUT_LEN (256),
# REQ_PER_C (2 requests per unit of concurrency, at least MIN_REQ=16), MAX_NUM_SEQS (512),
# GPU_MEM (0.90), MODEL_DIR (dummy 8B config), LOAD_FORMAT (dummy), SERVER_ARGS (extra
# server flags), PYTHON (python3). The kivi-vllm plugin must be installed (entry point);
# if it is not, the script installs this checkout with --no-deps into /tmp/site (as
# scripts/gpu_run.sh does) and puts it on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export VLLM_USE_FLASHINFER_SAMPLER=${VLLM_USE_FLASHINFER_SAMPLER:-0} PYTHONUNBUFFERED=1
# The plugin must be installed (its vllm.general_plugins entry point), not merely importable
# from this folder, or the KIVI flags would reach an engine without the KIVI patches.
has_plugin='from importlib.metadata import entry_points as e
assert any(p.name == "kivi" for p in e(group="vllm.general_plugins"))'
if ! $PY -c "$has_plugin" 2>/dev/null; then
  $PY -m pip install -q --no-deps --no-build-isolation --no-compile --target /tmp/site .
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
OUT_DIR=${OUT_DIR:-${OUT:+$OUT/serving}}
OUT_DIR=${OUT_DIR:-benchmarks/results/serving}
mkdir -p "$OUT_DIR"
CONCURRENCY=${CONCURRENCY:-1,16,64,256}
INPUT_LEN=${INPUT_LEN:-1024}
OUTPUT_LEN=${OUTPUT_LEN:-256}
REQ_PER_C=${REQ_PER_C:-2}
MIN_REQ=${MIN_REQ:-16}
MAX_NUM_SEQS=${MAX_NUM_SEQS:-512}
GPU_MEM=${GPU_MEM:-0.90}
LOAD_FORMAT=${LOAD_FORMAT:-dummy}
MODEL_DIR=${MODEL_DIR:-$($PY -c "from benchmarks.common import dummy_llama8b_dir as d; print(d())")}
VOCAB=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['vocab_size'])" \
  "$MODEL_DIR/config.json")
MAX_LEN=$((INPUT_LEN * 3 / 2 + OUTPUT_LEN * 3 / 2 + 64))

kv_flags() {
  case "$1" in
    bf16) echo "--no-kivi" ;;
    fp8) echo "--no-kivi --kv-cache-dtype fp8" ;;
    kivi4) echo "--kv-bits 4 --kv-group 32 --kv-residual 32" ;;
    kivi2) echo "--kv-bits 2 --kv-group 32 --kv-residual 32" ;;
    *) echo "unknown setting '$1' (bf16, fp8, kivi4, kivi2, report)" >&2; return 2 ;;
  esac
}

settings=("$@")
failed=()
[ ${#settings[@]} -eq 0 ] && settings=(bf16 fp8 kivi4 kivi2)
for kv in "${settings[@]}"; do
  [ "$kv" = report ] && continue
  flags=$(kv_flags "$kv")
  json="$OUT_DIR/$kv.json"
  if [ -s "$json" ] && [ -z "${FORCE:-}" ]; then echo "[serving] $kv: $json exists, skipped"; continue; fi
  echo "[serving] $kv $(date -u +%FT%TZ)"
  set +e
  # shellcheck disable=SC2086
  $PY benchmarks/loadtest.py --label "$kv" --out "$json" --server-log "$OUT_DIR/$kv.log" \
    --server-cmd "$PY -m kivi_vllm.cli serve $MODEL_DIR --load-format $LOAD_FORMAT \
      --skip-tokenizer-init --dtype bfloat16 --max-model-len $MAX_LEN \
      --max-num-seqs $MAX_NUM_SEQS --gpu-memory-utilization $GPU_MEM $flags ${SERVER_ARGS:-}" \
    --concurrency "$CONCURRENCY" --requests-per-concurrency "$REQ_PER_C" \
    --min-requests "$MIN_REQ" --warmup 8 --prompt-kind ids --vocab-size "$VOCAB" \
    --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" --no-progress \
    | grep -v "^  \(mean\|p90\)_"
  rc=${PIPESTATUS[0]}
  set -e
  if [ "$rc" -ne 0 ]; then
    echo "[serving] $kv failed (exit $rc); server log tail:"
    tail -30 "$OUT_DIR/$kv.log"
    failed+=("$kv")
    continue
  fi
  grep -h "KIVI\|GPU KV cache size" "$OUT_DIR/$kv.log" | grep -v "Triton" | tail -3 || true
  if [[ $kv == kivi* ]] && ! grep -q "KIVI $kv-g" "$OUT_DIR/$kv.log"; then
    echo "[serving] ERROR: no 'KIVI $kv-g...' start-up line in $OUT_DIR/$kv.log: KIVI was" \
      "not active; removing $json" >&2
    rm -f "$json"
    failed+=("$kv")
  fi
done

jsons=()
for kv in bf16 fp8 kivi4 kivi2; do [ -s "$OUT_DIR/$kv.json" ] && jsons+=("$OUT_DIR/$kv.json"); done
[ ${#jsons[@]} -eq 0 ] && { echo "[serving] no results in $OUT_DIR"; exit 1; }
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || true)
title="${gpu:-$(hostname)}: $(basename "$MODEL_DIR") ($LOAD_FORMAT weights), ${INPUT_LEN} in / ${OUTPUT_LEN} out"
{
  echo "Serving load test, $title, $(date -u +%F)."
  echo "Command: \`bash benchmarks/gpu_serving_compare.sh ${*:-}\` (CONCURRENCY=$CONCURRENCY," \
    "REQ_PER_C=$REQ_PER_C, MIN_REQ=$MIN_REQ, MAX_NUM_SEQS=$MAX_NUM_SEQS, GPU_MEM=$GPU_MEM," \
    "SERVER_ARGS='${SERVER_ARGS:-}')."
  echo
  $PY benchmarks/plot_loadtest.py "${jsons[@]}" --png "$OUT_DIR/serving.png" --title "$title" \
    | grep -v "^wrote "
} > "$OUT_DIR/serving.md"
cat "$OUT_DIR/serving.md"
echo "[serving] wrote $OUT_DIR/serving.png and $OUT_DIR/serving.md"
if [ ${#failed[@]} -gt 0 ]; then echo "[serving] failed: ${failed[*]}" >&2; exit 1; fi
