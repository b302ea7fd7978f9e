"""Per-request bookkeeping shared by the CPU and GPU FastGen workers."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np

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
        return int(self.new_entries(1)[0])

    def new_entries(self, count: int) -> np.ndarray:
        """``count`` entries, as :meth:`new_entry` ``count`` times: recycled ones first
        (last freed first), then unused ones in order."""
        count = int(count)
        take = min(count, len(self.free))
        recycled = self.free[len(self.free) - take :][::-1]
        fresh = count - take
        if self.used + fresh > self.held:
            raise RuntimeError(
                f"FastGen: request needs head-page {self.used + fresh} but holds "
                f"{self.held} (scheduler and worker disagree)"
            )
        del self.free[len(self.free) - take :]
        self.used += fresh
        return np.array(recycled + list(range(self.used - fresh, self.used)), np.int64)
