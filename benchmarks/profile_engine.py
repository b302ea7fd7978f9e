"""Where an engine step's GPU time goes: torch profiler around vLLM offline generation.

Runs the engine in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) on the dummy
Llama-3.1-8B shape and prints the CUDA kernels by total time, for one KV setting:

    python benchmarks/profile_engine.py --kv kivi2 --workload 64x1024x64 --eager

``--kv`` takes the names of ``benchmarks/throughput.py`` (FastGen settings included) and
``--kv-cache-gib`` / ``--max-num-seqs`` cap the pool and the batch as there.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from benchmarks.common import dummy_llama8b_dir  # noqa: E402
from benchmarks.throughput import engine_setting, uses_fastgen  # noqa: E402


def main() -> None:
    import numpy as np
    import torch
    from vllm import LLM, SamplingParams

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kv", default="kivi2", help="a benchmarks/throughput.py --kv name")
    parser.add_argument("--workload", default="64x1024x64", help="requests x input x output")
    parser.add_argument("--eager", action="store_true", help="no CUDA graphs (see every kernel)")
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--kv-cache-gib", type=float, default=0.0)
    parser.add_argument("--max-num-seqs", type=int, default=1024)
    args = parser.parse_args()
    num, in_len, out_len = (int(x) for x in args.workload.split("x"))
    max_len = in_len + out_len + 16
    engine_kwargs, _ = engine_setting(args.kv, max_len, args.kv_cache_gib)
    llm = LLM(model=dummy_llama8b_dir(), load_format="dummy", skip_tokenizer_init=True,
              dtype="bfloat16", gpu_memory_utilization=0.9, max_model_len=max_len,
              max_num_seqs=args.max_num_seqs, enforce_eager=args.eager, seed=0,
              **engine_kwargs)
    rng = np.random.default_rng(0)
    prompts = [{"prompt_token_ids": rng.integers(100, 120000, in_len).tolist()}
               for _ in range(num)]
    params = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:8], params, use_tqdm=False)  # warm-up (compiles the kernels)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        torch.cuda.synchronize()
        wall_ms = 1e3 * (time.perf_counter() - start)
    if uses_fastgen(engine_kwargs):
        from kivi_vllm.fastgen.engine import fastgen_stats

        stats = llm.collective_rpc(fastgen_stats)[0]  # host clock, warm-up included
        print("PROFILE fastgen " + " ".join(
            f"{k}={stats[k]:.3f}" if isinstance(stats[k], float) else f"{k}={stats[k]}"
            for k in ("steps", "decode_steps", "mixed_steps", "decode_rows", "plan_s",
                      "decode_span_s", "profile_s")))
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    events.sort(key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.self_device_time_total for e in events)
    print(f"PROFILE kv={args.kv} workload={args.workload} eager={args.eager} "
          f"gpu_total_ms={total / 1e3:.1f} wall_ms={wall_ms:.1f} "
          f"gpu_busy={total / 1e3 / wall_ms:.2f}")
    for e in events[: args.rows]:
        print(f"PROFILE {e.self_device_time_total / 1e3:9.1f} ms {e.count:7d}x "
              f"{100 * e.self_device_time_total / total:5.1f}%  {e.key[:90]}")


if __name__ == "__main__":
    main()
