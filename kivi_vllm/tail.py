"""Host-side ownership of the full-precision tail rings (one slot per running sequence).

Slots are keyed by request id. The model-runner hook releases the slots of finished
and preempted requests and binds the rows of each step's batch to their slots; the
metadata builder reads that binding once per step. The last slot is a scratch slot
for padded rows and dummy (profiling, CUDA-graph capture) batches.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


class TailSlotsExhausted(RuntimeError):
    pass


class TailSlots:
    """Request id -> (tail slot, first position the request wrote itself)."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.scratch = num_slots  # index of the extra scratch slot
        self._free = list(range(num_slots - 1, -1, -1))
        self._owner: dict[str, tuple[int, int]] = {}
        self.quantized_groups = 0  # groups packed by this worker (for metrics)
        self.peak_in_use = 0  # most requests holding a slot at once

    @property
    def in_use(self) -> int:
        return len(self._owner)

    def release(self, req_ids: Iterable[str]) -> None:
        for req_id in req_ids:
            entry = self._owner.pop(req_id, None)
            if entry is not None:
                self._free.append(entry[0])

    def bind(
        self, req_ids: Sequence[str], num_computed: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Slots and valid-from positions for the batch rows, assigning new slots."""
        slots = np.empty(len(req_ids), dtype=np.int32)
        valid_from = np.empty(len(req_ids), dtype=np.int32)
        for row, req_id in enumerate(req_ids):
            entry = self._owner.get(req_id)
            if entry is None:
                if not self._free:
                    raise TailSlotsExhausted(
                        f"all {self.num_slots} KIVI tail slots are in use; "
                        "max_num_seqs bounds the running requests"
                    )
                entry = (self._free.pop(), int(num_computed[row]))
                self._owner[req_id] = entry
            slots[row], valid_from[row] = entry
        self.peak_in_use = max(self.peak_in_use, len(self._owner))
        return slots, valid_from


class StepBinding:
    """The current step's per-row tail slots (host arrays), shared by all builders."""

    def __init__(self) -> None:
        self.tails: TailSlots | None = None
        self.slots = np.zeros(0, dtype=np.int32)
        self.valid_from = np.zeros(0, dtype=np.int32)
        self.in_dummy = False  # set while the runner executes a dummy batch

    def ensure(self, num_slots: int) -> TailSlots:
        if self.tails is None:
            self.tails = TailSlots(num_slots)
        return self.tails

    def update(
        self,
        finished: Iterable[str],
        req_ids: Sequence[str],
        num_computed: np.ndarray,
    ) -> None:
        if self.tails is None:
            return
        self.tails.release(finished)
        self.slots, self.valid_from = self.tails.bind(req_ids, num_computed)

    def count_packed_groups(
        self, seq_lens: np.ndarray, query_start_loc: np.ndarray, group: int, layers: int
    ) -> None:
        """Add the groups this step completes (for the quantized-blocks metric)."""
        if self.tails is None or self.in_dummy:
            return
        ctx = seq_lens - np.diff(query_start_loc)
        self.tails.quantized_groups += int((seq_lens // group - ctx // group).sum()) * layers

    def rows(self, num_reqs: int) -> tuple[np.ndarray, np.ndarray]:
        """(slots, valid_from) for ``num_reqs`` rows; rows past the batch use scratch."""
        slots = np.full(num_reqs, self.tails.scratch if self.tails else 0, np.int32)
        valid_from = np.zeros(num_reqs, dtype=np.int32)
        if self.in_dummy:
            return slots, valid_from
        n = min(num_reqs, len(self.slots))
        slots[:n] = self.slots[:n]
        valid_from[:n] = self.valid_from[:n]
        return slots, valid_from


STEP = StepBinding()
