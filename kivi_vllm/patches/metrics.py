"""Serve the KIVI figures on ``/metrics`` (see :mod:`kivi_vllm.metrics`).

Two small additions: the worker method ``WorkerWrapperBase.kivi_metrics`` (reached by
name through ``collective_rpc``, so no pickled functions are needed), and the
``KiviMetricsEndpoint`` appended to the endpoint plugins vLLM's API server loads
(``vllm.plugins.load_endpoint_plugins``, looked up at call time by ``build_app``).
"""

from __future__ import annotations

import functools

from kivi_vllm.metrics import ENDPOINT_NAME, WORKER_METHOD, KiviMetricsEndpoint, worker_kivi_metrics


def apply() -> None:
    import vllm.plugins
    from vllm.v1.worker.worker_base import WorkerWrapperBase

    setattr(WorkerWrapperBase, WORKER_METHOD, worker_kivi_metrics)

    original = vllm.plugins.load_endpoint_plugins
    if getattr(original, "_kivi_wrapped", False):
        return

    @functools.wraps(original)
    def load_endpoint_plugins(supported_tasks=None):
        plugins = original(supported_tasks)
        if supported_tasks is not None and set(KiviMetricsEndpoint.required_tasks) & set(
            supported_tasks
        ) and not any(getattr(p, "name", None) == ENDPOINT_NAME for p in plugins):
            plugins.append(KiviMetricsEndpoint())
        return plugins

    load_endpoint_plugins._kivi_wrapped = True  # type: ignore[attr-defined]
    vllm.plugins.load_endpoint_plugins = load_endpoint_plugins
