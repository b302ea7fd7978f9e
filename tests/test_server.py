"""The OpenAI-compatible server (``kivi-vllm serve``) with KIVI-2 and the embedded model.

One server for the module (started as a subprocess on a free port, ~1 min): completions,
chat and streaming through the official ``openai`` client, 32 concurrent streams, bad
requests, the KIVI figures on ``/metrics``, and the load-test client's JSON.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import loadtest  # noqa: E402
from benchmarks.server_process import kivi_serve_command, server_process  # noqa: E402

openai = pytest.importorskip("openai")

MAX_NUM_SEQS = 64
NUM_LAYERS, KV_HEADS, HEAD_DIM = 30, 3, 64  # SmolLM2-135M
KIVI2_BYTES_PER_TOKEN_LAYER = 144  # page_format: G32, 2 bits, d=64, 3 KV heads


@pytest.fixture(scope="module")
def server(default_model_path: str, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    cmd = kivi_serve_command(
        default_model_path, "--kv-bits", "2", "--kv-group", "32", "--kv-residual", "32",
        "--max-num-seqs", str(MAX_NUM_SEQS), "--max-model-len", "1024", "--enforce-eager",
        "--served-model-name", "smollm2", "--host", "127.0.0.1",
    )
    with server_process(
        cmd, log_path=log, env={"VLLM_CPU_KVCACHE_SPACE": "1"}, start_timeout_s=420
    ) as url:
        yield url


@pytest.fixture(scope="module")
def client(server: str):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def kivi_metrics(url: str) -> dict[str, float]:
    """The ``vllm:kivi_*`` samples of ``/metrics`` (labels dropped; one engine)."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    out = {}
    for m in re.finditer(r"^(vllm:kivi_\w+)\{[^}]*\} (\S+)$", text, re.M):
        out[m.group(1)] = float(m.group(2))
    return out


def test_models_and_health(server: str, client) -> None:
    assert httpx.get(f"{server}/health", timeout=10).status_code == 200
    assert [m.id for m in client.models.list().data] == ["smollm2"]


def test_completion(client) -> None:
    out = client.completions.create(
        model="smollm2", prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert out.choices[0].text.strip()
    assert out.usage.completion_tokens == 8 or out.choices[0].finish_reason == "stop"


def test_chat(client) -> None:
    out = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24, temperature=0,
    )
    msg = out.choices[0].message
    assert msg.role == "assistant" and msg.content.strip()
    assert out.choices[0].finish_reason in ("stop", "length")


def test_streaming_completion_and_chat(client) -> None:
    stream = client.completions.create(
        model="smollm2", prompt="Once upon a time", max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text.strip()
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12

    stream = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Name a colour."}],
        max_tokens=12, temperature=0, stream=True,
    )
    deltas = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(deltas).strip()


def test_concurrent_streams_and_live_metrics(server: str) -> None:
    """32 streaming chats at once all finish well-formed; /metrics shows the tail slots
    in use while they run and the quantized-group counter grows."""
    before = kivi_metrics(server)
    max_tokens = 40  # > one group of 32: every request packs groups during decode

    async def one(aclient, i: int) -> tuple[str, str | None, int]:
        stream = await aclient.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": f"Count to {i + 3}."}],
            max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )
        text, finish, usage = "", None, 0
        async for chunk in stream:
            if chunk.usage:
                usage = chunk.usage.completion_tokens
            if chunk.choices:
                assert chunk.choices[0].index == 0
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        return text, finish, usage

    async def main() -> tuple[list, list[float]]:
        aclient = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
        tasks = [asyncio.create_task(one(aclient, i)) for i in range(32)]
        seen = []
        async with httpx.AsyncClient(timeout=30) as http:
            while not all(t.done() for t in tasks):
                text = (await http.get(f"{server}/metrics")).text
                m = re.search(r"^vllm:kivi_tail_slots_in_use\{[^}]*\} (\S+)$", text, re.M)
                seen.append(float(m.group(1)))
                await asyncio.sleep(0.3)
        return await asyncio.gather(*tasks), seen

    results, seen = asyncio.run(main())
    assert len(results) == 32
    for text, finish, usage in results:
        assert text.strip() and finish == "length" and usage == max_tokens
    assert 0 < max(seen) <= MAX_NUM_SEQS, seen
    after = kivi_metrics(server)
    # Prompt and decode groups of 32 requests over 30 layers: at least 32 x 30 more.
    grown = after["vllm:kivi_quantized_groups_total"] - before["vllm:kivi_quantized_groups_total"]
    assert grown >= 32 * NUM_LAYERS, (before, after)
    deadline = time.monotonic() + 15
    while kivi_metrics(server)["vllm:kivi_tail_slots_in_use"] and time.monotonic() < deadline:
        time.sleep(0.3)
    assert kivi_metrics(server)["vllm:kivi_tail_slots_in_use"] == 0


def test_static_kivi_metrics(server: str) -> None:
    m = kivi_metrics(server)
    assert m["vllm:kivi_bytes_per_token"] == KIVI2_BYTES_PER_TOKEN_LAYER * NUM_LAYERS
    assert m["vllm:kivi_unquantized_bytes_per_token"] == 2 * KV_HEADS * HEAD_DIM * 2 * NUM_LAYERS
    assert m["vllm:kivi_tail_slots"] == MAX_NUM_SEQS
    assert m["vllm:kivi_tail_bytes"] > 0
    # 1 GiB of KIVI-2 pages minus the tails: ~5x what bf16 would hold (~46k tokens).
    assert 200_000 < m["vllm:kivi_kv_cache_tokens"] < 260_000
    text = httpx.get(f"{server}/metrics", timeout=30).text
    assert re.search(r'vllm:kivi_config_info\{[^}]*bits="2"[^}]*group_size="32"', text)
    assert "# TYPE vllm:kivi_quantized_groups_total counter" in text


def test_bad_requests_get_4xx_and_server_keeps_serving(server: str, client) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model="smollm2", prompt="hi", max_tokens=4, temperature=-1)
    assert exc.value.status_code == 400
    assert "error" in exc.value.response.json()

    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=4)

    with pytest.raises(openai.BadRequestError):  # prompt beyond max_model_len (1024)
        client.completions.create(model="smollm2", prompt=[1] * 2000, max_tokens=4)

    resp = httpx.post(
        f"{server}/v1/chat/completions", timeout=30,
        json={"model": "smollm2", "messages": "not a list", "max_tokens": "many"},
    )
    assert 400 <= resp.status_code < 500
    assert "error" in resp.json() or "detail" in resp.json()

    out = client.completions.create(model="smollm2", prompt="Hello", max_tokens=4)
    assert out.choices[0].text


def test_loadtest_client_json_holds_every_reported_field(
    server: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run.json"
    record = loadtest.main([
        "--base-url", server, "--label", "kivi2-cpu", "--concurrency", "2,8",
        "--num-requests", "16", "--input-len", "48", "--input-dist", "uniform",
        "--output-len", "16", "--vocab-size", "49152", "--no-progress", "--out", str(out),
    ])
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(record))
    assert [r["concurrency"] for r in saved["runs"]] == [2, 8]
    reported = re.findall(r"^  (\w+): ", printed, re.M)
    assert len(reported) == 2 * len(saved["runs"][0])
    for run in saved["runs"]:
        assert set(reported) == set(run)
        assert run["completed"] == 16 and run["failed"] == 0 and run["errors"] == {}
        assert run["total_output_tokens"] == 16 * 16  # ignore_eos: exactly max_tokens
        for key in ("ttft", "tpot", "itl", "e2el"):
            assert 0 < run[f"p50_{key}_ms"] <= run[f"p90_{key}_ms"] <= run[f"p99_{key}_ms"]
        assert run["request_throughput"] > 0 and run["output_throughput"] > 0

    # Poisson arrivals through the chat endpoint with word prompts.
    record = loadtest.main([
        "--base-url", server, "--request-rate", "4", "--num-requests", "8",
        "--endpoint", "chat", "--prompt-kind", "words", "--input-len", "20",
        "--output-len", "8", "--output-dist", "normal", "--output-spread", "0.25",
        "--no-progress",
    ])
    run = record["runs"][0]
    assert run["request_rate"] == 4.0 and run["completed"] == 8 and run["failed"] == 0


def test_metrics_aggregate_over_workers() -> None:
    from kivi_vllm.metrics import aggregate

    def worker(tp: int, pp: int, groups: int) -> dict[str, int]:
        return {"tail_slots_in_use": 3, "tail_slots": 64, "quantized_groups": groups,
                "tail_bytes": 1000, "tp_rank": tp, "pp_rank": pp}

    # TP=2 x PP=2: TP ranks repeat the same figures; pipeline stages hold different layers.
    stats = aggregate([worker(0, 0, 40), worker(1, 0, 40), worker(0, 1, 20), worker(1, 1, 20)])
    assert stats == {"tail_slots_in_use": 3, "tail_slots": 64, "tail_bytes": 2000,
                     "quantized_groups": 60}
    with pytest.raises(ValueError):
        aggregate([])


def test_loadtest_length_distributions() -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    assert set(loadtest.sample_lengths(rng, 50, 100, "fixed", 0.5, "input")) == {100}
    lens = loadtest.sample_lengths(rng, 500, 100, "uniform", 0.5, "input")
    assert lens.min() >= 50 and lens.max() <= 150 and len(set(lens)) > 20
    lens = loadtest.sample_lengths(rng, 500, 100, "normal", 0.2, "output")
    assert 90 < lens.mean() < 110 and lens.min() >= 1
    with pytest.raises(ValueError, match="--input-dist"):
        loadtest.sample_lengths(rng, 5, 100, "zipf", 0.5, "input")
    with pytest.raises(ValueError, match="--output-spread"):
        loadtest.sample_lengths(rng, 5, 100, "uniform", 1.5, "output")
