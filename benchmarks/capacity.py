"""KV cache capacity on CPU: bf16 vs KIVI, tail memory included, SmolLM2-135M-Instruct.

For each KV setting a fresh vLLM engine (own subprocess) starts with
VLLM_CPU_KVCACHE_SPACE=4 (GiB) and reports its KV cache size (num_gpu_blocks x
block_size, the engine's own count) and, through ``kivi_stats``, the bytes of its
full-precision tails. The table shows pages per token, the tails' share of the
budget and the ratio to bf16; a second table shows how the tail share grows with
max_num_seqs (engines at 64, 256 (default) and 1024, plus the worker's formula for
the settings not run). Writes JSON records (``--out``).

    .venv/bin/python benchmarks/capacity.py --out benchmarks/results/capacity-cpu.json
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

KV_SPACE_GIB = 4
DEFAULT_MAX_NUM_SEQS = 256  # vLLM's LLM-class default on CPU
MODEL = "SmolLM2-135M-Instruct"
LAYERS, KV_HEADS, HEAD_DIM, DTYPE_BYTES = 30, 3, 64, 2

LEVER = "kivi2-g32-r96:sink_groups=1,rotate_keys=true"
# setting names as benchmarks/quality.py writes them (options after ':')
SETTINGS = (
    "bf16", "kivi4-g32-r32", "kivi2-g32-r32", "kivi2-g32-r128", "kivi2-g64-r64",
    LEVER, LEVER + ',layer_key_bits={"0":4,"18":4}',
)
# (setting, max_num_seqs) pairs started as engines
DEFAULT_RUNS = (
    [(name, DEFAULT_MAX_NUM_SEQS) for name in SETTINGS]
    + [(name, n) for n in (64, 1024) for name in ("bf16", "kivi2-g32-r32", "kivi2-g32-r128")]
)


def kivi_config(name: str):
    """The setting's ``KiviConfig``, or None for bf16."""
    from benchmarks.quality import parse_kv
    from kivi_vllm.config import KiviConfig

    kivi = parse_kv(name)["kivi"]
    return None if kivi is None else KiviConfig.from_dict(kivi)


def page_bytes_per_token(name: str) -> float:
    """Bytes per token per layer of the pages, averaged over the layers (formula of
    kivi_vllm.page_format; ``layer_key_bits`` widens some layers' pages)."""
    from kivi_vllm.page_format import bf16_bytes_per_token, kivi_bytes_per_token

    cfg = kivi_config(name)
    if cfg is None:
        return bf16_bytes_per_token(KV_HEADS, HEAD_DIM, DTYPE_BYTES)
    return kivi_bytes_per_token(cfg, HEAD_DIM, KV_HEADS, LAYERS) / LAYERS


def predicted(name: str, max_num_seqs: int) -> dict:
    """What the worker's budget arithmetic gives (kivi_vllm.memory / page_format)."""
    from kivi_vllm.page_format import layer_page_format

    cfg = kivi_config(name)
    budget = KV_SPACE_GIB * 2**30
    if cfg is None:
        block = 128  # CPU_ATTN's block size
        page = LAYERS * block * page_bytes_per_token(name)
        return {"tail_bytes": 0, "kv_cache_tokens": int(budget // page) * block}
    formats = [layer_page_format(cfg, layer, HEAD_DIM, KV_HEADS) for layer in range(LAYERS)]
    tails = LAYERS * (max_num_seqs + 1) * formats[0].tail_bytes_per_slot(cfg.residual,
                                                                           DTYPE_BYTES)
    if tails >= budget:
        return {"tail_bytes": tails, "kv_cache_tokens": 0}
    blocks = (budget - tails) // sum(f.page_bytes for f in formats)
    return {"tail_bytes": tails, "kv_cache_tokens": int(blocks) * cfg.group_size}


def run_one(name: str, max_num_seqs: int) -> dict:
    """Start one engine and read its KV cache size and tail bytes (in a subprocess)."""
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(KV_SPACE_GIB)
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    import vllm
    from vllm import LLM

    from kivi_vllm.introspect import kivi_stats
    from kivi_vllm.models import ensure_default_model

    cfg = kivi_config(name)
    kwargs = {}
    if cfg is not None:
        kwargs["additional_config"] = {"kivi": cfg.to_dict()}
    start = time.perf_counter()
    llm = LLM(model=ensure_default_model(), enforce_eager=True, max_num_seqs=max_num_seqs,
              seed=0, **kwargs)
    startup = time.perf_counter() - start
    cache = llm.llm_engine.vllm_config.cache_config
    stats = llm.collective_rpc(kivi_stats)[0]
    # a short greedy request: the engine serves with this cache
    from vllm import SamplingParams

    out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=4, temperature=0),
                       use_tqdm=False)
    return {
        "model": MODEL,
        "setting": name,
        "kv": "bf16" if cfg is None else f"kivi{cfg.bits}",
        "bits": None if cfg is None else cfg.bits,
        "group_size": None if cfg is None else cfg.group_size,
        "residual": None if cfg is None else cfg.residual,
        **({} if cfg is None else cfg.levers),
        "max_num_seqs": max_num_seqs,
        "kv_space_gib": KV_SPACE_GIB,
        "block_size": cache.block_size,
        "num_blocks": cache.num_gpu_blocks,
        "kv_cache_tokens": cache.num_gpu_blocks * cache.block_size,
        "bytes_per_token_per_layer": page_bytes_per_token(name),
        "bytes_per_token": page_bytes_per_token(name) * LAYERS,
        "tail_bytes": stats["tail_bytes"],
        "tail_share": stats["tail_bytes"] / (KV_SPACE_GIB * 2**30),
        "tail_slots": stats["tail_slots"],
        "sample": out[0].outputs[0].text,
        "startup_s": round(startup, 1),
        "vllm": vllm.__version__,
        "device": "cpu",
        "date": str(datetime.date.today()),
    }


def add_ratios(records: list[dict]) -> None:
    bf16 = {r["max_num_seqs"]: r["kv_cache_tokens"] for r in records if r["kv"] == "bf16"}
    default = bf16.get(DEFAULT_MAX_NUM_SEQS)
    for r in records:
        base = bf16.get(r["max_num_seqs"], default)
        r["ratio_vs_bf16"] = round(r["kv_cache_tokens"] / base, 4) if base else None


def print_tables(records: list[dict]) -> None:
    rows = [r for r in records if r["max_num_seqs"] == DEFAULT_MAX_NUM_SEQS]
    print(f"\nKV cache capacity, {MODEL}, VLLM_CPU_KVCACHE_SPACE={KV_SPACE_GIB} GiB, "
          f"max_num_seqs={DEFAULT_MAX_NUM_SEQS} (engine-reported tokens)")
    w = max(16, *(len(r["setting"]) for r in records))
    hdr = (f"{'setting':{w}} {'B/token/layer':>13} {'B/token':>8} {'tail MiB':>9} "
           f"{'tail share':>10} {'KV tokens':>11} {'x bf16':>7} {'formula':>11}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        pred = predicted(r["setting"], r["max_num_seqs"])["kv_cache_tokens"]
        print(f"{r['setting']:{w}} {r['bytes_per_token_per_layer']:>13g} "
              f"{r['bytes_per_token']:>8g} {r['tail_bytes'] / 2**20:>9.1f} "
              f"{r['tail_share']:>10.2%} {r['kv_cache_tokens']:>11,} "
              f"{r['ratio_vs_bf16']:>7.3f} {pred:>11,}")
    print(f"\nTail share of the {KV_SPACE_GIB} GiB budget vs max_num_seqs "
          "(E = engine-reported, F = worker formula; KV tokens / ratio to bf16)")
    seqs = sorted({r["max_num_seqs"] for r in records} | {64, 256, 1024})
    print(f"{'setting':{w}} " + " ".join(f"{f'max_num_seqs={n}':>30}" for n in seqs))
    engine = {(r["setting"], r["max_num_seqs"]): r for r in records}
    bf16_tokens = predicted("bf16", DEFAULT_MAX_NUM_SEQS)["kv_cache_tokens"]
    for name in SETTINGS:
        cells = []
        for n in seqs:
            r = engine.get((name, n))
            if r is not None:
                share, tokens, tag = r["tail_share"], r["kv_cache_tokens"], "E"
            else:
                p = predicted(name, n)
                share, tokens, tag = p["tail_bytes"] / (KV_SPACE_GIB * 2**30), \
                    p["kv_cache_tokens"], "F"
            cells.append(f"{tag} {share:6.1%} {tokens:>9,} {tokens / bf16_tokens:5.2f}x")
        print(f"{name:{w}} " + " ".join(f"{c:>30}" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=None,
                        help="comma list of SETTING@MAX_NUM_SEQS (default: all of them; a "
                             "comma inside a setting separates its options)")
    parser.add_argument("--out", default="benchmarks/results/capacity-cpu.json")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        name, n = args.one.split("@")
        print("RESULT " + json.dumps(run_one(name, int(n))), flush=True)
        return
    runs = DEFAULT_RUNS
    if args.runs:
        from benchmarks.quality import split_settings

        runs = [(r.rsplit("@", 1)[0], int(r.rsplit("@", 1)[1]))
                for r in split_settings(args.runs)]
    records: list[dict] = []
    for name, n in runs:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--one", f"{name}@{n}"],
                              capture_output=True, text=True)
        got = [json.loads(line[7:]) for line in proc.stdout.splitlines()
               if line.startswith("RESULT ")]
        took = time.perf_counter() - start
        if proc.returncode != 0 or not got:
            print(f"[{name}@{n}] failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}",
                  flush=True)
            continue
        rec = got[0]
        pred = predicted(name, n)
        rec["predicted_kv_cache_tokens"] = pred["kv_cache_tokens"]
        rec["predicted_tail_bytes"] = pred["tail_bytes"]
        print(f"[{name}@{n}] {rec['kv_cache_tokens']:,} KV tokens, tails "
              f"{rec['tail_bytes'] / 2**20:.1f} MiB ({took:.0f} s)", flush=True)
        records.append(rec)
    add_ratios(records)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)
    print_tables(records)


if __name__ == "__main__":
    main()
