"""Async load test for any OpenAI-compatible server (vLLM, kivi-vllm, ...).

Drives ``/v1/completions`` (or ``/v1/chat/completions``) with streaming requests at a
fixed concurrency or a Poisson arrival rate, one run per level, and reports request
throughput, output tokens/s, TTFT, TPOT, ITL and end-to-end latency (mean, p50, p90,
p99) and errors by kind. Every reported field is in the JSON written by ``--out``.

    python benchmarks/loadtest.py --base-url http://127.0.0.1:8000 --concurrency 1,8,32 \
        --num-requests 64 --input-len 256 --output-len 128 --out run.json

``--server-cmd "kivi-vllm serve MODEL --kv-bits 2"`` starts the server itself (on a free
port, see ``benchmarks/server_process.py``) and stops it afterwards.

Prompts are random token ids (``--prompt-kind ids``: exact lengths, any tokenizer or
``--skip-tokenizer-init``) or random words (``--prompt-kind words``: lengths in words).
With ``--vllm-extensions`` (default) requests carry ``ignore_eos`` and
``return_token_ids`` so outputs have exactly ``max_tokens`` tokens and every streamed
chunk says how many tokens it holds; without it token counts come from ``usage``.
ITL is the gap between streamed chunks (a chunk may carry several tokens); TPOT is
``(latency - TTFT) / (output tokens - 1)`` per request.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PERCENTILES = (50, 90, 99)
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
LENGTH_DISTS = ("fixed", "uniform", "normal")
WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at "
    "which but have an they you were her she there been one all we their has would when "
    "if so no will more about can said up out them some could into time only new other "
    "than then these two may first way like its any also after our over work where most "
    "through years good people between made world over well long little state very small "
    "number water city power system market river music light story model memory cache"
).split()


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2el: float = 0.0
    itl: list[float] = field(default_factory=list)

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.e2el - self.ttft) / (self.output_tokens - 1)


def sample_lengths(
    rng: np.random.Generator, n: int, mean: int, dist: str, spread: float, name: str
) -> np.ndarray:
    """``n`` lengths >= 1: fixed, uniform in mean*(1 +- spread), or normal (sd mean*spread)."""
    if dist not in LENGTH_DISTS:
        raise ValueError(f"--{name}-dist must be one of {LENGTH_DISTS}, got {dist!r}")
    if mean < 1:
        raise ValueError(f"--{name}-len must be >= 1, got {mean}")
    if not 0.0 <= spread < 1.0 and dist != "fixed":
        raise ValueError(f"--{name}-spread must be in [0, 1), got {spread}")
    if dist == "fixed":
        lens = np.full(n, mean)
    elif dist == "uniform":
        lens = rng.integers(round(mean * (1 - spread)), round(mean * (1 + spread)) + 1, n)
    else:
        lens = np.rint(rng.normal(mean, mean * spread, n))
    return np.maximum(lens, 1).astype(int)


def make_prompts(args: argparse.Namespace, n: int, seed: int) -> list[tuple[Any, int]]:
    """``n`` (prompt, max_tokens) pairs; prompts are token-id lists or word strings."""
    rng = np.random.default_rng(seed)
    in_lens = sample_lengths(rng, n, args.input_len, args.input_dist, args.input_spread, "input")
    out_lens = sample_lengths(
        rng, n, args.output_len, args.output_dist, args.output_spread, "output"
    )
    prompts: list[tuple[Any, int]] = []
    for in_len, out_len in zip(in_lens, out_lens, strict=True):
        if args.prompt_kind == "ids":
            prompt: Any = rng.integers(args.min_token_id, args.vocab_size, in_len).tolist()
        else:
            prompt = " ".join(rng.choice(WORDS, in_len))
        prompts.append((prompt, int(out_len)))
    return prompts


def request_body(args: argparse.Namespace, model: str, prompt: Any, max_tokens: int) -> dict:
    body: dict[str, Any] = {
        "model": model, "max_tokens": max_tokens, "stream": True,
        "temperature": args.temperature, "stream_options": {"include_usage": True},
    }
    if args.endpoint == "chat":
        if not isinstance(prompt, str):
            raise ValueError("--endpoint chat needs --prompt-kind words")
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if args.vllm_extensions:
        body["ignore_eos"] = True
        body["return_token_ids"] = True
    return body


def _chunk_tokens(chunk: dict, chat: bool) -> int | None:
    """Tokens in one streamed chunk when the server says (``token_ids``), else None."""
    choices = chunk.get("choices") or []
    if not choices:
        return None
    ids = choices[0].get("token_ids")
    if ids is None and chat:
        ids = (choices[0].get("delta") or {}).get("token_ids")
    return None if ids is None else len(ids)


async def send_request(session: Any, url: str, body: dict, timeout_s: float) -> RequestResult:
    """One streaming request; errors are caught and classified, never raised."""
    import aiohttp

    res = RequestResult()
    chat = "messages" in body
    start = time.perf_counter()
    last = start
    counted = 0
    usage_tokens = None
    chunks = 0
    try:
        async with session.post(
            url, json=body, timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as resp:
            if resp.status != 200:
                res.error = f"http_{resp.status}"
                await resp.read()
                return res
            buffer = b""
            async for data in resp.content.iter_any():
                buffer += data
                while b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    for line in event.split(b"\n"):
                        if not line.startswith(b"data:"):
                            continue
                        payload = line[5:].strip()
                        if payload == b"[DONE]":
                            continue
                        chunk = json.loads(payload)
                        if "error" in chunk:
                            res.error = "stream_error"
                            return res
                        if chunk.get("usage"):
                            usage_tokens = chunk["usage"].get("completion_tokens")
                            res.prompt_tokens = chunk["usage"].get("prompt_tokens", 0)
                        if not chunk.get("choices"):
                            continue
                        n = _chunk_tokens(chunk, chat)
                        choice = chunk["choices"][0]
                        text = choice.get("text") if not chat else (
                            (choice.get("delta") or {}).get("content")
                        )
                        if not n and not text:
                            continue  # role-only or empty chunk: no token yet
                        now = time.perf_counter()
                        if chunks == 0:
                            res.ttft = now - start
                        else:
                            res.itl.append(now - last)
                        last = now
                        chunks += 1
                        counted += n or 0
    except asyncio.TimeoutError:
        res.error = "timeout"
        return res
    except aiohttp.ClientError as exc:
        res.error = f"connection_{type(exc).__name__}"
        return res
    except json.JSONDecodeError:
        res.error = "malformed_chunk"
        return res
    res.e2el = time.perf_counter() - start
    res.output_tokens = usage_tokens if usage_tokens is not None else (counted or chunks)
    if chunks == 0:
        res.error = "empty_output"
        return res
    res.ok = True
    return res


async def run_level(
    args: argparse.Namespace, base_url: str, model: str, prompts: list[tuple[Any, int]],
    concurrency: int | None, rate: float | None, label: str,
) -> tuple[list[RequestResult], float]:
    """Send every prompt: at most ``concurrency`` in flight, arrivals at Poisson ``rate``."""
    import aiohttp
    from tqdm.asyncio import tqdm

    path = "/v1/chat/completions" if args.endpoint == "chat" else "/v1/completions"
    url = base_url.rstrip("/") + path
    sem = asyncio.Semaphore(concurrency) if concurrency else None
    rng = np.random.default_rng(args.seed + 1)
    bar = tqdm(total=len(prompts), desc=label, disable=args.no_progress, leave=False)

    async def one(session: Any, prompt: Any, max_tokens: int) -> RequestResult:
        body = request_body(args, model, prompt, max_tokens)
        if sem is None:
            res = await send_request(session, url, body, args.timeout)
        else:
            async with sem:
                res = await send_request(session, url, body, args.timeout)
        bar.update(1)
        return res

    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector, headers=_headers(args)) as session:
        tasks = []
        start = time.perf_counter()
        for prompt, max_tokens in prompts:
            tasks.append(asyncio.create_task(one(session, prompt, max_tokens)))
            if rate:
                await asyncio.sleep(rng.exponential(1.0 / rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    bar.close()
    return list(results), duration


def _headers(args: argparse.Namespace) -> dict[str, str]:
    key = args.api_key or os.environ.get("OPENAI_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def _stats(values: list[float], name: str, scale: float = 1000.0) -> dict[str, float | None]:
    arr = np.asarray(values, dtype=float) * scale
    out: dict[str, float | None] = {f"mean_{name}_ms": float(arr.mean()) if arr.size else None}
    for p in PERCENTILES:
        out[f"p{p}_{name}_ms"] = float(np.percentile(arr, p)) if arr.size else None
    return out


def summarize(
    results: list[RequestResult], duration: float, concurrency: int | None, rate: float | None
) -> dict[str, Any]:
    """The figures of one run (the JSON record and the printed report)."""
    ok = [r for r in results if r.ok]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error] = errors.get(r.error, 0) + 1
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    summary: dict[str, Any] = {
        "concurrency": concurrency,
        "request_rate": rate,
        "num_requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": errors,
        "duration_s": duration,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
    }
    summary.update(_stats([r.ttft for r in ok], "ttft"))
    summary.update(_stats([t for r in ok if (t := r.tpot) is not None], "tpot"))
    summary.update(_stats([x for r in ok for x in r.itl], "itl"))
    summary.update(_stats([r.e2el for r in ok], "e2el"))
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """``key: value`` lines, one per field of ``summary`` (so the JSON holds them all)."""
    lines = []
    for key, value in summary.items():
        if isinstance(value, float):
            value = f"{value:.2f}"
        elif isinstance(value, dict):
            value = json.dumps(value, sort_keys=True)
        lines.append(f"  {key}: {value}")
    return "\n".join(lines)


def server_model(base_url: str, args: argparse.Namespace) -> str:
    import requests

    resp = requests.get(base_url.rstrip("/") + "/v1/models", headers=_headers(args), timeout=30)
    resp.raise_for_status()
    return resp.json()["data"][0]["id"]


def parse_levels(spec: str | None, kind: type, name: str) -> list:
    if not spec:
        return []
    try:
        levels = [kind(x) for x in spec.split(",") if x]
    except ValueError as exc:
        raise SystemExit(f"--{name}: expected a comma-separated list of numbers, got {spec!r}")\
            from exc
    if any(v <= 0 for v in levels):
        raise SystemExit(f"--{name}: values must be > 0, got {spec!r}")
    return levels


def run_all(args: argparse.Namespace, base_url: str) -> dict[str, Any]:
    model = args.model or server_model(base_url, args)
    concurrencies = parse_levels(args.concurrency, int, "concurrency")
    rates = parse_levels(args.request_rate, float, "request-rate")
    if concurrencies and rates:
        raise SystemExit("give --concurrency or --request-rate, not both")
    if not concurrencies and not rates:
        concurrencies = [8]
    levels: list[tuple[int | None, float | None]] = (
        [(c, None) for c in concurrencies]
        or [(args.max_concurrency, r) for r in rates]
    )
    record: dict[str, Any] = {
        "label": args.label, "base_url": base_url, "model": model,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.node(), "args": vars(args), "runs": [],
    }
    if args.warmup:
        warm = make_prompts(args, args.warmup, args.seed + 99)
        asyncio.run(run_level(args, base_url, model, warm, args.warmup, None, "warm-up"))
    for i, (conc, rate) in enumerate(levels):
        n = args.num_requests or max(args.min_requests, args.requests_per_concurrency * (conc or 1))
        prompts = make_prompts(args, n, args.seed + i)
        label = f"{args.label or 'run'} c={conc}" + (f" rate={rate}" if rate else "")
        results, duration = asyncio.run(
            run_level(args, base_url, model, prompts, conc, rate, label)
        )
        summary = summarize(results, duration, conc, rate)
        record["runs"].append(summary)
        print(f"[loadtest] {label}\n{format_summary(summary)}", flush=True)
        if args.out:  # write after every level so a cut-off run keeps what it measured
            write_json(args.out, record)
    return record


def write_json(path: str, record: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=1)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = p.add_mutually_exclusive_group()
    where.add_argument("--base-url", default="http://127.0.0.1:8000")
    where.add_argument("--server-cmd", help="start this server command first (port appended)")
    p.add_argument("--server-log", default=None, help="log file of --server-cmd")
    p.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--start-timeout", type=float, default=900.0)
    p.add_argument("--model", default=None, help="model name (default: the server's first)")
    p.add_argument("--label", default="", help="name of this setting in plots and tables")
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    p.add_argument("--concurrency", default=None, help="comma list, one run each (default 8)")
    p.add_argument("--request-rate", default=None, help="comma list of Poisson rates (req/s)")
    p.add_argument("--max-concurrency", type=int, default=None, help="cap with --request-rate")
    p.add_argument("--num-requests", type=int, default=None,
                   help="requests per run (default: --requests-per-concurrency x concurrency)")
    p.add_argument("--requests-per-concurrency", type=int, default=4)
    p.add_argument("--min-requests", type=int, default=16)
    p.add_argument("--warmup", type=int, default=0, help="untimed requests before the runs")
    p.add_argument("--prompt-kind", choices=("ids", "words"), default="ids")
    p.add_argument("--vocab-size", type=int, default=32000, help="token ids are < this")
    p.add_argument("--min-token-id", type=int, default=100)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--input-dist", choices=LENGTH_DISTS, default="fixed")
    p.add_argument("--input-spread", type=float, default=0.5)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--output-dist", choices=LENGTH_DISTS, default="fixed")
    p.add_argument("--output-spread", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--no-vllm-extensions", dest="vllm_extensions", action="store_false",
                   help="plain OpenAI requests (no ignore_eos / return_token_ids)")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request seconds")
    p.add_argument("--api-key", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default=None, help="JSON file")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.prompt_kind == "ids" and args.min_token_id >= args.vocab_size:
        raise SystemExit("--min-token-id must be < --vocab-size")
    if args.endpoint == "chat" and args.prompt_kind != "words":
        raise SystemExit("--endpoint chat needs --prompt-kind words")
    if args.server_cmd is None:
        return run_all(args, args.base_url)
    from benchmarks.server_process import server_process

    env = dict(kv.split("=", 1) for kv in args.server_env)
    with server_process(
        shlex.split(args.server_cmd), log_path=args.server_log, env=env,
        start_timeout_s=args.start_timeout,
    ) as url:
        return run_all(args, url)


if __name__ == "__main__":
    main()
