"""Worker side of FastGen in the engine (CPU reference path): profiles, head-pages, reports.

With ``kivi.fastgen`` a vLLM block is a *head-page* (``G`` kept tokens of one
(layer, KV head), :mod:`kivi_vllm.fastgen.manager`) and every layer views the same pool.

* The model-runner hook (``patches/runner.py``) calls :meth:`FastGenWorker.begin_step`
  once per step: it releases finished and preempted requests and classifies the step's
  token ids (special / punctuation).
* The backend calls :meth:`FastGenWorker.forward` per row and layer. Before its prompt is
  complete a request is stored like KIVI, one stream per head, head ``h`` of layer ``l``
  writing its group ``j`` to list entry ``j * L * H + l * H + h`` (the scheduler allocated
  ``L * H * cdiv(tokens, G)`` entries). The chunk that completes the prompt profiles the
  layer on its own query rows and re-packs each head's kept tokens into
  :class:`HeadStore` streams in a private scratch space (later layers still read the old
  entries in this step). Later rows attend per head over the kept set only.
* :meth:`end_step` (after the forward) moves the scratch pages to list entries
  ``0 .. U-1`` of the request, truncates the worker's block-table row to ``U`` and queues
  a :class:`PageReport` per profiled request; the runner hands them to the scheduler on
  the step's ``ModelRunnerOutput`` and the scheduler frees the entries past ``U``.

Limits of this path: kept tokens of earlier prompt chunks are re-quantized from their
dequantized values (a single-chunk prompt is packed once, from full precision); a
request's full-precision rows live in worker memory (the KIVI tail budget carved at
start-up bounds them); local-window pages are recycled inside the request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kivi_vllm import reference
from kivi_vllm.config import FastGenConfig, KiviConfig
from kivi_vllm.fastgen.attention import attend_heads
from kivi_vllm.fastgen.book import PageEntries, RequestBook
from kivi_vllm.fastgen.manager import REPORT_ATTR, PageReport
from kivi_vllm.fastgen.policy import NUM_POLICIES, Policy, TokenClasses, prompt_streams
from kivi_vllm.fastgen.profile import HeadProfile, profile_heads
from kivi_vllm.fastgen.streams import HeadStore, PageSpace, Stream
from kivi_vllm.page_format import PageFormat

PROFILE_CHUNK = 256
PROFILE_AT = "kivi_fastgen_profile_at"  # SamplingParams.extra_args key (quality harness)


@dataclass
class SeqState(PageEntries):
    """One running request: token classes, per-layer streams before and after profiling."""

    prompt_len: int
    special: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))
    punct: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))
    profiles: dict[int, HeadProfile] = field(default_factory=dict)
    prefill: dict[int, list[Stream]] = field(default_factory=dict)  # layer -> per head
    stores: dict[int, list[HeadStore]] = field(default_factory=dict)  # layer -> per head
    scratch: PageSpace | None = None  # set while the request is being compacted
    block_ids: torch.Tensor | None = None  # this step's block-table row
    held: int = 0  # entries of the row that are this request's blocks this step
    used: int = 0  # list entries 0 .. used-1 hold pages (after compaction)
    free: list[int] = field(default_factory=list)  # recycled entries below ``used``
    tokens: int = 0  # tokens stored after this step
    peak_pages: int = 0
    layer_pages: list[int] = field(default_factory=list)  # per layer, after profiling

    def summary(self) -> dict[str, Any]:
        counts = [0] * NUM_POLICIES
        for prof in self.profiles.values():
            for p in prof.policy.tolist():
                counts[p] += 1
        return {
            "tokens": int(self.special.numel()),
            "prompt_len": self.prompt_len,
            "special": int(self.special.sum()),
            "punct": int(self.punct.sum()),
            "layers_profiled": len(self.profiles),
            "policy_counts": counts,
            "pages_after_profile": self.peak_pages,
            "layer_pages": self.layer_pages,
            "pages": self.used - len(self.free),
        }


class FastGenWorker(RequestBook):
    """Per-process FastGen state; inactive until :meth:`enable`."""

    def __init__(self) -> None:
        super().__init__()
        self.cfg: FastGenConfig | None = None
        self.kivi: KiviConfig | None = None
        self.num_layers = 0
        self.classes: TokenClasses | None = None
        self.rows: list[SeqState] = []
        self.row_ids: list[str] = []
        self.pool: torch.Tensor | None = None
        self.peak_rows = 0  # most requests in one step's batch

    @property
    def enabled(self) -> bool:
        return self.cfg is not None

    def enable(self, kivi: KiviConfig, classes: TokenClasses, num_layers: int) -> None:
        assert kivi.fastgen is not None
        self.classes = classes
        self.cfg, self.kivi, self.num_layers = kivi.fastgen, kivi, num_layers

    def begin_step(
        self,
        ended: set[str],
        req_ids: list[str],
        num_computed: np.ndarray,
        num_scheduled: dict[str, int],
        prompt_lens: np.ndarray,
        token_ids: np.ndarray,
        held: np.ndarray,
    ) -> None:
        """Bind this step's rows to their requests; classify the tokens they add.

        ``held``: each row's number of blocks (head-pages) in the worker's block table.
        ``prompt_lens``: where each request is profiled (its prompt, or an earlier
        :data:`PROFILE_AT` position: later prompt tokens are then read like generated
        ones, which scores teacher-forced tokens through the kept sets)."""
        assert self.classes is not None
        self.release(ended)
        self.rows, self.row_ids = [], list(req_ids)
        self.peak_rows = max(self.peak_rows, len(req_ids))
        for row, req_id in enumerate(req_ids):
            seq = self.seqs.get(req_id)
            if seq is None:
                seq = self.seqs[req_id] = SeqState(int(prompt_lens[row]))
            end = int(num_computed[row]) + int(num_scheduled.get(req_id, 0))
            have = seq.special.numel()
            if end > have:
                special, punct = self.classes.masks(token_ids[row, have:end].tolist())
                seq.special = torch.cat([seq.special, special])
                seq.punct = torch.cat([seq.punct, punct])
            seq.held = int(held[row])
            self.rows.append(seq)

    # --- the backend's call -------------------------------------------------------

    def forward(
        self,
        layer: int,
        row: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        step: reference.SeqStep,
        pool: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """Attention of one row's step tokens (``[q_len, H, D]``) under FastGen; stores
        the step's tokens. ``pool``: the layer's KV cache (``[blocks, head_page_bytes]``)."""
        assert self.kivi is not None and self.cfg is not None
        seq = self.rows[row]
        self.pool = pool
        seq.block_ids = step.block_ids
        fmt = PageFormat(self.kivi.bits, self.kivi.group_size, q.shape[2], 1)
        space = PageSpace(fmt, pool, step.block_ids)
        ctx, q_len = step.ctx_len, step.query_len
        n_pre = min(max(seq.prompt_len - ctx, 0), q_len)  # rows inside the prompt
        out = torch.empty(q_len, q.shape[1], q.shape[2], dtype=torch.float32)
        if layer not in seq.stores:
            if n_pre == 0:
                raise RuntimeError(f"FastGen: layer {layer} has no profile for a row past "
                                   f"position {seq.prompt_len}")
            streams = seq.prefill.setdefault(layer, [self._stream() for _ in range(k.shape[1])])
            reads = [s.read(space) for s in streams]
            ck = torch.stack([r[1] for r in reads], dim=1)  # [ctx, H, D]
            cv = torch.stack([r[2] for r in reads], dim=1)
            assert ck.shape[0] == ctx, (ck.shape, ctx)
            out[:n_pre] = reference.attend(q[:n_pre], k[:n_pre], v[:n_pre], ck, cv, scale)
            if ctx + n_pre < seq.prompt_len:
                self._store_prefill(seq, layer, streams, k[:n_pre], v[:n_pre], ctx, space)
                return out
            prof = seq.profiles[layer] = profile_heads(
                q[:n_pre], torch.cat([ck, k[:n_pre].float()]),
                seq.special[: seq.prompt_len], seq.punct[: seq.prompt_len],
                recovery=self.cfg.recovery, frequent_ratio=self.cfg.frequent_ratio,
                local_ratio=self.cfg.local_ratio, scale=scale, chunk=PROFILE_CHUNK,
                rows=self.cfg.profile_rows or None,
            )
            if seq.scratch is None:
                seq.scratch = PageSpace.scratch(fmt)
            keys = torch.cat([ck.to(k.dtype), k[:n_pre]])
            values = torch.cat([cv.to(v.dtype), v[:n_pre]])
            seq.stores[layer] = self._compact(seq, prof, streams, keys, values, space)
            del seq.prefill[layer]
        stores = seq.stores[layer]
        target = seq.scratch if seq.scratch is not None else space
        for j in range(n_pre, q_len):
            pos = ctx + j
            if seq.scratch is None:
                for hs in stores:
                    seq.free.extend(hs.expired_pages(pos))
            contexts = [hs.read(target, pos)[1:] for hs in stores]
            out[j : j + 1] = attend_heads(q[j : j + 1], k[j : j + 1], v[j : j + 1], contexts,
                                          scale)
            for h, hs in enumerate(stores):
                stream = hs.admits(bool(seq.special[pos]), bool(seq.punct[pos]))
                if stream is not None:
                    stream.append([pos], k[j : j + 1, h], v[j : j + 1, h], target,
                                  self._new_page(seq, target))
        return out

    def _stream(self) -> Stream:
        assert self.kivi is not None
        return Stream(self.kivi.group_size, self.kivi.residual)

    def _new_page(self, seq: SeqState, space: PageSpace):
        if space is seq.scratch:
            return lambda _grp: space.new_scratch_row()
        return lambda _grp: seq.new_entry()

    def _store_prefill(
        self, seq: SeqState, layer: int, streams: list[Stream], k: torch.Tensor,
        v: torch.Tensor, ctx: int, space: PageSpace,
    ) -> None:
        """Before profiling: head h of layer l writes its group j to entry j*L*H + l*H + h."""
        heads = len(streams)
        stride = self.num_layers * heads
        positions = list(range(ctx, ctx + k.shape[0]))
        for h, stream in enumerate(streams):
            base = layer * heads + h
            stream.append(positions, k[:, h], v[:, h], space, lambda grp, b=base: grp * stride + b)

    def _compact(
        self, seq: SeqState, prof: HeadProfile, streams: list[Stream], keys: torch.Tensor,
        values: torch.Tensor, space: PageSpace,
    ) -> list[HeadStore]:
        """Each head's kept prompt tokens, re-packed into streams in the scratch space.

        ``full`` heads keep their pages byte for byte; the others pack their kept tokens
        (``keys``/``values``: ``[n, H, D]`` as stored, this chunk in full precision)."""
        assert seq.scratch is not None
        scratch, n = seq.scratch, keys.shape[0]
        pos = torch.arange(n)
        perm, local = prompt_streams(prof.policy[:, None], seq.special[:n], seq.punct[:n],
                                     prof.frequent[:, :n], pos > n - prof.window)
        new_page = self._new_page(seq, scratch)
        out = []
        for h, old in enumerate(streams):
            policy = int(prof.policy[h])
            if policy == Policy.FULL:
                hs = HeadStore(policy, prof.window, old.copy_to(space, scratch), None)
                n_old = len(old)
                hs.permanent.append(list(range(n_old, n)), keys[n_old:, h], values[n_old:, h],
                                    scratch, new_page)
                out.append(hs)
                continue
            hs = HeadStore(policy, prof.window, self._stream(), None)
            idx = pos[perm[h]]
            hs.permanent.append(idx.tolist(), keys[idx, h], values[idx, h], scratch, new_page)
            if policy == Policy.LOCAL:
                hs.local = self._stream()
                lidx = pos[local[h]]
                hs.local.append(lidx.tolist(), keys[lidx, h], values[lidx, h], scratch, new_page)
            out.append(hs)
        return out

    # --- after the forward ------------------------------------------------------------

    def end_step(self, block_table: Any, req_index: dict[str, int]) -> None:
        """Move compacted requests' pages into their list, truncate their block-table
        rows, and queue a page report for every profiled request of the step."""
        for req_id, seq in zip(self.row_ids, self.rows, strict=True):
            if seq.scratch is not None:
                self._relocate(seq)
            if not seq.stores or seq.prefill:
                continue  # not profiled (yet) in every layer
            seq.tokens = int(seq.special.numel())
            streams = [s for stores in seq.stores.values() for hs in stores for s in hs.streams]
            boundary = sum(s.pages_for_one_more() for s in streams)
            self.reports[req_id] = PageReport(
                keep=seq.used, need=seq.used + max(boundary - len(seq.free), 0),
                tokens=seq.tokens, streams=len(streams),
            )
            row = req_index.get(req_id)
            if row is not None:
                block_table.num_blocks_per_row[row] = seq.used

    def _relocate(self, seq: SeqState) -> None:
        """Scratch pages -> list entries 0..U-1 in (layer, head, stream) order."""
        assert seq.scratch is not None and seq.block_ids is not None and self.pool is not None
        if seq.prefill:
            raise RuntimeError(f"FastGen: layers {sorted(seq.prefill)} were not profiled "
                               "in the step that completed the prompt")
        pool = PageSpace(seq.scratch.fmt, self.pool, seq.block_ids)
        seq.used, seq.free = 0, []
        for layer in sorted(seq.stores):
            first = seq.used
            for hs in seq.stores[layer]:
                for s in hs.streams:
                    entries = [seq.new_entry() for _ in s.pages]
                    pool.copy_rows(seq.scratch, s.pages, entries)
                    s.pages = entries
            seq.layer_pages.append(seq.used - first)
        seq.scratch = None
        seq.peak_pages = seq.used


WORKER = FastGenWorker()


def attach_reports(output: Any) -> None:
    """Put the queued page reports (CPU or GPU worker) on a ``ModelRunnerOutput``."""
    from kivi_vllm.fastgen.device import DEVICE

    worker = DEVICE if DEVICE.enabled else WORKER
    if worker.enabled and worker.reports and hasattr(output, "req_ids"):
        setattr(output, REPORT_ATTR, worker.take_reports())


def fastgen_stats(worker: Any = None) -> dict[str, Any]:
    """Worker-side FastGen figures for ``LLM.collective_rpc`` (tests, metrics)."""
    from kivi_vllm.fastgen.device import DEVICE

    if DEVICE.enabled:
        return {"enabled": True, "device": "gpu", **DEVICE.stats(),
                "policies": [p.name.lower() for p in Policy]}
    return {
        "enabled": WORKER.enabled,
        "requests": len(WORKER.seqs),
        "peak_rows": WORKER.peak_rows,
        "live": {req_id: seq.summary() for req_id, seq in WORKER.seqs.items()},
        "history": dict(WORKER.history),
        "policies": [p.name.lower() for p in Policy],
    }
