"""Quality of every KV setting through the engine: perplexity, passkey, greedy agreement.

One engine per setting (``kivi_vllm.quality.engine_kwargs``: prefill in chunks of one
group, so every scored token reads earlier groups from the cache in its configured form).
Writes ``benchmarks/results/quality-<model>.json`` after every setting (records are
merged by setting name, so settings can be added in later runs), and a PNG plot of
perplexity against KV bytes per token.

    nice -n 10 .venv/bin/python benchmarks/quality.py --model smollm2
    nice -n 10 .venv/bin/python benchmarks/quality.py --model gemma3 --kv bf16,kivi2-g32-r32

Settings: ``bf16`` (the model dtype), ``fp8`` (vLLM's fp8 cache), and
``kivi<bits>-g<group>-r<residual>[:option=value,...]`` for KIVI (extra KIVI options,
e.g. levers, after the colon).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_KV = {
    "smollm2": "bf16,fp8,kivi4-g32-r32,kivi2-g32-r32,kivi2-g32-r128,kivi2-g64-r64,"
    "kivi2-g64-r128",
    "gemma3": "bf16,fp8,kivi4-g32-r32,kivi2-g32-r32,kivi2-g32-r128,kivi2-g64-r64,"
    "kivi2-g64-r128,kivi2-g128-r128",
}


def split_settings(spec: str) -> list[str]:
    """A comma-separated list of setting names -> names: a new name starts at ``bf16``,
    ``fp8``, ``int4_per_token_head`` or ``kivi<bits>`` (a KIVI setting's own options, such
    as ``fp8_scales=true``, hold commas too)."""
    return re.split(r",(?=(?:bf16|fp8|int4_per_token_head|kivi\d)(?![a-z_]))", spec)


def parse_kv(name: str) -> dict[str, Any]:
    """Setting name -> {"kv", "kivi" (dict or None), "kv_cache_dtype"}."""
    if name in ("bf16", "fp8"):
        return {"kv": name, "kivi": None, "kv_cache_dtype": "fp8" if name == "fp8" else "auto"}
    base, _, extra = name.partition(":")
    parts = base.split("-")
    if len(parts) != 3 or not base.startswith("kivi"):
        raise SystemExit(f"bad setting {name!r}: use bf16, fp8 or kivi<b>-g<G>-r<R>[:k=v,...]")
    kivi: dict[str, Any] = {
        "bits": int(parts[0][4:]),
        "group_size": int(parts[1][1:]),
        "residual": int(parts[2][1:]),
    }
    # options split at a comma that starts ``name=`` (JSON values may hold commas)
    for item in filter(None, re.split(r",(?=[a-z_][a-z0-9_]*=)", extra)):
        key, _, value = item.partition("=")
        kivi[key] = json.loads(value)
    return {"kv": name, "kivi": kivi, "kv_cache_dtype": "auto"}


def bytes_per_token(setting: dict[str, Any], hf: Any) -> dict[str, float]:
    """KV bytes per token of the whole model (all layers), from the page format."""
    from kivi_vllm.config import KiviConfig
    from kivi_vllm.page_format import bf16_bytes_per_token, kivi_bytes_per_token

    heads = hf.num_key_value_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    layers = hf.num_hidden_layers
    bf16 = bf16_bytes_per_token(heads, head_dim) * layers
    if setting["kivi"] is None:
        per = bf16 if setting["kv"] == "bf16" else bf16 / 2
    else:
        cfg = KiviConfig.from_dict(setting["kivi"])
        per = kivi_bytes_per_token(cfg, head_dim, heads, layers)
    return {"bytes_per_token": per, "capacity_vs_bf16": bf16 / per}


def capacity_with_tails(rec: dict[str, Any], hf: Any, budget_gib: float = 4,
                        max_num_seqs: int = 256) -> float:
    """KV tokens vs bf16 in ``budget_gib`` with the full-precision tails of
    ``max_num_seqs`` sequences (+1 scratch) carved out, as ``benchmarks/capacity.py``
    measures it (the sink rows are part of the residual)."""
    budget = budget_gib * 1024**3
    heads = hf.num_key_value_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    bf16 = 2 * heads * head_dim * 2 * hf.num_hidden_layers
    tails = (max_num_seqs + 1) * (rec["residual"] or 0) * bf16
    return ((budget - tails) / rec["bytes_per_token"]) / (budget / bf16)


def table(doc: dict[str, Any], hf: Any) -> str:
    """The markdown table of docs/benchmarks.md for one results file."""
    recs = doc["records"]
    bf16 = next(r for r in recs if r["kv"] == "bf16")
    lines = [
        "| setting | KV bytes/token (all layers) | capacity vs bf16 (pages / 4 GiB, 256 seqs "
        "with tails) | PPL | vs bf16 | passkey | greedy agreement |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in recs:
        lines.append(
            f"| {r['kv']} | {r['bytes_per_token']:,.0f} | {r['capacity_vs_bf16']:.2f}x / "
            f"{capacity_with_tails(r, hf):.2f}x | {r['ppl']:.3f} | "
            f"{100 * (r['ppl'] / bf16['ppl'] - 1):+.1f}% | "
            f"{r['passkey_hits']}/{r['passkey_trials']} | {r['agreement']:.3f} |"
        )
    return "\n".join(lines)


def run_setting(
    model_path: str, setting: dict[str, Any], args: argparse.Namespace, work: dict[str, Any]
) -> dict[str, Any]:
    from vllm import LLM

    from kivi_vllm import quality

    group = setting["kivi"]["group_size"] if setting["kivi"] else 32
    kwargs = quality.engine_kwargs(group, args.max_model_len)
    if setting["kivi"] is not None:
        kwargs["additional_config"] = {"kivi": setting["kivi"]}
    start = time.perf_counter()
    llm = LLM(
        model=model_path, dtype=args.dtype, kv_cache_dtype=setting["kv_cache_dtype"],
        enforce_eager=True, seed=0, **kwargs,
    )
    rec: dict[str, Any] = {"startup_s": round(time.perf_counter() - start, 1)}
    try:
        t = time.perf_counter()
        ppl = quality.perplexity(llm, work["windows"], args.scored)
        rec.update(ppl=ppl.ppl, ppl_tokens=ppl.tokens, ppl_s=round(time.perf_counter() - t, 1))
        t = time.perf_counter()
        rec.update(quality.passkey_accuracy(llm, work["tokenizer"], work["passkey"]))
        rec["passkey_s"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        rec["greedy"] = quality.greedy_outputs(llm, work["agree_prompts"])
        rec["agreement_s"] = round(time.perf_counter() - t, 1)
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
    return rec


def _machine() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU: {os.cpu_count()} cores, {platform.machine()}, no GPU"


def plot(records: list[dict[str, Any]], model: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bf16 = next((r for r in records if r["kv"] == "bf16"), None)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in records:
        y = 100 * (r["ppl"] / bf16["ppl"] - 1) if bf16 else r["ppl"]
        ax.scatter(r["bytes_per_token"] / 1024, y, s=30)
        label = f'{r["kv"]} (pk {r["passkey_hits"]}/{r["passkey_trials"]})'
        ax.annotate(label, (r["bytes_per_token"] / 1024, y), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("KV bytes per token, all layers (KiB, log scale)")
    ax.set_ylabel("perplexity vs bf16 (%)" if bf16 else "perplexity")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_title(f"{model}: quality vs KV bytes per token (pk = passkey hits)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", help="smollm2 or gemma3")
    p.add_argument("--kv", default=None, help="comma-separated settings (see module doc)")
    p.add_argument("--windows", type=int, default=12, help="perplexity windows")
    p.add_argument("--window-len", type=int, default=1152, help="tokens per window")
    p.add_argument("--scored", type=int, default=64, help="scored tokens at each window end")
    p.add_argument("--passkey-lengths", default="512,1024,1536,2048")
    p.add_argument("--passkey-depths", default="0.2,0.5,0.8")
    p.add_argument("--agreement-prompts", type=int, default=8)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--kv-space-gib", default="1")
    p.add_argument("--out", default=None)
    p.add_argument("--table", action="store_true", help="print the docs table and exit")
    p.add_argument("--merge", default=None,
                   help="merge the records of another results file of the same setup")
    args = p.parse_args()
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = args.kv_space_gib
    os.environ.setdefault("KIVI_CPU_ATTN_NO_AMX", "1")  # bf16 rows: kivi_vllm/patches/cpu_amx.py

    from transformers import AutoConfig, AutoTokenizer

    from kivi_vllm import quality
    from kivi_vllm.models import ensure_model

    model_path = ensure_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    hf = AutoConfig.from_pretrained(model_path)
    out = Path(args.out) if args.out else RESULTS / f"quality-{args.model}.json"
    doc = json.loads(out.read_text()) if out.exists() else {"records": []}
    if args.table:
        print(table(doc, hf))
        return
    if args.merge:
        other = json.loads(Path(args.merge).read_text())
        if other["setup"] != doc["setup"]:
            raise SystemExit(f"{args.merge} has another setup: {other['setup']}")
        records = {r["kv"]: r for r in doc["records"] + other["records"]}
        ref = records.get("bf16")
        for r in records.values():
            r["agreement"] = quality.agreement(ref["greedy"], r["greedy"]) if ref else None
        doc["records"] = list(records.values())
        out.write_text(json.dumps(doc, indent=1) + "\n")
        plot(doc["records"], args.model, out.with_suffix(".png"))
        return
    work = {
        "tokenizer": tokenizer,
        "windows": quality.ppl_windows(tokenizer, args.windows, args.window_len),
        "passkey": quality.passkey_trials(
            tokenizer,
            [int(x) for x in args.passkey_lengths.split(",")],
            [float(x) for x in args.passkey_depths.split(",")],
        ),
        "agree_prompts": quality.agreement_prompts(tokenizer, args.agreement_prompts),
    }
    setup = {
        "windows": args.windows, "window_len": args.window_len, "scored": args.scored,
        "passkey_lengths": args.passkey_lengths, "passkey_depths": args.passkey_depths,
        "agreement_prompts": args.agreement_prompts, "dtype": args.dtype,
    }
    if doc.get("setup") not in (None, setup):
        raise SystemExit(f"{out} was made with {doc['setup']}; use --out for other sizes")
    doc.update(
        model=args.model, model_path=Path(model_path).name, setup=setup,
        machine=_machine(),
        commit=subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=RESULTS).stdout.strip() if shutil.which("git") else "",
    )
    records = {r["kv"]: r for r in doc["records"]}
    for name in split_settings(args.kv or DEFAULT_KV[args.model]):
        setting = parse_kv(name)
        print(f"[quality] {args.model} {name} ...", flush=True)
        rec = {"model": Path(model_path).name, "kv": name,
               "group_size": (setting["kivi"] or {}).get("group_size"),
               "residual": (setting["kivi"] or {}).get("residual"),
               "kivi": setting["kivi"], **bytes_per_token(setting, hf)}
        rec.update(run_setting(model_path, setting, args, work))
        rec["date"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        records[name] = rec
        ref = records.get("bf16")
        for r in records.values():
            r["agreement"] = quality.agreement(ref["greedy"], r["greedy"]) if ref else None
        doc["records"] = list(records.values())
        out.write_text(json.dumps(doc, indent=1) + "\n")
        print(
            f"[quality] {name}: ppl {rec['ppl']:.3f} ({rec['ppl_tokens']} tok), passkey "
            f"{rec['passkey_hits']}/{rec['passkey_trials']}, agreement {rec['agreement']}, "
            f"{rec['bytes_per_token']:.0f} B/token", flush=True,
        )
        plot(doc["records"], args.model, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
