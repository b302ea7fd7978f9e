"""FastGen's returned memory as admitted requests: one KV pool, with and without FastGen.

Both engines get the same KV bytes: ``--blocks`` KIVI pages (``layers`` pages of all KV
heads per block) without FastGen, and as many head-pages as fit in those bytes with it.
``--requests`` Wikipedia prompts of ``--prompt`` tokens each generate ``--output`` tokens
(EOS ignored). Reported: the most requests running at once (tail slots bound), vLLM's
preemptions, wall time and output tokens/s (CPU reference path: FastGen's per-head Python
loops make each step slower; the figure that carries to a GPU is the admitted batch).

    .venv/bin/python benchmarks/fastgen_capacity.py --recovery 0.95
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import date
from pathlib import Path
from typing import Any


def run(model: str, kivi: dict[str, Any], blocks: int, args: argparse.Namespace) -> dict:
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from kivi_vllm import quality
    from kivi_vllm.introspect import kivi_stats

    tok = AutoTokenizer.from_pretrained(model)
    prompts = quality.ppl_windows(tok, args.requests, args.prompt)
    llm = LLM(model=model, enforce_eager=True, seed=0, disable_log_stats=False,
              max_model_len=args.prompt + args.output, max_num_seqs=args.requests,
              max_num_batched_tokens=args.prompt + args.output,
              num_gpu_blocks_override=blocks, additional_config={"kivi": kivi})
    try:
        params = SamplingParams(max_tokens=args.output, temperature=0, ignore_eos=True)
        start = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        wall = time.perf_counter() - start
        stats = llm.collective_rpc(kivi_stats)[0]
        preempted = sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")
    finally:
        llm.llm_engine.engine_core.shutdown()
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"kv": json.dumps(kivi, sort_keys=True), "blocks": blocks,
            "peak_running": stats["tail_slots_peak"], "preemptions": int(preempted),
            "wall_s": round(wall, 1), "output_tokens_per_s": round(generated / wall, 2),
            "requests": len(outs), "generated": generated}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--recovery", type=float, default=0.95)
    p.add_argument("--blocks", type=int, default=48, help="KIVI pages without FastGen")
    p.add_argument("--requests", type=int, default=12)
    p.add_argument("--prompt", type=int, default=384)
    p.add_argument("--output", type=int, default=64)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc(kivi_stats)

    from transformers import AutoConfig

    from kivi_vllm.models import ensure_model
    from kivi_vllm.page_format import PageFormat

    model = ensure_model(args.model)
    hf = AutoConfig.from_pretrained(model)
    layers, heads = hf.num_hidden_layers, hf.num_key_value_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    kivi = {"bits": args.bits, "group_size": 32, "residual": 32}
    page = PageFormat(args.bits, 32, head_dim, heads).page_bytes
    head_page = PageFormat(args.bits, 32, head_dim, 1).page_bytes
    same_bytes = args.blocks * layers * page // head_page
    records = [
        run(model, kivi, args.blocks, args),
        run(model, {**kivi, "fastgen": {"recovery": args.recovery}}, same_bytes, args),
    ]
    pool_bytes = args.blocks * layers * page
    for rec in records:
        rec.update(model=Path(model).name, pool_bytes=pool_bytes, date=str(date.today()))
    out = args.out or f"benchmarks/results/fastgen-capacity-{args.model}.json"
    Path(out).write_text(json.dumps(records, indent=1))
    print(f"pool {pool_bytes / 2**20:.2f} MiB; {args.requests} requests x "
          f"{args.prompt} + {args.output} tokens")
    print("| kv | blocks | peak running | preemptions | wall s | output tok/s |")
    print("|---|---|---|---|---|---|")
    for r in records:
        print(f"| {r['kv']} | {r['blocks']} | {r['peak_running']} | {r['preemptions']} | "
              f"{r['wall_s']} | {r['output_tokens_per_s']} |")


if __name__ == "__main__":
    main()
