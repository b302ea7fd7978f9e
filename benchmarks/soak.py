"""Soak test of a KIVI server: rounds of mixed requests, then idle and memory checks.

    python benchmarks/soak.py --rounds 5 --requests 300 --concurrency 24 \
        --out benchmarks/results/soak-cpu.json

Without ``--base-url`` it starts ``kivi-vllm serve`` (embedded SmolLM2, KIVI-2, a small
KV cache: ``--num-gpu-blocks`` blocks of 32 tokens) on a free port. Each round sends
``--requests`` requests at ``--concurrency``: completions and chat, streaming or not,
short word prompts and long token-id prompts, max_tokens from 1 to 128, stop strings,
n up to 3, logprobs, greedy or sampled, and a few prompts over the context limit (the
one documented error: HTTP 400). Every response is validated (choices and indexes,
finish reasons, stop strings absent, logprobs well-formed, usage within bounds,
``[DONE]`` ending streams). While a round runs ``/metrics`` is sampled (KV usage,
preemptions); after it the script waits for the idle state (``vllm:kivi_tail_slots_in_use``,
``vllm:kv_cache_usage_perc``, running and waiting requests all 0) and records the RSS
of the server's process tree (psutil). Exit status 1 if any request failed, an idle
check failed, or RSS grew by more than ``--rss-growth-mib`` from round 2 to the last.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import json
import math
import os
import random
import re
import sys
import time
from typing import Any

import httpx
import psutil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.loadtest import WORDS  # noqa: E402
from benchmarks.server_process import (  # noqa: E402
    kivi_serve_command,
    save_run,
    server_process,
)

MODEL = "smollm2"
STOPS = [["."], ["\n"], [" the", "!"], ["?", ","]]
MAX_TOKENS = [1, 2, 4, 8, 16, 16, 24, 32, 48, 64, 128]
IDLE_GAUGES = ("vllm:kivi_tail_slots_in_use", "vllm:kv_cache_usage_perc",
               "vllm:num_requests_running", "vllm:num_requests_waiting")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus samples summed over label sets (``name{...} value`` lines)."""
    out: dict[str, float] = collections.defaultdict(float)
    for m in re.finditer(r"^([a-zA-Z_:][\w:]*)(?:\{[^}]*\})? (\S+)$", text, re.M):
        out[m.group(1)] += float(m.group(2))
    return dict(out)


def make_request(rng: random.Random, max_model_len: int, vocab: int) -> dict[str, Any]:
    """One random request: its endpoint, body and what a valid answer must satisfy."""
    chat = rng.random() < 0.4
    stream = rng.random() < 0.5
    too_long = rng.random() < 0.02
    long_prompt = too_long or rng.random() < 0.3
    max_tokens = rng.choice(MAX_TOKENS)
    n = rng.choice([1, 1, 1, 2, 3])
    stop = rng.choice(STOPS) if rng.random() < 0.3 else None
    logprobs = rng.random() < 0.25
    body: dict[str, Any] = {"model": MODEL, "max_tokens": max_tokens, "n": n,
                            "temperature": 0.0 if n == 1 and rng.random() < 0.5 else 0.8,
                            "seed": rng.randrange(1 << 30)}
    if stop:
        body["stop"] = stop
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    if long_prompt and not chat:
        length = max_model_len + 50 if too_long else rng.randint(200, 600)
        body["prompt"] = [rng.randrange(100, vocab) for _ in range(length)]
    else:
        words = max_model_len + 50 if too_long else rng.randint(3, 40)
        text = " ".join(rng.choice(WORDS) for _ in range(words))
        if chat:
            body["messages"] = [{"role": "user", "content": text}]
        else:
            body["prompt"] = text
    if logprobs:
        if chat:
            body["logprobs"], body["top_logprobs"] = True, 2
        else:
            body["logprobs"] = 2
    path = "/v1/chat/completions" if chat else "/v1/completions"
    return {"path": path, "body": body, "chat": chat, "expect_400": too_long}


class Invalid(Exception):
    """A response that is not complete and well-formed (message says why)."""


def _check(cond: bool, why: str) -> None:
    if not cond:
        raise Invalid(why)


def _check_logprobs(lp: Any, chat: bool, top: int) -> int:
    """Validate one choice's logprobs; returns the number of tokens they cover."""
    _check(isinstance(lp, dict), "logprobs missing")
    if chat:
        entries = lp.get("content") or []
        values = [e["logprob"] for e in entries]
        _check(all(len(e.get("top_logprobs", [])) <= top for e in entries), "top_logprobs")
    else:
        values = lp.get("token_logprobs") or []
        _check(len(values) == len(lp.get("tokens") or []), "tokens/logprobs lengths differ")
        _check(all(len(t) <= top + 1 for t in lp.get("top_logprobs") or []), "top_logprobs")
    _check(all(math.isfinite(v) and v <= 1e-4 for v in values), "logprob not finite or > 0")
    return len(values)


def validate(req: dict[str, Any], choices: dict[int, dict[str, Any]], usage: Any) -> int:
    """Check the assembled choices and usage of a 200 answer; returns completion tokens."""
    body, chat = req["body"], req["chat"]
    n, max_tokens = body["n"], body["max_tokens"]
    _check(sorted(choices) == list(range(n)), f"choice indexes {sorted(choices)} for n={n}")
    for c in choices.values():
        _check(c["finish_reason"] in ("stop", "length"), f"finish_reason {c['finish_reason']}")
        _check(isinstance(c["text"], str), "text not a string")
        for s in body.get("stop") or []:
            _check(s not in c["text"], f"stop string {s!r} in the output")
        if body.get("logprobs"):
            tokens = _check_logprobs(c["logprobs"], chat, 2)
            _check(1 <= tokens <= max_tokens, f"{tokens} logprob tokens, max_tokens {max_tokens}")
            if c["finish_reason"] == "length":
                _check(tokens == max_tokens, f"length finish after {tokens} < {max_tokens}")
    _check(isinstance(usage, dict), "usage missing")
    done = usage.get("completion_tokens", -1)
    _check(n <= done <= n * max_tokens, f"completion_tokens {done} for n={n} x {max_tokens}")
    _check(usage.get("prompt_tokens", 0) > 0, "prompt_tokens missing")
    return done


def _choice_from_full(c: dict[str, Any], chat: bool) -> dict[str, Any]:
    text = (c.get("message") or {}).get("content") if chat else c.get("text")
    if chat:
        _check((c.get("message") or {}).get("role") == "assistant", "role not assistant")
    return {"text": text or "", "finish_reason": c.get("finish_reason"),
            "logprobs": c.get("logprobs")}


async def run_one(client: httpx.AsyncClient, req: dict[str, Any], timeout_s: float
                  ) -> tuple[str, int]:
    """Send one request; returns (outcome, completion tokens). Outcome ``ok``,
    ``expected_400`` or an error kind."""
    try:
        if req["body"].get("stream"):
            return await asyncio.wait_for(_stream(client, req), timeout_s)
        resp = await asyncio.wait_for(client.post(req["path"], json=req["body"]), timeout_s)
        if resp.status_code != 200:
            return _status_outcome(req, resp.status_code, resp.content), 0
        data = resp.json()
        _check(data.get("object") == ("chat.completion" if req["chat"] else "text_completion"),
               f"object {data.get('object')}")
        choices = {c["index"]: _choice_from_full(c, req["chat"]) for c in data["choices"]}
        _check(len(choices) == len(data["choices"]), "duplicate choice index")
        return "ok", validate(req, choices, data.get("usage"))
    except Invalid as exc:
        return f"invalid: {exc}", 0
    except (asyncio.TimeoutError, httpx.TimeoutException):
        return "timeout", 0
    except httpx.HTTPError as exc:
        return f"http: {type(exc).__name__}", 0


def _status_outcome(req: dict[str, Any], status: int, content: bytes) -> str:
    try:
        err = json.loads(content)
    except ValueError:
        return f"status {status} (not JSON)"
    if req["expect_400"] and status == 400 and "error" in err:
        return "expected_400"
    return f"status {status}"


async def _stream(client: httpx.AsyncClient, req: dict[str, Any]) -> tuple[str, int]:
    chat = req["chat"]
    choices: dict[int, dict[str, Any]] = {}
    usage, done = None, False
    async with client.stream("POST", req["path"], json=req["body"]) as resp:
        if resp.status_code != 200:
            return _status_outcome(req, resp.status_code, await resp.aread()), 0
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            payload = line[len("data: "):]
            _check(not done, "data after [DONE]")
            if payload == "[DONE]":
                done = True
                continue
            chunk = json.loads(payload)
            _check("error" not in chunk, f"error chunk: {str(chunk.get('error'))[:80]}")
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk.get("choices") or []:
                cur = choices.setdefault(c["index"], {"text": "", "finish_reason": None,
                                                      "logprobs": None})
                _check(cur["finish_reason"] is None, "chunk after finish_reason")
                piece = (c.get("delta") or {}).get("content") if chat else c.get("text")
                cur["text"] += piece or ""
                if c.get("logprobs"):
                    cur["logprobs"] = _merge_logprobs(cur["logprobs"], c["logprobs"], chat)
                cur["finish_reason"] = c.get("finish_reason")
    _check(done, "stream ended without [DONE]")
    return "ok", validate(req, choices, usage)


def _merge_logprobs(acc: Any, part: dict[str, Any], chat: bool) -> dict[str, Any]:
    keys = ("content",) if chat else ("tokens", "token_logprobs", "top_logprobs")
    acc = acc or {k: [] for k in keys}
    for k in keys:
        acc[k] = (acc.get(k) or []) + (part.get(k) or [])
    return acc


def process_tree_rss(pid: int) -> dict[str, int]:
    """RSS in bytes of ``pid`` and each of its descendants, by 'name[pid]'."""
    root = psutil.Process(pid)
    out = {}
    for p in [root, *root.children(recursive=True)]:
        try:
            out[f"{p.name()}[{p.pid}]"] = p.memory_info().rss
        except psutil.Error:
            pass
    return out


def listening_pid(port: int) -> int:
    for conn in psutil.net_connections(kind="tcp"):
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN:
            return conn.pid
    raise RuntimeError(f"no process listens on port {port}")


async def metrics(client: httpx.AsyncClient) -> dict[str, float]:
    return parse_metrics((await client.get("/metrics")).text)


async def wait_idle(client: httpx.AsyncClient, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    t0 = time.monotonic()
    while True:
        m = await metrics(client)
        gauges = {g: m.get(g) for g in IDLE_GAUGES if g in m or "kivi" not in g}
        idle = all(v == 0 for v in gauges.values())  # (no KIVI gauges with --no-kivi)
        if idle or time.monotonic() > deadline:
            return {"idle": idle, "after_s": round(time.monotonic() - t0, 1), **gauges}
        await asyncio.sleep(0.5)


async def run_round(args: argparse.Namespace, base_url: str, pid: int, idx: int,
                    rng: random.Random) -> dict[str, Any]:
    reqs = [make_request(rng, args.max_model_len, args.vocab_size) for _ in range(args.requests)]
    limits = httpx.Limits(max_connections=args.concurrency + 4)
    async with httpx.AsyncClient(base_url=base_url, timeout=args.timeout_s, limits=limits) as c:
        m0 = await metrics(c)
        sem = asyncio.Semaphore(args.concurrency)
        peak = {"kv": 0.0, "tail": 0.0}

        async def guarded(r: dict[str, Any]) -> tuple[str, int]:
            async with sem:
                return await run_one(c, r, args.timeout_s)

        async def sampler() -> None:
            while True:
                m = await metrics(c)
                peak["kv"] = max(peak["kv"], m.get("vllm:kv_cache_usage_perc", 0.0))
                peak["tail"] = max(peak["tail"], m.get("vllm:kivi_tail_slots_in_use", 0.0))
                await asyncio.sleep(1.0)

        t0 = time.monotonic()
        watch = asyncio.create_task(sampler())
        results = await asyncio.gather(*(guarded(r) for r in reqs))
        watch.cancel()
        duration = time.monotonic() - t0
        idle = await wait_idle(c, args.idle_timeout_s)
        m1 = await metrics(c)
    outcomes = collections.Counter(o for o, _ in results)
    errors = {k: v for k, v in outcomes.items() if k not in ("ok", "expected_400")}
    rss = process_tree_rss(pid)
    kinds = collections.Counter(
        ("chat" if r["chat"] else "completion") + ("-stream" if r["body"].get("stream") else "")
        for r in reqs)
    record = {
        "round": idx, "sent": len(reqs), "ok": outcomes.get("ok", 0),
        "expected_400": outcomes.get("expected_400", 0), "errors": errors,
        "mix": dict(kinds), "with_n_gt_1": sum(r["body"]["n"] > 1 for r in reqs),
        "with_stop": sum("stop" in r["body"] for r in reqs),
        "with_logprobs": sum(bool(r["body"].get("logprobs")) for r in reqs),
        "completion_tokens": sum(t for _, t in results), "duration_s": round(duration, 1),
        "peak_kv_cache_usage": round(peak["kv"], 3), "peak_tail_slots_in_use": peak["tail"],
        "preemptions": m1.get("vllm:num_preemptions_total", 0.0)
        - m0.get("vllm:num_preemptions_total", 0.0),
        "idle_check": idle, "rss_bytes": rss, "rss_total_mib": round(sum(rss.values()) / 2**20, 1),
    }
    print(json.dumps({k: v for k, v in record.items() if k != "rss_bytes"}), flush=True)
    return record


def summarize(args: argparse.Namespace, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    errors: collections.Counter = collections.Counter()
    for r in rounds:
        errors.update(r["errors"])
    rss = [r["rss_total_mib"] for r in rounds]
    growth = rss[-1] - rss[1] if len(rss) > 2 else 0.0
    failures = []
    if errors:
        failures.append(f"request errors {dict(errors)}")
    bad_idle = [r["round"] for r in rounds if not r["idle_check"]["idle"]]
    if bad_idle:
        failures.append(f"not idle after rounds {bad_idle}")
    if growth > args.rss_growth_mib:
        failures.append(f"RSS grew {growth:.0f} MiB from round 2 to the last")
    return {
        "sent": sum(r["sent"] for r in rounds), "ok": sum(r["ok"] for r in rounds),
        "expected_400": sum(r["expected_400"] for r in rounds), "errors": dict(errors),
        "rss_total_mib": rss, "rss_growth_mib_round2_to_last": round(growth, 1),
        "failures": failures, "passed": not failures,
    }


async def soak(args: argparse.Namespace, base_url: str, pid: int) -> dict[str, Any]:
    rng = random.Random(args.seed)
    rounds = []
    for i in range(args.rounds):
        rounds.append(await run_round(args, base_url, pid, i + 1, rng))
    return {"rounds": rounds, "summary": summarize(args, rounds)}


def server_args(args: argparse.Namespace) -> list[str]:
    from kivi_vllm.models import ensure_default_model

    # --no-kivi: the stock bf16 cache with the same blocks of 32 tokens
    kv = (["--no-kivi", "--block-size", "32", "--num-gpu-blocks-override",
           str(args.num_gpu_blocks)] if args.no_kivi
          else ["--kv-bits", str(args.kv_bits), "--kv-group", "32", "--kv-residual", "32",
                "--num-gpu-blocks-override", str(args.num_gpu_blocks)])
    return kivi_serve_command(
        args.model or ensure_default_model(), *kv, "--max-num-seqs", str(args.max_num_seqs),
        "--max-model-len", str(args.max_model_len),
        "--enforce-eager", "--served-model-name", MODEL, "--host", "127.0.0.1",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base-url", help="a running server (its model must be served as 'smollm2')")
    p.add_argument("--model", help="model to serve (default: the embedded SmolLM2)")
    p.add_argument("--kv-bits", type=int, default=2, choices=(2, 4))
    p.add_argument("--no-kivi", action="store_true",
                   help="baseline: the stock bf16 cache, same KV tokens (idle check without KIVI)")
    p.add_argument("--num-gpu-blocks", type=int, default=64, help="KV blocks of 32 tokens")
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--vocab-size", type=int, default=49152)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--requests", type=int, default=300, help="requests per round")
    p.add_argument("--concurrency", type=int, default=24)
    p.add_argument("--timeout-s", type=float, default=900.0, help="per request")
    p.add_argument("--idle-timeout-s", type=float, default=60.0)
    p.add_argument("--rss-growth-mib", type=float, default=200.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log", default="soak-server.log")
    p.add_argument("--out")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    for name in ("rounds", "requests", "concurrency", "num_gpu_blocks"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    if args.base_url:
        cmd = None
        pid = listening_pid(int(args.base_url.rsplit(":", 1)[1].strip("/")))
        result = asyncio.run(soak(args, args.base_url, pid))
    else:
        cmd = server_args(args)
        env = {"VLLM_CPU_KVCACHE_SPACE": "1", "KIVI_METRICS_TIMEOUT_S": "60"}
        with server_process(cmd, log_path=args.log, env=env, start_timeout_s=900) as url:
            pid = listening_pid(int(url.rsplit(":", 1)[1]))
            result = asyncio.run(soak(args, url, pid))
    record = save_run(args, cmd, started, result, args.out)
    print(json.dumps(record["summary"], indent=1))
    return record


if __name__ == "__main__":
    sys.exit(0 if main()["summary"]["passed"] else 1)
