"""KIVI figures on the Prometheus ``/metrics`` endpoint of vLLM's API server.

vLLM 0.26 V1 serves ``/metrics`` from the API-server process; the KIVI tail rings and
counters live in the worker processes. The route follows vLLM's endpoint-plugin contract
(``vllm/plugins/endpoint_plugins/interface.py``): the general plugin installs a worker
method (``WorkerWrapperBase.kivi_metrics``, see ``kivi_vllm/patches/metrics.py``), and
:class:`KiviMetricsEndpoint` reaches it with ``engine_client.collective_rpc`` whenever
``/metrics`` is scraped, so the figures are fresh at every scrape and nothing polls.
Static figures (capacity, bytes per token, config) are set once at start-up.

Metrics (labels ``model_name``, ``engine``, as vLLM's own):

* ``vllm:kivi_kv_cache_tokens`` - KV cache capacity in tokens (blocks x block size).
* ``vllm:kivi_bytes_per_token`` / ``vllm:kivi_unquantized_bytes_per_token`` - KV page
  bytes per token of one worker (its attention layers and KV heads), KIVI and the
  unquantized cache of the model dtype; tails excluded.
* ``vllm:kivi_tail_slots_in_use`` / ``vllm:kivi_tail_slots`` / ``vllm:kivi_tail_bytes`` -
  full-precision tail rings: slots held by running requests, slots, bytes of one
  tensor-parallel rank (summed over pipeline stages).
* ``vllm:kivi_quantized_groups_total`` - groups of ``group_size`` tokens packed into
  pages, summed over layers (counted on the host from the step metadata).
* ``vllm:kivi_config_info`` - 1, with labels ``bits``, ``group_size``, ``residual``.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from kivi_vllm.config import kivi_config_from_vllm

WORKER_METHOD = "kivi_metrics"
ENDPOINT_NAME = "kivi_metrics"
TIMEOUT_ENV = "KIVI_METRICS_TIMEOUT_S"
METRIC_NAMES = (
    "vllm:kivi_kv_cache_tokens",
    "vllm:kivi_bytes_per_token",
    "vllm:kivi_unquantized_bytes_per_token",
    "vllm:kivi_tail_slots_in_use",
    "vllm:kivi_tail_slots",
    "vllm:kivi_tail_bytes",
    "vllm:kivi_quantized_groups_total",
    "vllm:kivi_config_info",
)


def worker_kivi_metrics(wrapper: Any) -> dict[str, int]:
    """Worker side (``collective_rpc("kivi_metrics")``): this worker's dynamic figures."""
    from kivi_vllm.introspect import kivi_stats

    stats = kivi_stats()
    try:
        from vllm.distributed import get_pp_group, get_tp_group

        stats["tp_rank"] = get_tp_group().rank_in_group
        stats["pp_rank"] = get_pp_group().rank_in_group
    except (AssertionError, RuntimeError):  # groups not initialised (single process)
        stats["tp_rank"], stats["pp_rank"] = 0, 0
    return stats


def aggregate(results: list[dict[str, int]]) -> dict[str, int]:
    """Combine per-worker figures: every tensor-parallel rank holds the same slots and
    packs the same groups for its heads, so take the TP-rank-0 workers and sum over
    pipeline stages (their layers differ); slots are per sequence, hence the max."""
    if not results:
        raise ValueError("collective_rpc returned no worker results")
    leads = [r for r in results if r.get("tp_rank", 0) == 0] or results[:1]
    return {
        "tail_slots_in_use": max(r["tail_slots_in_use"] for r in leads),
        "tail_slots": max(r["tail_slots"] for r in leads),
        "tail_bytes": sum(r["tail_bytes"] for r in leads),
        "quantized_groups": sum(r["quantized_groups"] for r in leads),
    }


def static_figures(vllm_config: Any) -> dict[str, float] | None:
    """Capacity and bytes per token from the engine's config; None without KIVI."""
    cfg = kivi_config_from_vllm(vllm_config)
    if cfg is None:
        return None
    from kivi_vllm.memory import layer_format, model_bytes_per_token, num_attention_layers
    from kivi_vllm.page_format import bf16_bytes_per_token

    fmt = layer_format(vllm_config, cfg)
    layers = num_attention_layers(vllm_config)
    cache = vllm_config.cache_config
    dtype_size = vllm_config.model_config.dtype.itemsize
    blocks = int(cache.num_gpu_blocks or 0)
    if cfg.fastgen is not None:  # a block is one head-page: tokens before any eviction
        blocks //= layers * fmt.num_kv_heads
    return {
        "bits": cfg.bits,
        "group_size": cfg.group_size,
        "residual": cfg.residual,
        "kv_cache_tokens": blocks * int(cache.block_size),
        "bytes_per_token": model_bytes_per_token(vllm_config, cfg),
        "unquantized_bytes_per_token": bf16_bytes_per_token(
            fmt.num_kv_heads, fmt.head_dim, dtype_size
        ) * layers,
    }


class KiviPrometheusMetrics:
    """The KIVI collectors, registered in prometheus_client's default registry (where
    vLLM's PrometheusStatLogger registers its own; multiprocess mode is honoured)."""

    def __init__(self, model_name: str, static: dict[str, float], engine: str = "0"):
        from prometheus_client import Counter, Gauge

        labels = ["model_name", "engine"]
        values = [model_name, engine]

        def gauge(name: str, doc: str, mode: str = "mostrecent") -> Any:
            return Gauge(name, doc, labelnames=labels, multiprocess_mode=mode).labels(*values)

        self.kv_cache_tokens = gauge(
            "vllm:kivi_kv_cache_tokens", "KV cache capacity in tokens (KIVI pages)."
        )
        self.bytes_per_token = gauge(
            "vllm:kivi_bytes_per_token",
            "KIVI KV page bytes per token on one worker (all its layers; tails excluded).",
        )
        self.unquantized_bytes_per_token = gauge(
            "vllm:kivi_unquantized_bytes_per_token",
            "Bytes per token of the unquantized KV cache on one worker, for comparison.",
        )
        self.tail_slots_in_use = gauge(
            "vllm:kivi_tail_slots_in_use", "KIVI full-precision tail slots held by requests."
        )
        self.tail_slots = gauge("vllm:kivi_tail_slots", "KIVI tail slots (max_num_seqs).")
        self.tail_bytes = gauge(
            "vllm:kivi_tail_bytes",
            "Bytes of KIVI full-precision tail rings of one tensor-parallel rank.",
        )
        self.quantized_groups = Counter(
            "vllm:kivi_quantized_groups",
            "Groups of group_size tokens quantized into KIVI pages, summed over layers.",
            labelnames=labels,
        ).labels(*values)
        info = Gauge(
            "vllm:kivi_config_info", "KIVI cache configuration.",
            labelnames=[*labels, "bits", "group_size", "residual"],
            multiprocess_mode="mostrecent",
        )
        info.labels(
            *values, str(static["bits"]), str(static["group_size"]), str(static["residual"])
        ).set(1)
        self.kv_cache_tokens.set(static["kv_cache_tokens"])
        self.bytes_per_token.set(static["bytes_per_token"])
        self.unquantized_bytes_per_token.set(static["unquantized_bytes_per_token"])
        self._last_groups = 0

    def update(self, stats: dict[str, int]) -> None:
        self.tail_slots_in_use.set(stats["tail_slots_in_use"])
        self.tail_slots.set(stats["tail_slots"])
        self.tail_bytes.set(stats["tail_bytes"])
        groups = stats["quantized_groups"]
        # A smaller figure means the worker restarted: its count starts again at 0.
        self.quantized_groups.inc(groups - self._last_groups if groups >= self._last_groups
                                  else groups)
        self._last_groups = groups


class _RefreshOnScrape:
    """ASGI middleware: refresh the KIVI figures before ``/metrics`` is answered."""

    def __init__(self, app: Any, endpoint: KiviMetricsEndpoint) -> None:
        self.app = app
        self.endpoint = endpoint

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("path", "").startswith("/metrics"):
            await self.endpoint.refresh()
        await self.app(scope, receive, send)


class KiviMetricsEndpoint:
    """vLLM endpoint plugin (``EndpointPlugin`` protocol) adding the KIVI metrics.

    ``kivi_vllm/patches/metrics.py`` adds it to the plugins vLLM's API server loads, so
    no ``VLLM_PLUGINS`` allowlist is needed; it stays inactive without a KIVI config.
    """

    name = ENDPOINT_NAME
    required_tasks = ("generate",)

    def __init__(self) -> None:
        self.engine_client: Any = None
        self.metrics: KiviPrometheusMetrics | None = None
        self.timeout_s = float(os.environ.get(TIMEOUT_ENV, "5"))
        self._inflight: asyncio.Task | None = None

    def attach_router(self, app: Any) -> None:
        app.add_middleware(_RefreshOnScrape, endpoint=self)

    async def init_state(self, engine_client: Any, state: Any, args: Any) -> None:
        if engine_client is None:
            return
        static = static_figures(engine_client.vllm_config)
        if static is None:
            return
        from vllm.logger import init_logger

        self.engine_client = engine_client
        model_name = engine_client.vllm_config.model_config.served_model_name
        self.metrics = KiviPrometheusMetrics(str(model_name), static)
        await self.refresh()
        init_logger("vllm.kivi").info(
            "KIVI metrics on /metrics: %s", ", ".join(METRIC_NAMES)
        )

    async def _fetch(self) -> None:
        results = await self.engine_client.collective_rpc(
            WORKER_METHOD, timeout=self.timeout_s
        )
        assert self.metrics is not None
        self.metrics.update(aggregate(list(results)))

    async def refresh(self) -> None:
        """Ask the workers for fresh figures (one request in flight at a time); on a
        timeout or engine error the scrape gets the previous values and a warning."""
        if self.metrics is None:
            return
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.ensure_future(self._fetch())
            # A fetch that outlives its scrape still has its error retrieved (logged below
            # by the scrape that awaited it, or dropped by the next one).
            self._inflight.add_done_callback(lambda t: t.cancelled() or t.exception())
        try:
            await asyncio.wait_for(asyncio.shield(self._inflight), self.timeout_s)
        except Exception as exc:  # keep /metrics answering with the last values
            from vllm.logger import init_logger

            init_logger("vllm.kivi").warning(
                "KIVI metrics refresh failed (%s: %s); serving the previous values",
                type(exc).__name__, exc,
            )
