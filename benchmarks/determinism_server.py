"""Server-level determinism: one greedy request alone, first of a full batch, and joining
a running full batch, with the top-2 logprobs at every position.

    nice -n 10 python benchmarks/determinism_server.py --kv kivi2 --reps 3 \
        --out benchmarks/results/determinism-server-kivi2-fp32.json

Starts ``kivi-vllm serve`` (embedded SmolLM2; ``--kv none`` = ``--no-kivi``, the stock
cache) with the settings of tests/test_determinism.py (``max_num_seqs`` 16, prefill
chunks of one group) and sends the same target request as that test through
``/v1/completions`` (token-id prompt, ``temperature`` 0, ``ignore_eos``, ``logprobs`` 2).
For each batched run it records the first position whose token differs from the run
alone, the top-2 logprob margin there (alone and batched), and the largest logprob
difference of the chosen tokens before it (how much the numerics move with the batch).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import sys
import time
from typing import Any

import httpx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.server_process import (  # noqa: E402
    kivi_serve_command,
    save_run,
    server_process,
)
from benchmarks.soak import parse_metrics  # noqa: E402

MODEL = "smollm2"
BATCH = 16
GEN = 80


def prompts(model_dir: str) -> tuple[list[list[int]], list[int]]:
    """The prompts and max_tokens of tests/test_determinism.py (target first)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(7)
    questions = [
        "Explain how a refrigerator keeps food cold, step by step.",
        *(f"Write a story about {rng.choice(['a cat', 'the sea', 'a robot', 'winter'])} "
          f"in {rng.randint(3, 9)} sentences, request {i}." for i in range(2 * BATCH - 1)),
    ]
    out = []
    for q in questions:
        text = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                       add_generation_prompt=True)
        out.append(list(tok(text, add_special_tokens=False)["input_ids"]))
    lens = [rng.choice([8, 24, 40, 64, 100]) for _ in range(2 * BATCH - 1)]
    return out, lens


async def complete(client: httpx.AsyncClient, prompt: list[int], max_tokens: int,
                   logprobs: bool) -> dict[str, Any]:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "return_token_ids": True}
    if logprobs:
        body["logprobs"] = 2
    resp = await client.post("/v1/completions", json=body)
    resp.raise_for_status()
    choice = resp.json()["choices"][0]
    out = {"token_ids": choice["token_ids"]}
    if logprobs:
        lp = choice["logprobs"]
        out["logprobs"] = lp["token_logprobs"]
        out["top2"] = [sorted(t.values(), reverse=True)[:2] for t in lp["top_logprobs"]]
    return out


async def running(client: httpx.AsyncClient) -> float:
    return parse_metrics((await client.get("/metrics")).text).get(
        "vllm:num_requests_running", 0.0)


async def batched(client: httpx.AsyncClient, target: list[int], others: list[list[int]],
                  lens: list[int], join_delay_s: float | None) -> dict[str, Any]:
    """``join_delay_s`` None: the target first; else the others first, then the target
    ``join_delay_s`` after the batch is full (it queues and joins when a slot frees)."""
    tasks = []
    if join_delay_s is None:
        tasks.append(asyncio.create_task(complete(client, target, GEN, True)))
        await asyncio.sleep(0.2)
    others_tasks = [asyncio.create_task(complete(client, p, m, False))
                    for p, m in zip(others, lens, strict=True)]
    if join_delay_s is not None:
        t0 = time.monotonic()
        while await running(client) < BATCH and time.monotonic() - t0 < 120:
            await asyncio.sleep(0.1)
        await asyncio.sleep(join_delay_s)
        tasks.append(asyncio.create_task(complete(client, target, GEN, True)))
    result = (await asyncio.gather(*tasks, *others_tasks))[0]
    result["join_delay_s"] = join_delay_s
    return result


def compare(alone: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    a, b = alone["token_ids"], run["token_ids"]
    first = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
    upto = len(a) if first is None else first
    dlp = [abs(x - y) for x, y in zip(alone["logprobs"][:upto], run["logprobs"][:upto],
                                     strict=True)]
    out = {"identical": first is None, "first_diff": first,
           "max_abs_logprob_diff_before": max(dlp) if dlp else 0.0,
           "positions_logprob_differs_before": sum(d > 0 for d in dlp)}
    if first is not None:
        ta, tb = alone["top2"][first], run["top2"][first]
        out.update(alone_top2=ta, run_top2=tb, alone_margin=ta[0] - ta[1],
                   run_margin=tb[0] - tb[1])
    return out


async def experiment(url: str, model_dir: str, reps: int) -> dict[str, Any]:
    all_prompts, lens = prompts(model_dir)
    target, others = all_prompts[0], all_prompts[1:]
    async with httpx.AsyncClient(base_url=url, timeout=1800) as client:
        alone = await complete(client, target, GEN, True)
        alone_again = await complete(client, target, GEN, True)
        runs = []
        for rep in range(reps):
            for delay in (None, 0.5 + 1.5 * rep):
                run = await batched(client, target, others, lens, delay)
                run["case"] = "first" if delay is None else "join"
                run["vs_alone"] = compare(alone, run)
                runs.append(run)
                print(run["case"], delay, json.dumps(run["vs_alone"]), flush=True)
    margins = [t[0] - t[1] for t in alone["top2"]]
    return {
        "alone": alone,
        "alone_repeat_identical": alone_again["token_ids"] == alone["token_ids"]
        and alone_again["logprobs"] == alone["logprobs"],
        "alone_min_margin": min(margins),
        "alone_margins_below_1e-3": sum(m < 1e-3 for m in margins),
        "alone_margins_below_1e-2": sum(m < 1e-2 for m in margins),
        "runs": runs,
        "diverged": sum(not r["vs_alone"]["identical"] for r in runs),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kv", choices=("kivi2", "kivi4", "none"), default="kivi2")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--reps", type=int, default=3, help="first-of-batch + joining pairs")
    p.add_argument("--log", default="determinism-server.log")
    p.add_argument("--out")
    args = p.parse_args(argv)
    if args.reps < 1:
        raise SystemExit("--reps must be >= 1")
    from kivi_vllm.models import ensure_default_model

    model_dir = ensure_default_model()
    kv = ["--no-kivi"] if args.kv == "none" else ["--kv-bits", args.kv[-1]]
    cmd = kivi_serve_command(
        model_dir, *kv, "--dtype", args.dtype, "--max-num-seqs", str(BATCH),
        "--max-model-len", "1024", "--long-prefill-token-threshold", "32",
        "--max-num-batched-tokens", "2048", "--enforce-eager", "--seed", "0",
        "--served-model-name", MODEL, "--host", "127.0.0.1",
    )
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    env = {"VLLM_CPU_KVCACHE_SPACE": "1"}
    with server_process(cmd, log_path=args.log, env=env, start_timeout_s=900) as url:
        result = asyncio.run(experiment(url, model_dir, args.reps))
    record = save_run(args, cmd, started, result, args.out)
    summary = {k: record[k] for k in ("alone_repeat_identical", "alone_min_margin",
                                      "alone_margins_below_1e-3", "diverged")}
    print(json.dumps(summary))
    return record


if __name__ == "__main__":
    main()
