"""Faults against a running KIVI-2 server: disconnects, cancellations, timeouts, bad input.

One server for the module (``kivi-vllm serve``, embedded SmolLM2, KIVI-2, a KV cache of
48 blocks = 1536 tokens). After clients drop streams mid-generation, cancel before the
first token or time out, ``/metrics`` must return to idle (``vllm:kivi_tail_slots_in_use``,
``vllm:kv_cache_usage_perc``, running and waiting requests all 0), well-behaved requests
running beside them must finish complete, and a greedy request must give the same text
as before the faults. Bad requests (the cases tests/test_server.py does not cover) must
get a 4xx JSON error while the server stays healthy.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.server_process import kivi_serve_command, server_process  # noqa: E402
from benchmarks.soak import IDLE_GAUGES, parse_metrics  # noqa: E402

MODEL = "smollm2"
MAX_MODEL_LEN = 1024
# vLLM 0.26.0 bug (not KIVI): the request models' mode="before" validators call
# data.get(...) on the parsed body, so a JSON array body answers 500 (AttributeError)
# instead of 4xx, on /v1/completions, /tokenize, ...; the server keeps serving.
VLLM_LIST_BODY_BUG = "vLLM 0.26.0: JSON array body -> 500 ('list' object has no attribute 'get')"
VLLM_LIST_BODY_500 = "'list' object has no attribute 'get'"
FUZZ_PATHS = "^/(v1/completions|v1/chat/completions|tokenize|detokenize|v1/models)$"
FUZZ_TIME_S = 40
GREEDY = {"model": MODEL, "prompt": "The three largest cities of Europe are", "max_tokens": 40,
          "temperature": 0}


@pytest.fixture(scope="module")
def server(default_model_path: str, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("faults") / "server.log"
    cmd = kivi_serve_command(
        default_model_path, "--kv-bits", "2", "--kv-group", "32", "--kv-residual", "32",
        "--max-num-seqs", "16", "--max-model-len", str(MAX_MODEL_LEN),
        "--num-gpu-blocks-override", "48", "--enforce-eager", "--served-model-name", MODEL,
        "--host", "127.0.0.1",
    )
    with server_process(
        cmd, log_path=log, env={"VLLM_CPU_KVCACHE_SPACE": "1", "KIVI_METRICS_TIMEOUT_S": "60"},
        start_timeout_s=600,
    ) as url:
        yield url


@pytest.fixture(scope="module")
def greedy_before(server: str) -> str:
    """The greedy reference text, taken before any fault."""
    resp = httpx.post(f"{server}/v1/completions", json=GREEDY, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["text"]


def gauges(url: str) -> dict[str, float]:
    # a scrape waits for the workers (KIVI_METRICS_TIMEOUT_S): up to a busy engine step
    m = parse_metrics(httpx.get(f"{url}/metrics", timeout=120).text)
    return {g: m.get(g, float("nan")) for g in IDLE_GAUGES}


def assert_idle(url: str, timeout_s: float = 30.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    while True:
        g = gauges(url)
        if all(v == 0 for v in g.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert all(v == 0 for v in g.values()), f"not idle after {timeout_s} s: {g}"
    return g


def long_body(stream: bool, max_tokens: int = 400, prompt_len: int = 24) -> dict:
    return {"model": MODEL, "prompt": [100 + i for i in range(prompt_len)],
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": stream}


async def _good_stream(client: httpx.AsyncClient, max_tokens: int) -> int:
    """A well-behaved stream; returns its completion tokens (usage)."""
    body = {**long_body(True, max_tokens), "stream_options": {"include_usage": True}}
    usage, done = 0, False
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                usage = (chunk.get("usage") or {}).get("completion_tokens", usage)
    assert done
    return usage


def test_disconnect_mid_stream_frees_memory(server: str, greedy_before: str) -> None:
    """Six streams dropped after a few chunks while two good streams run beside them."""
    async def drop_after(client: httpx.AsyncClient, chunks: int) -> int:
        seen = 0
        async with client.stream("POST", "/v1/completions", json=long_body(True)) as resp:
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                seen += line.startswith("data: ")
                if seen >= chunks:
                    break  # leaving the context closes the connection
        return seen

    async def main() -> tuple[list[int], list[int], float]:
        async with httpx.AsyncClient(base_url=server, timeout=300) as good, \
                httpx.AsyncClient(base_url=server, timeout=300) as bad:
            goods = [asyncio.create_task(_good_stream(good, 60)) for _ in range(2)]
            dropped = await asyncio.gather(*(drop_after(bad, 3 + i) for i in range(6)))
            busy = gauges(server)["vllm:kivi_tail_slots_in_use"]
            return dropped, await asyncio.gather(*goods), busy

    dropped, good, busy = asyncio.run(main())
    assert all(n >= 3 for n in dropped)
    assert busy >= 1  # the good streams (and maybe dropped ones not yet aborted) hold slots
    assert good == [60, 60]
    assert_idle(server)


def test_cancel_before_first_token_frees_memory(server: str) -> None:
    """Requests whose connection closes right after the request is sent (long prompts,
    streaming and not): the server aborts them; nothing stays allocated."""
    host, port = urlparse(server).hostname, urlparse(server).port
    for i in range(8):
        body = json.dumps(long_body(i % 2 == 0, prompt_len=900, max_tokens=100)).encode()
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
            )
            time.sleep(0.05 * (i % 4))
    assert_idle(server, timeout_s=60)


def test_client_timeouts_free_memory(server: str, greedy_before: str) -> None:
    """Non-streaming clients that give up (read timeout) before generation ends."""
    async def main() -> list[str]:
        async with httpx.AsyncClient(base_url=server, timeout=2.0) as client:
            async def one() -> str:
                try:
                    await client.post("/v1/completions", json=long_body(False, 600))
                except httpx.ReadTimeout:
                    return "timeout"
                return "finished"
            return await asyncio.gather(*(one() for _ in range(6)))

    assert asyncio.run(main()) == ["timeout"] * 6
    assert_idle(server, timeout_s=60)
    # and the server still serves: the same greedy text as before the faults
    resp = httpx.post(f"{server}/v1/completions", json=GREEDY, timeout=120)
    assert resp.status_code == 200 and resp.json()["choices"][0]["text"] == greedy_before


BAD_REQUESTS = {
    "malformed_json": ("/v1/completions", b'{"model": "smollm2", "prompt": "hi", '),
    "json_not_object": pytest.param(
        ("/v1/completions", b"[1, 2, 3]"),
        marks=pytest.mark.xfail(strict=True, reason=VLLM_LIST_BODY_BUG)),
    "empty_body": ("/v1/completions", b""),
    "prompt_wrong_type": ("/v1/completions", {"model": MODEL, "prompt": {"a": 1}}),
    "n_wrong_type": ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": "two"}),
    "stop_wrong_type": ("/v1/completions", {"model": MODEL, "prompt": "hi", "stop": 7}),
    "max_tokens_negative": ("/v1/completions", {"model": MODEL, "prompt": "hi",
                                                "max_tokens": -5}),
    "max_tokens_huge": ("/v1/completions", {"model": MODEL, "prompt": "hi",
                                            "max_tokens": 10**9}),
    "max_tokens_beyond_int64": ("/v1/completions", {"model": MODEL, "prompt": "hi",
                                                    "max_tokens": 10**30}),
    "max_tokens_float": ("/v1/completions", {"model": MODEL, "prompt": "hi",
                                             "max_tokens": 1.5}),
    "logprobs_too_many": ("/v1/completions", {"model": MODEL, "prompt": "hi",
                                              "logprobs": 10**6}),
    "chat_max_tokens_negative": ("/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}),
    "chat_prompt_over_context": ("/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": "word " * 3000}],
        "max_tokens": 4}),
    "chat_unknown_model": ("/v1/chat/completions", {
        "model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}),
    "chat_message_without_role": ("/v1/chat/completions", {
        "model": MODEL, "messages": [{"content": "hi"}]}),
    "prompt_ids_out_of_vocab": ("/v1/completions", {"model": MODEL, "prompt": [10**7, 5],
                                                    "max_tokens": 2}),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS.values()), ids=list(BAD_REQUESTS))
def test_bad_request_gets_4xx_json(server: str, case: tuple[str, object]) -> None:
    path, body = case
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = httpx.post(f"{server}{path}", content=content, timeout=60,
                      headers={"Content-Type": "application/json"})
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.text[:300])
    err = resp.json()
    assert "error" in err or "detail" in err, err
    assert httpx.get(f"{server}/health", timeout=10).status_code == 200


@pytest.mark.slow
def test_schemathesis_fuzz_no_server_errors(server: str, tmp_path: Path) -> None:
    """Property-based fuzzing of the generation endpoints from the server's own
    /openapi.json (schemathesis, valid and invalid inputs, bounded in time): no 5xx."""
    pytest.importorskip("schemathesis")
    exe = Path(sys.executable).with_name("schemathesis")
    report = tmp_path / "fuzz.ndjson"
    proc = subprocess.run(
        [str(exe), "--no-color", "run", f"{server}/openapi.json", "--checks", "not_a_server_error",
         "--include-path-regex", FUZZ_PATHS, "--max-time", str(FUZZ_TIME_S),
         "--max-examples", "30", "--request-timeout", "60", "--seed", "0",
         "--generation-deterministic", "--workers", "1", "--report", "ndjson",
         "--report-ndjson-path", str(report)],
        capture_output=True, text=True, timeout=FUZZ_TIME_S + 120,
    )
    out = proc.stdout
    print(out[-3000:])
    assert "Coverage" in out and "Fuzzing" in out, out[-3000:] + proc.stderr[-2000:]
    # every server error found must be the known vLLM bug (see VLLM_LIST_BODY_BUG)
    errors = re.findall(r"\[(5\d\d)\][^\n]*\n\s*\n\s*`([^`]*)`", out)
    unknown = [e for e in errors if VLLM_LIST_BODY_500 not in e[1]]
    assert not unknown, out[-3000:]
    kinds = re.findall(r"^\s*- ([A-Z]{2}\d{3} [^\n]*)$", out, re.M)
    assert set(kinds) <= {"ST101 Server error"}, kinds  # no other kind of failure
    assert proc.returncode == 0 or (errors and len(kinds) == len(errors)), out[-3000:]
    assert httpx.get(f"{server}/health", timeout=10).status_code == 200


def test_serves_after_bad_input(server: str, greedy_before: str) -> None:
    assert_idle(server)
    resp = httpx.post(f"{server}/v1/completions", json=GREEDY, timeout=120)
    assert resp.status_code == 200 and resp.json()["choices"][0]["text"] == greedy_before
