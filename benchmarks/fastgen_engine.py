"""FastGen through the engine (CPU): passkey accuracy and the head-pages requests keep.

For each setting (``kivi<b>-g<G>-r<R>`` with optional ``:fastgen=<T>``) one engine runs the
passkey trials of the quality harness (one request at a time, each prompt prefilled in
one chunk so the profile sees every prompt row). With FastGen the worker's summary of
each finished request gives the head-pages it kept after profiling and per layer,
against the ``layers x KV heads x (prompt // G)`` pages of the prompt's complete groups
without FastGen (what KIVI holds). Prints a table and writes JSON.

    .venv/bin/python benchmarks/fastgen_engine.py --settings kivi4-g32-r32:fastgen=0.95
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import date
from pathlib import Path
from typing import Any


def parse(setting: str) -> dict[str, Any]:
    base, _, extra = setting.partition(":fastgen=")
    bits, group, residual = base.removeprefix("kivi").split("-")
    kivi: dict[str, Any] = {"bits": int(bits), "group_size": int(group[1:]),
                            "residual": int(residual[1:])}
    if extra:
        kivi["fastgen"] = {"recovery": float(extra)}
    return kivi


def run(model: str, setting: str, args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoTokenizer
    from vllm import LLM

    from kivi_vllm import quality
    from kivi_vllm.fastgen.engine import fastgen_stats

    kivi = parse(setting)
    tok = AutoTokenizer.from_pretrained(model)
    trials = quality.passkey_trials(tok, args.lengths, args.depths)
    llm = LLM(model=model, enforce_eager=True, seed=0, max_model_len=args.max_model_len,
              max_num_batched_tokens=args.max_model_len, max_num_seqs=4,
              additional_config={"kivi": kivi})
    try:
        start = time.perf_counter()
        rec: dict[str, Any] = {"setting": setting, **quality.passkey_accuracy(llm, tok, trials)}
        rec["passkey_s"] = round(time.perf_counter() - start, 1)
        if "fastgen" in kivi:
            stats = llm.collective_rpc(fastgen_stats)[0]
            rec.update(kept_pages(stats["history"].values(), kivi["group_size"], args.heads))
    finally:
        llm.llm_engine.engine_core.shutdown()
    return rec


def kept_pages(summaries: Any, group: int, heads: tuple[int, int]) -> dict[str, Any]:
    """Head-pages after profiling / the prompt's complete groups in every head."""
    layers, kv_heads = heads
    fractions, per_layer, counts = [], [0.0] * layers, [0] * 5
    summaries = list(summaries)
    for s in summaries:
        full = s["prompt_len"] // group
        fractions.append(s["pages_after_profile"] / (layers * kv_heads * full))
        for la, pages in enumerate(s["layer_pages"]):
            per_layer[la] += pages / (kv_heads * full) / len(summaries)
        counts = [a + b for a, b in zip(counts, s["policy_counts"], strict=True)]
    return {
        "kept_pages": sum(fractions) / len(fractions),
        "kept_pages_per_request": [round(f, 3) for f in fractions],
        "kept_pages_per_layer": [round(f, 3) for f in per_layer],
        "policy_mix": [round(c / sum(counts), 3) for c in counts],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--settings", default="kivi4-g32-r32,kivi4-g32-r32:fastgen=0.9,"
                   "kivi4-g32-r32:fastgen=0.95,kivi4-g32-r32:fastgen=0.99,kivi2-g32-r32,"
                   "kivi2-g32-r32:fastgen=0.95")
    p.add_argument("--lengths", default="512,1024")
    p.add_argument("--depths", default="0.2,0.5,0.8")
    p.add_argument("--max-model-len", type=int, default=1152)
    p.add_argument("--out", default="benchmarks/results/fastgen-engine-smollm2.json")
    args = p.parse_args()
    args.lengths = [int(x) for x in args.lengths.split(",")]
    args.depths = [float(x) for x in args.depths.split(",")]
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc(fastgen_stats)

    from transformers import AutoConfig

    from kivi_vllm.models import ensure_default_model

    model = ensure_default_model()
    hf = AutoConfig.from_pretrained(model)
    args.heads = (hf.num_hidden_layers, hf.num_key_value_heads)
    records = []
    for setting in args.settings.split(","):
        rec = run(model, setting, args)
        rec.update(model="SmolLM2-135M-Instruct", date=str(date.today()))
        records.append(rec)
        Path(args.out).write_text(json.dumps(records, indent=1))
    print("| setting | passkey | kept head-pages | policy mix special/punct/frequent/local/full |")
    print("|---|---|---|---|")
    for r in records:
        kept = f"{r['kept_pages']:.3f}" if "kept_pages" in r else "1 (no FastGen)"
        mix = " / ".join(f"{x:.0%}" for x in r.get("policy_mix", [])) or "-"
        print(f"| {r['setting']} | {r['passkey_hits']}/{r['passkey_trials']} | {kept} | {mix} |")


if __name__ == "__main__":
    main()
