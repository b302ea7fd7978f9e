"""Offline vLLM throughput: bf16, fp8, vLLM's int4 cache, KIVI-4, KIVI-2 in one run.

Llama-3.1-8B shape, dummy weights, random token-id prompts, greedy, ignore_eos; each
KV setting runs in a fresh subprocess (one engine, all workloads). Prints a table and
writes JSON records (see ``--out``). Run on a GPU host:

    python benchmarks/throughput.py --kv bf16,fp8,int4_per_token_head,kivi4,kivi2 \
        --workloads 512x1024x256,384x4096x512 --out benchmarks/results/throughput-h100.json

``--kv`` names: the keys of ``benchmarks.common.KV_SETTINGS``, or a KIVI setting with
options as ``benchmarks/quality.py`` writes it, ``kivi<bits>-g<group>-r<residual>
[:option=value,...]``, e.g. ``kivi2-g32-r96:sink_groups=1,rotate_keys=true`` (a comma
starts a new setting only before bf16/fp8/int4/kivi). ``--model smollm2`` (any
``kivi_vllm.models`` name) runs the real model on Wikipedia windows instead, and
``--kv-cache-gib`` caps the KV pool (e.g. to compare admissions under memory pressure).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (  # noqa: E402
    KV_SETTINGS,
    dummy_llama8b_dir,
    kivi_env,
    kv_fields,
)


def parse_workloads(spec: str) -> list[tuple[int, int, int]]:
    return [tuple(int(x) for x in w.split("x")) for w in spec.split(",")]  # type: ignore[misc]


def split_kv(spec: str) -> list[str]:
    """``--kv`` -> setting names (commas inside a KIVI setting separate its options)."""
    from benchmarks.quality import split_settings

    names = split_settings(spec)
    for name in names:
        kv_setting(name)  # fail before any engine starts
    return names


def kv_setting(name: str) -> tuple[dict, dict]:
    """(LLM keyword arguments, record fields) of a setting name."""
    if name in KV_SETTINGS:
        return KV_SETTINGS[name], kv_fields(name)
    if not name.startswith("kivi"):
        raise SystemExit(f"unknown --kv setting {name!r}: use one of {sorted(KV_SETTINGS)} "
                         "or kivi<bits>-g<group>-r<residual>[:option=value,...]")
    from benchmarks.quality import parse_kv
    from kivi_vllm.config import KiviConfig, KiviConfigError

    kivi = parse_kv(name)["kivi"]
    try:
        cfg = KiviConfig.from_dict(kivi)
    except KiviConfigError as e:
        raise SystemExit(f"--kv {name!r}: {e}") from None
    fields = {"kv": f"kivi{cfg.bits}", "setting": name, "group_size": cfg.group_size,
              "residual": cfg.residual, **cfg.levers}
    return {"additional_config": {"kivi": kivi}}, fields


def uses_fastgen(engine_kwargs: dict) -> bool:
    """Whether LLM keyword arguments switch kivi.fastgen on."""
    return "fastgen" in engine_kwargs.get("additional_config", {}).get("kivi", {})


def engine_setting(kv: str, max_len: int, kv_cache_gib: float = 0.0) -> tuple[dict, dict]:
    """:func:`kv_setting` plus what the run needs: FastGen prefills each prompt whole (the
    GPU profiles it in that step), and ``kv_cache_gib`` caps the pool when non-zero."""
    engine_kwargs, fields = kv_setting(kv)
    if uses_fastgen(engine_kwargs):
        engine_kwargs = {**engine_kwargs, "enable_chunked_prefill": False,
                         "max_num_batched_tokens": max(max_len, 8192)}
    if kv_cache_gib:
        engine_kwargs = {**engine_kwargs, "kv_cache_memory_bytes": int(kv_cache_gib * 2**30)}
    return engine_kwargs, fields


def failure_excerpt(stderr: str, lines: int = 40) -> str:
    """The first worker/engine traceback of a failed run (its root cause), else the tail."""
    rows = [r for r in stderr.splitlines() if "Capturing CUDA graphs" not in r]
    errors = [r for r in rows if " ERROR " in r]
    start = next((i for i, r in enumerate(errors) if "Traceback" in r), None)
    if start is None:
        return "\n".join(rows[-lines:])
    return "\n".join(r.split("] ", 1)[-1] for r in errors[start : start + lines])


def run_one(kv: str, workloads: list[tuple[int, int, int]], args) -> list[dict]:
    """Build one engine for ``kv`` and time every workload (runs in a subprocess)."""
    import numpy as np
    import torch
    from vllm import LLM, SamplingParams

    max_len = max(i + o for _, i, o in workloads) + 16
    engine_kwargs, fields = engine_setting(kv, max_len, args.kv_cache_gib)
    fastgen = uses_fastgen(engine_kwargs)
    is_kivi = fields["kv"].startswith("kivi")
    if is_kivi:  # collective_rpc(kivi_stats / fastgen_stats)
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    if args.model == "dummy8b":
        model = {"model": dummy_llama8b_dir(), "load_format": "dummy",
                 "skip_tokenizer_init": True}
    else:  # a real model of kivi_vllm.models, Wikipedia prompts
        from kivi_vllm.models import ensure_model

        model = {"model": ensure_model(args.model)}
    llm = LLM(
        dtype="bfloat16", gpu_memory_utilization=args.gpu_mem, max_num_seqs=args.max_num_seqs,
        max_model_len=max_len, enforce_eager=args.eager, seed=0,
        tensor_parallel_size=args.tp, **model, **engine_kwargs,
    )
    vllm_config = llm.llm_engine.vllm_config
    cache, hf = vllm_config.cache_config, vllm_config.model_config.hf_config
    kv_tokens = cache.num_gpu_blocks * cache.block_size
    if fastgen:  # a block is one head-page (one layer, one KV head)
        kv_tokens //= hf.num_hidden_layers * hf.num_key_value_heads
    rng = np.random.default_rng(0)
    gpu = torch.cuda.get_device_name()
    records = []
    for num, in_len, out_len in workloads:
        if args.model == "dummy8b":
            prompts = [{"prompt_token_ids": rng.integers(100, 120000, in_len).tolist()}
                       for _ in range(num)]
            warm = prompts[:8]
        else:  # distinct Wikipedia windows; the warm-up's are not reused
            from transformers import AutoTokenizer

            from kivi_vllm.quality import ppl_windows

            windows = ppl_windows(AutoTokenizer.from_pretrained(model["model"]), num + 8, in_len)
            prompts = [{"prompt_token_ids": ids} for ids in windows[8:]]
            warm = [{"prompt_token_ids": ids} for ids in windows[:8]]
        params = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
        llm.generate(warm, params, use_tqdm=False)  # warm-up
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        records.append({
            **fields, "num_requests": num, "input_len": in_len, "output_len": out_len,
            "kv_cache_tokens": kv_tokens,
            "max_concurrency": round(min(args.max_num_seqs, kv_tokens / (in_len + out_len)), 1),
            "output_tokens_per_s": round(out_tokens / elapsed, 1),
            "total_tokens_per_s": round((out_tokens + num * in_len) / elapsed, 1),
            "elapsed_s": round(elapsed, 2), "gpu": gpu, "date": str(datetime.date.today()),
            "enforce_eager": args.eager, "tensor_parallel_size": args.tp,
            "num_gpus": torch.cuda.device_count(), "model": args.model,
            "kv_cache_gib": args.kv_cache_gib, "settings": kivi_env(),
        })
        if fastgen:
            records[-1].update(fastgen_figures(llm, fields["group_size"], in_len))
        elif is_kivi:  # sequences holding a tail slot at once
            from kivi_vllm.introspect import kivi_stats

            records[-1]["peak_running"] = llm.collective_rpc(kivi_stats)[0]["tail_slots_peak"]
        print("RESULT " + json.dumps(records[-1]), flush=True)
    return records


def fastgen_figures(llm, group: int, in_len: int) -> dict:
    """kivi.fastgen: the most requests in one step, and the head-pages the last finished
    requests kept after profiling, against KIVI's (every head's prompt groups)."""
    from kivi_vllm.fastgen.engine import fastgen_stats

    stats = llm.collective_rpc(fastgen_stats)[0]
    done = list(stats["history"].values())
    hf = llm.llm_engine.vllm_config.model_config.hf_config
    pages = hf.num_hidden_layers * hf.num_key_value_heads * (in_len // group)
    counts = [sum(s["policy_counts"][p] for s in done) for p in range(5)]
    return {
        "peak_running": stats["peak_rows"],
        "fastgen_kept_pages": round(sum(s["pages_after_profile"] for s in done)
                                    / max(len(done) * pages, 1), 3),
        "fastgen_policy_mix": dict(zip(stats["policies"],
                                       [round(c / max(sum(counts), 1), 3) for c in counts],
                                       strict=True)),
        "fastgen_profile_s": round(stats["profile_s"], 2),
        # host seconds (warm-up included): planning, and decode-only steps' spans
        **{f"fastgen_{k}": round(stats[k], 3) for k in
           ("steps", "decode_steps", "mixed_steps", "decode_rows", "plan_s", "decode_span_s")},
    }


def print_table(records: list[dict]) -> None:
    base = {(r["input_len"], r["output_len"]): r for r in records if r["kv"] == "bf16"}
    hdr = f"{'kv':22} {'workload':>16} {'KV tokens':>11} {'conc':>7} {'out tok/s':>10} " \
          f"{'total tok/s':>12} {'x bf16':>7}"
    print(hdr)
    print("-" * len(hdr))
    for r in records:
        b = base.get((r["input_len"], r["output_len"]))
        ratio = f"{r['output_tokens_per_s'] / b['output_tokens_per_s']:.2f}" if b else "-"
        wl = f"{r['num_requests']}x{r['input_len']}/{r['output_len']}"
        name = r.get("setting", r["kv"])
        print(f"{name:22} {wl:>16} {r['kv_cache_tokens']:>11,} {r['max_concurrency']:>7} "
              f"{r['output_tokens_per_s']:>10,.0f} {r['total_tokens_per_s']:>12,.0f} {ratio:>7}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kv", default="bf16,fp8,int4_per_token_head,kivi4,kivi2")
    parser.add_argument("--workloads", default="512x1024x256,384x4096x512")
    parser.add_argument("--gpu-mem", type=float, default=0.90)
    parser.add_argument("--max-num-seqs", type=int, default=1024)
    parser.add_argument("--eager", action="store_true", help="enforce_eager (no CUDA graphs)")
    parser.add_argument("--tp", type=int, default=1, help="tensor_parallel_size")
    parser.add_argument("--model", default="dummy8b",
                        help="dummy8b (Llama-3.1-8B shape, dummy weights, random ids) or a "
                        "kivi_vllm.models name, e.g. smollm2 (Wikipedia prompts)")
    parser.add_argument("--kv-cache-gib", type=float, default=0.0,
                        help="cap the KV cache (kv_cache_memory_bytes); 0 = gpu-mem share")
    parser.add_argument("--out", default=None)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    workloads = parse_workloads(args.workloads)
    if args.one:
        run_one(args.one, workloads, args)
        return
    records: list[dict] = []
    for kv in split_kv(args.kv):
        cmd = [sys.executable, __file__, "--one", kv, "--workloads", args.workloads,
               "--gpu-mem", str(args.gpu_mem), "--max-num-seqs", str(args.max_num_seqs),
               "--tp", str(args.tp), "--model", args.model,
               "--kv-cache-gib", str(args.kv_cache_gib)]
        if args.eager:
            cmd.append("--eager")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = [json.loads(line[7:]) for line in proc.stdout.splitlines()
               if line.startswith("RESULT ")]
        if proc.returncode != 0 or not got:
            print(f"[{kv}] failed (rc={proc.returncode}):\n{failure_excerpt(proc.stderr)}",
                  flush=True)
            if args.out:  # the whole log beside the results
                with open(f"{args.out}.{len(records)}.stderr", "w") as f:
                    f.write(proc.stderr)
        records += got
        if args.out:
            with open(args.out, "w") as f:
                json.dump(records, f, indent=1)
    print_table(records)


if __name__ == "__main__":
    main()
