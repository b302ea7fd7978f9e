"""Per-request bookkeeping shared by the CPU and GPU FastGen workers."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from kivi_vllm.fastgen.manager import PageReport

HISTORY = 64  # finished requests whose summary stays readable (tests, metrics)


class RequestBook:
    """Live requests (objects with ``summary()``), their queued page reports, and the
    summaries of the last :data:`HISTORY` finished ones."""

    def __init__(self) -> None:
        self.seqs: dict[str, Any] = {}
        self.reports: dict[str, PageReport] = {}
        self.history: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def release(self, req_ids: Any) -> None:
        """Forget finished, aborted or preempted requests (their summaries kept)."""
        for req_id in req_ids:
            seq = self.seqs.pop(req_id, None)
            self.reports.pop(req_id, None)
            if seq is not None:
                self.history[req_id] = seq.summary()
                while len(self.history) > HISTORY:
                    self.history.popitem(last=False)

    def take_reports(self) -> dict[str, PageReport]:
        reports, self.reports = self.reports, {}
        return reports


class PageEntries:
    """A request's head-page list: ``used`` entries handed out, ``free`` ones recycled
    (local-window pages), ``held`` blocks the scheduler gave it (attributes of the
    dataclass that mixes this in)."""

    used: int
    free: list[int]
    held: int

    def new_entry(self) -> int:
        """A list entry for a new head-page: a recycled one, else the next unused."""
        if self.free:
            return self.free.pop()
        if self.used >= self.held:
            raise RuntimeError(
                f"FastGen: request needs head-page {self.used + 1} but holds "
                f"{self.held} (scheduler and worker disagree)"
            )
        self.used += 1
        return self.used - 1
