"""FastGen through the engine (CPU): perplexity, passkey and the head-pages requests keep.

Settings: ``bf16``, ``kivi<b>-g<G>-r<R>``, optionally ``:fastgen=<T>`` and ``:rows=<N>``
(``kivi.fastgen.profile_rows``). Per setting one engine scores Wikipedia windows and runs
the passkey trials of the quality harness (one request at a time).

* Perplexity: each window's first ``--profile-at`` tokens are the "prompt" and the rest
  are scored teacher-forced (``prompt_logprobs``). With FastGen the request is profiled at
  that position (``extra_args`` :data:`PROFILE_AT`) and every later token reads only its
  heads' kept sets, in KIVI head-pages. Without FastGen prompts are prefilled in chunks of
  one group, so every scored token reads its context from the quantized pages.
* With FastGen, prompts go in one chunk (the profile sees every prompt row); the worker's
  summary of each finished passkey request gives the head-pages it kept after profiling,
  overall and per layer, against the ``layers x KV heads x (prompt // G)`` pages of the
  prompt's complete groups (what KIVI alone holds).

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


def parse(setting: str) -> dict[str, Any] | None:
    """Setting name -> the KIVI config (None for bf16)."""
    if setting == "bf16":
        return None
    base, *options = setting.split(":")
    bits, group, residual = base.removeprefix("kivi").split("-")
    kivi: dict[str, Any] = {"bits": int(bits), "group_size": int(group[1:]),
                            "residual": int(residual[1:])}
    for option in options:
        key, _, value = option.partition("=")
        if key == "fastgen":
            kivi["fastgen"] = {"recovery": float(value)}
        elif key == "rows":
            kivi["fastgen"]["profile_rows"] = int(value)
        else:
            raise SystemExit(f"bad option {option!r} in {setting!r}: fastgen=T or rows=N")
    return kivi


def run(model: str, setting: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer
    from vllm import LLM

    from kivi_vllm import quality
    from kivi_vllm.fastgen.engine import PROFILE_AT, fastgen_stats

    kivi = parse(setting)
    fastgen = kivi is not None and "fastgen" in kivi
    tok = AutoTokenizer.from_pretrained(model)
    trials = quality.passkey_trials(tok, args.lengths, args.depths)
    windows = quality.ppl_windows(tok, args.windows, args.window_len) if args.windows else []
    if kivi is None or fastgen:  # one request at a time, each prompt in one chunk
        kwargs = dict(max_num_batched_tokens=args.max_model_len, max_num_seqs=1,
                      max_model_len=args.max_model_len)
        if torch.cuda.is_available():
            kwargs["enable_chunked_prefill"] = False
    else:
        kwargs = quality.engine_kwargs(kivi["group_size"], args.max_model_len)
    if kivi is not None:
        kwargs["additional_config"] = {"kivi": kivi}
    llm = LLM(model=model, enforce_eager=True, seed=0, **kwargs)
    try:
        rec: dict[str, Any] = {"setting": setting}
        if windows:
            start = time.perf_counter()
            extra = {PROFILE_AT: args.profile_at} if fastgen else None
            ppl = quality.perplexity(llm, windows, args.window_len - args.profile_at, extra)
            rec.update(ppl=ppl.ppl, ppl_tokens=ppl.tokens,
                       ppl_s=round(time.perf_counter() - start, 1))
        scored = set(llm.collective_rpc(fastgen_stats)[0]["history"]) if fastgen else set()
        start = time.perf_counter()
        rec.update(quality.passkey_accuracy(llm, tok, trials))
        rec["passkey_s"] = round(time.perf_counter() - start, 1)
        if fastgen:  # the passkey requests (profiled at their prompt's end)
            history = llm.collective_rpc(fastgen_stats)[0]["history"]
            passkey = [v for k, v in history.items() if k not in scored]
            rec.update(kept_pages(passkey, kivi["group_size"], args.heads))
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
    p.add_argument("--settings", default="bf16,kivi4-g32-r32,kivi4-g32-r32:fastgen=0.9,"
                   "kivi4-g32-r32:fastgen=0.95,kivi4-g32-r32:fastgen=0.99,"
                   "kivi4-g32-r32:fastgen=0.95:rows=64,kivi2-g32-r32,"
                   "kivi2-g32-r32:fastgen=0.95,kivi2-g32-r32:fastgen=0.99")
    p.add_argument("--lengths", default="512,1024")
    p.add_argument("--depths", default="0.2,0.5,0.8")
    p.add_argument("--windows", type=int, default=4, help="perplexity windows")
    p.add_argument("--window-len", type=int, default=768)
    p.add_argument("--profile-at", type=int, default=512, help="scored: the tokens after")
    p.add_argument("--max-model-len", type=int, default=1152)
    p.add_argument("--model", default="smollm2", help="smollm2 or gemma3 (kivi_vllm.models)")
    p.add_argument("--out", default=None, help="default: benchmarks/results/"
                   "fastgen-engine-<model>.json")
    args = p.parse_args()
    args.lengths = [int(x) for x in args.lengths.split(",")]
    args.depths = [float(x) for x in args.depths.split(",")]
    import torch

    if torch.cuda.is_available() and args.windows and ":fastgen" in args.settings:
        raise SystemExit("--windows: the GPU worker profiles whole prompts only (no "
                         "profiling position for teacher-forced perplexity); use --windows 0")
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc(fastgen_stats)

    from transformers import AutoConfig

    from kivi_vllm.models import ensure_model

    model = ensure_model(args.model)
    args.out = args.out or f"benchmarks/results/fastgen-engine-{args.model}.json"
    hf = AutoConfig.from_pretrained(model)
    args.heads = (hf.num_hidden_layers, hf.num_key_value_heads)
    records = []
    for setting in args.settings.split(","):
        rec = run(model, setting, args)
        rec.update(model=Path(model).name, date=str(date.today()))
        records.append(rec)
        Path(args.out).write_text(json.dumps(records, indent=1))
    print("| setting | PPL | passkey | kept head-pages | policy mix special/punct/frequent/"
          "local/full |")
    print("|---|---|---|---|---|")
    for r in records:
        kept = f"{r['kept_pages']:.3f}" if "kept_pages" in r else "1 (no FastGen)"
        mix = " / ".join(f"{x:.0%}" for x in r.get("policy_mix", [])) or "-"
        ppl = r.get("ppl", float("nan"))
        print(f"| {r['setting']} | {ppl:.3f} | {r['passkey_hits']}/{r['passkey_trials']} "
              f"| {kept} | {mix} |")


if __name__ == "__main__":
    main()
