"""GPU path of FastGen: each (layer, KV head, stream) is a one-head KIVI sequence.

The scheduler side, the head-page pool and the reports are the CPU path's
(:mod:`kivi_vllm.fastgen.engine`, docs/fastgen.md). Here a request's kept tokens of one
(layer, KV head) form up to two *streams* (``permanent``: special / punctuation / heavy
hitters, or all tokens of a ``full`` head; ``local``: a ``local`` head's other recent
tokens), and each stream is a virtual KIVI sequence of one KV head: its pages are
head-pages of the request's block list (``PageFormat(bits, G, D, 1)``), its newest
tokens sit in a tail ring of its own (``[2, slots * H * 2, R, 1, D]`` per layer), and
the KIVI kernels read and write it unchanged:

* decode, per layer: the read kernel over the permanent streams (with the step's own
  token) and over the local streams (positions that left the window masked by
  ``first_valid``), merged by log-sum-exp; then the store kernel appends the token to
  the stream that admits it (by policy and token class) and packs each group it completes.
* prefill: a prompt is profiled in the step that prefills it in one piece (FastGen on
  the GPU needs ``enable_chunked_prefill=False``); its attention is FlashAttention over
  the prompt, then each layer's kept tokens are gathered per stream and stored by the
  store kernel into list entries ``0, 1, ...`` in (layer, head, stream) order, so the
  request's row shrinks at the step's end with no page moves.

The host keeps a mirror of every stream (lengths, pages, window progress) and plans
each step once (one set of host-to-device copies). Profiling and the prompt's stores run
on the device with no synchronisation (list entries are handed out in order by a device
counter); the mirror of the step's profiled prompts (policies, stream lengths, local
window masks) is read back once, in :meth:`DeviceFastGen.end_step`.

Deviation from the CPU path: local-window pages recycle as there, but only whole pages
(tokens below ``first_valid`` in a kept page are masked, as on the CPU).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kivi_vllm.config import FastGenConfig, KiviConfig, KiviConfigError
from kivi_vllm.fastgen.book import PageEntries, RequestBook
from kivi_vllm.fastgen.manager import PageReport
from kivi_vllm.fastgen.policy import (
    NUM_POLICIES,
    PLAIN,
    PUNCT,
    SPECIAL,
    Policy,
    TokenClasses,
    permanent,
    prompt_streams,
)
from kivi_vllm.fastgen.profile import Prompts, profile_prompts
from kivi_vllm.page_format import layer_page_format

PROFILE_BYTES = 128 << 20  # fp32 attention rows per profiling chunk


def profile_chunk(q_heads: int, n: int) -> int:
    """Query rows per float32 profiling chunk of an ``n``-token prompt (unfused path)."""
    return max(64, PROFILE_BYTES // (4 * q_heads * n))


@dataclass
class DeviceSeq(PageEntries):
    """Host mirror of one request's streams (``[layers, kv_heads, 2]``: permanent, local)."""

    slot: int
    layers: int
    heads: int
    max_pages: int
    n: int = 0  # tokens profiled
    window: int = 0
    classes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int8))
    policy: np.ndarray | None = None  # [L, H] int8; -1 until profiled (settle_profile)
    length: np.ndarray | None = None  # [L, H, 2] tokens per stream
    entries: np.ndarray | None = None  # [L, H, 2, P] list entries of the streams' pages
    first_valid: np.ndarray | None = None  # [L, H] local tokens that left the window
    recycled: np.ndarray | None = None  # [L, H] local pages given back
    local_prompt: np.ndarray | None = None  # [window - 1, L, H] prompt positions in local
    cut: int = 0  # positions <= cut have been checked against the windows
    used: int = 0
    free: list[int] = field(default_factory=list)
    held: int = 0
    block_ids: np.ndarray | None = None
    pages_after_profile: int = 0
    layer_pages: list[int] = field(default_factory=list)  # per layer, after profiling
    group: int = 32  # kivi.group_size
    local_heads: np.ndarray | None = None  # [L, H] policy == LOCAL, once profiled
    has_local: bool = False
    slack: int = 0  # window moves before a local page may empty (a lower bound)

    def __post_init__(self) -> None:
        shape = (self.layers, self.heads)
        self.policy = np.full(shape, -1, np.int8)
        self.length = np.zeros((*shape, 2), np.int32)
        self.entries = np.full((*shape, 2, self.max_pages), -1, np.int32)
        self.first_valid = np.zeros(shape, np.int64)
        self.recycled = np.zeros(shape, np.int64)

    @property
    def profiled(self) -> bool:
        """Whether the prompt is profiled (:meth:`settle_profile` sets every layer)."""
        return bool(self.policy[0, 0] >= 0)

    def advance_window(self, qpos: int) -> None:
        """Count the local tokens that left the window of a query at ``qpos``; give back
        the local pages whose tokens all left it."""
        if self.local_heads is None:  # policies are fixed once profiled
            self.local_heads = self.policy == Policy.LOCAL
            self.has_local, self.slack = bool(self.local_heads.any()), 0
        if not self.has_local:
            return
        base = self.n - self.window + 1  # first prompt position a local stream may hold
        for c in range(max(self.cut + 1, base), qpos - self.window + 1):
            if c < self.n:
                self.first_valid += self.local_prompt[c - base]
            elif self.classes[c] == PLAIN:
                self.first_valid += self.local_heads
            self.slack -= 1  # each position moves a head's first_valid by at most one
        self.cut = max(self.cut, qpos - self.window)
        if self.slack > 0:  # no head reached its next page boundary
            return
        g = self.group
        for layer, head in zip(*np.nonzero(self.first_valid // g > self.recycled), strict=True):
            while (self.recycled[layer, head] + 1) * g <= self.first_valid[layer, head]:
                entry = int(self.entries[layer, head, 1, self.recycled[layer, head]])
                self.free.append(entry)
                self.recycled[layer, head] += 1
        self.slack = int(((self.recycled + 1) * g - self.first_valid).min())

    def settle_profile(self, policy: np.ndarray, length: np.ndarray,
                       local: np.ndarray) -> None:
        """Mirror the prompt's profiling done on the device: per layer the heads' policies
        ``[L, H]``, the streams' lengths ``[L, H, 2]`` and the local streams' masks over the
        window's prompt positions ``[L, H, w]`` (w = window - 1); list entries went out in
        (layer, head, stream) order, as :meth:`DeviceFastGen._compact` counts."""
        g = self.group
        self.policy[:] = policy
        self.length[:] = length
        self.local_prompt = local.transpose(2, 0, 1).astype(bool)
        pages = self.length // g
        ends = np.cumsum(pages.ravel()).reshape(pages.shape)
        if ends[-1, -1, -1] > self.held:
            raise RuntimeError(
                f"FastGen: request needs {ends[-1, -1, -1]} head-pages after profiling but "
                f"holds {self.held} (scheduler and worker disagree)")
        idx = np.arange(self.max_pages)
        self.entries[:] = np.where(idx < pages[..., None], (ends - pages)[..., None] + idx, -1)
        self.used, self.free = int(ends[-1, -1, -1]), []
        self.layer_pages = pages.sum(axis=(1, 2)).tolist()
        self.pages_after_profile = self.used
        self.local_heads = None

    def report(self, boundary: int | None = None, streams: int | None = None) -> PageReport:
        """The scheduler's page report; ``boundary`` and ``streams`` (of
        :func:`page_boundaries`) when the step's plan counted them already."""
        if boundary is None or streams is None:
            counts = page_boundaries(self.length[None] + 1, self.policy[None], self.group)
            boundary, streams = (int(x[0]) for x in counts)
        return PageReport(keep=self.used, need=self.used + max(boundary - len(self.free), 0),
                          tokens=int(self.classes.size), streams=streams)

    def summary(self) -> dict[str, Any]:
        counts = [int((self.policy == p).sum()) for p in range(NUM_POLICIES)]
        return {"tokens": int(self.classes.size), "prompt_len": self.n,
                "policy_counts": counts, "pages_after_profile": self.pages_after_profile,
                "layer_pages": self.layer_pages, "pages": self.used - len(self.free)}


@dataclass
class _PromptStep:
    """The prompts a step prefills (rows after the decode rows, back to back): what their
    profiling and stores need on the device, built once per step, and each layer's packed
    result for :meth:`DeviceFastGen.end_step`."""

    seqs: list[DeviceSeq]
    layout: Prompts
    special: torch.Tensor  # [T] bool
    punct: torch.Tensor  # [T] bool
    blocks: torch.Tensor  # [P * width] int32: each prompt's block-table row, flattened
    width: int
    token_row: torch.Tensor  # [T] int64: where each token's prompt's row starts in blocks
    stream_row: torch.Tensor  # [P * S, 1] int64: the same for each (prompt, stream)
    vrows: torch.Tensor  # [P * S] int64: vbt row / tail ring of each (prompt, stream)
    vrows32: torch.Tensor  # the same, int32 (the store kernel's tail slots)
    window_tokens: torch.Tensor  # [W] int64: each prompt's window positions, back to back
    window_widths: list[int]  # W per prompt
    used: torch.Tensor  # [P] int64: list entries handed out so far (device counter)
    pending: list[torch.Tensor] = field(default_factory=list)  # per layer


@dataclass
class _Plan:
    """One step's decode launches: the host arrays of the real rows, and after
    :meth:`DeviceFastGen.commit` their device copies padded to the rows vLLM runs."""

    decodes: int = 0  # real decode rows (requests)
    host: tuple[np.ndarray, ...] = ()  # slots, lens, store, store32 of the real rows
    rows: int = 0  # committed rows x KV heads (padding included); 0 until committed
    slots: torch.Tensor | None = None  # [2, rows] tail slot = vbt row of each stream
    lens: torch.Tensor | None = None  # [L, 3, rows]: permanent / local lengths + 1, first_valid
    store: torch.Tensor | None = None  # [L, rows] int64: cache slot of each row's token, -1
    store32: torch.Tensor | None = None  # [2, L, rows] int32: stream length, tail slot
    has_local: np.ndarray | None = None  # [L] bool: a layer with local streams to read
    boundary: np.ndarray | None = None  # [B] streams one more token completes a page of
    streams: np.ndarray | None = None  # [B] streams of each decode row's request
    out: torch.Tensor | None = None  # [2, rows, q per KV head, D]: the two reads' outputs
    lse: torch.Tensor | None = None  # [2, q per KV head, rows]: their LSEs


def _plan_offsets(rows: int, layers: int) -> tuple[int, int, int, int, int]:
    """int32 offsets of a committed plan's arrays in one buffer: ``slots`` [2, rows] at 0,
    ``lens`` [L, 3, rows], ``store32`` [2, L, rows] up to ``end32``, the int64 ``store``
    [L, rows] 8-byte aligned, and the total."""
    lens = 2 * rows
    store32 = lens + 3 * layers * rows
    end32 = store32 + 2 * layers * rows
    store = end32 + (end32 & 1)
    return lens, store32, end32, store, store + 2 * layers * rows


def plan_size(rows: int, layers: int) -> int:
    """int32 words of a committed plan of ``rows`` rows."""
    return _plan_offsets(rows, layers)[-1]


def plan_views(flat, rows: int, layers: int, int64):
    """(slots, lens, store32, store) as views of ``flat``, a numpy array or tensor of
    :func:`plan_size` int32 words (``int64``: its library's 64-bit integer dtype)."""
    at_lens, at_store32, end32, at_store, end = _plan_offsets(rows, layers)
    return (flat[:at_lens].reshape(2, rows), flat[at_lens:at_store32].reshape(layers, 3, rows),
            flat[at_store32:end32].reshape(2, layers, rows),
            flat[at_store:end].view(int64).reshape(layers, rows))


class DeviceFastGen(RequestBook):
    """GPU FastGen state of this worker; inactive until :meth:`enable`."""

    def __init__(self) -> None:
        super().__init__()
        self.cfg: FastGenConfig | None = None
        self.kivi: KiviConfig | None = None
        self.classes: TokenClasses | None = None
        self.rows: list[DeviceSeq] = []
        self.row_ids: list[str] = []
        self.plan = _Plan()
        self.prompts: _PromptStep | None = None
        self.peak_rows = 0
        self.timer = _Timer(cuda=False)
        self.clock = StepClock()

    @property
    def enabled(self) -> bool:
        return self.cfg is not None

    def enable(self, kivi: KiviConfig, classes: TokenClasses, layers: int, heads: int,
               head_dim: int, slots: int, max_model_len: int, device: torch.device) -> None:
        assert kivi.fastgen is not None
        self.cfg, self.kivi, self.classes = kivi.fastgen, kivi, classes
        g = kivi.group_size
        self.layers, self.heads, self.slots = layers, heads, slots
        self.fmt = layer_page_format(kivi, None, head_dim, 1)  # one-head stream pages
        self.max_pages = -(-max_model_len // g)
        self.device = device
        self.timer = _Timer(cuda=device.type == "cuda")
        self.vbt = torch.zeros((layers, (slots + 1) * heads * 2, self.max_pages),
                               dtype=torch.int32, device=device)
        # committed plans (any padded size up to every slot's rows) live here, so a CUDA
        # graph captured for one size reads each array at one address
        self.plan_buf = torch.zeros(plan_size(slots * heads, layers), dtype=torch.int32,
                                    device=device)
        self.pad_slots = self.vslot(slots, np.arange(heads)[None, :], np.arange(2)[:, None])
        self.arange = torch.arange((slots + 1) * heads * 2 + 1, dtype=torch.int32,
                                   device=device)
        self.zeros = torch.zeros_like(self.arange)

    def vslot(self, slot: int | np.ndarray, head: Any, stream: Any) -> Any:
        return (slot * self.heads + head) * 2 + stream

    # --- step bookkeeping ---------------------------------------------------------------

    def begin_step(self, ended: set[str], req_ids: list[str], num_computed: np.ndarray,
                   num_scheduled: dict[str, int], tail_slots: np.ndarray,
                   token_ids: np.ndarray, held: np.ndarray, block_rows: np.ndarray) -> None:
        """Bind rows to requests, classify their new tokens and plan the decode rows."""
        assert self.classes is not None and self.kivi is not None
        self.clock.begin()
        self.release(ended)
        self.rows, self.row_ids = [], list(req_ids)
        self.peak_rows = max(self.peak_rows, len(req_ids))
        new_tokens = []  # (seq, ids) of the tokens not classified yet
        for row, req_id in enumerate(req_ids):
            seq = self.seqs.get(req_id)
            computed = int(num_computed[row])
            if seq is None or computed == 0:  # new, or resumed after preemption
                self.release([req_id])
                seq = self.seqs[req_id] = DeviceSeq(int(tail_slots[row]), self.layers,
                                                    self.heads, self.max_pages,
                                                    group=self.kivi.group_size)
            end = computed + int(num_scheduled.get(req_id, 0))
            if end > seq.classes.size:
                new_tokens.append((seq, token_ids[row, seq.classes.size : end]))
            seq.held = int(held[row])
            seq.block_ids = block_rows[row]
            self.rows.append(seq)
        if new_tokens:  # one classification for the step
            codes = self.classes.codes(np.concatenate([ids for _, ids in new_tokens]))
            at = 0
            for seq, ids in new_tokens:
                seq.classes = np.concatenate([seq.classes, codes[at : at + ids.size]])
                at += ids.size
        self._plan_decode()
        self._plan_prompts()
        self.clock.planned(self.plan.decodes, self.prompts is not None)

    def _plan_prompts(self) -> None:
        """The step's prompts (profiled on the device in this step): their layout, token
        classes, block rows and stream rows, in one set of copies."""
        assert self.cfg is not None
        seqs = [seq for seq in self.rows if not seq.profiled]
        self.prompts = None
        if not seqs:
            return
        dev, H = self.device, self.heads  # noqa: N806
        layout = Prompts.build([seq.classes.size for seq in seqs], self.cfg.frequent_ratio,
                               self.cfg.local_ratio, self.cfg.profile_rows or None, dev)
        widths, window_tokens = [], []
        for seq, n, window, start in zip(seqs, layout.lengths, layout.windows,
                                         layout.starts[:-1], strict=True):
            seq.n, seq.window, seq.cut = n, window, n - window
            widths.append(max(window - 1, 0))  # prompt positions a local stream may hold
            window_tokens.append(start + np.arange(n - widths[-1], n))
        classes = _to(dev, np.concatenate([seq.classes for seq in seqs]), np.int8)
        blocks = np.stack([seq.block_ids for seq in seqs])
        vrows = self.vslot(np.array([seq.slot for seq in seqs])[:, None], 0, 0) + np.arange(2 * H)
        width = blocks.shape[1]
        self.prompts = _PromptStep(
            seqs, layout, classes == SPECIAL, classes == PUNCT,
            _to(dev, blocks.reshape(-1), np.int32), width, layout.prompt_of * width,
            _to(dev, np.repeat(np.arange(len(seqs)) * width, 2 * H)[:, None], np.int64),
            _to(dev, vrows.reshape(-1), np.int64), _to(dev, vrows.reshape(-1), np.int32),
            _to(dev, np.concatenate(window_tokens), np.int64), widths,
            torch.zeros(len(seqs), dtype=torch.int64, device=dev))

    def _plan_decode(self) -> None:
        """Host plan of the decode rows (profiled requests, one token each, first in the
        batch): window progress, admissions, new pages; one copy of the launch arrays."""
        assert self.kivi is not None
        decode = [seq for seq in self.rows if seq.profiled]
        if decode and not all(seq.profiled for seq in self.rows[: len(decode)]):
            raise RuntimeError("FastGen: decode rows must precede prefill rows")
        self.plan = _Plan()
        if not decode:
            return
        L, H, g = self.layers, self.heads, self.kivi.group_size  # noqa: N806
        for seq in decode:
            seq.advance_window(seq.classes.size - 1)
        length = np.stack([seq.length for seq in decode])  # [B, L, H, 2]
        policy = np.stack([seq.policy for seq in decode])
        cls = np.array([seq.classes[-1] for seq in decode])
        vslots = self.vslot(np.array([seq.slot for seq in decode])[:, None, None],
                            np.arange(H)[None, :, None], np.arange(2)[None, None, :])  # [B,H,2]
        rows = len(decode) * H
        lens = np.empty((L, 3, rows), np.int32)  # read launches: per layer, row (b, head)
        length1 = length + 1
        lens[:, :2] = length1.transpose(1, 3, 0, 2).reshape(L, 2, rows)
        lens[:, 2] = np.stack([seq.first_valid for seq in decode]).transpose(1, 0, 2).reshape(
            L, rows)
        admit = admissions(policy, cls)  # [B, L, H, 2]
        stream = admit[..., 1]  # [B, L, H]: the token joins stream ``stream`` if ``joins``
        joins = admit[..., 0] | stream  # (np.any over an axis of two is slow)
        idx = np.where(stream, length[..., 1], length[..., 0])
        # the tokens that complete a page, row-major (np.nonzero's order): their entries
        b, layer, head = np.nonzero(joins & ((idx + 1) % g == 0))
        s, page = stream[b, layer, head].astype(np.int64), idx[b, layer, head] // g
        block = np.zeros(idx.shape, np.int64)
        rows_done, first = np.unique(b, return_index=True)
        bounds = np.append(first, len(b))
        for i, j0, j1 in zip(rows_done, bounds[:-1], bounds[1:], strict=True):
            seq, part = decode[i], slice(j0, j1)
            entry = seq.new_entries(j1 - j0)
            seq.entries[layer[part], head[part], s[part], page[part]] = entry
            block[b[part], layer[part], head[part]] = seq.block_ids[entry]
        for seq, adm in zip(decode, admit, strict=True):
            seq.length += adm
        boundary, streams = page_boundaries(length1 + admit, policy, g)
        vbt_idx = (layer * self.vbt.shape[1] + vslots[b, head, s]) * self.max_pages + page
        slot = np.where(joins, block * g + idx % g, -1)  # -1: the store skips the row
        tails = vslots[:, None, :, 0] + stream  # the stream's ring is vslot(.., 0) + stream
        by_layer = np.stack([idx + 1, tails]).transpose(0, 2, 1, 3).reshape(2, L, rows)
        dev = self.device
        self.plan = _Plan(
            decodes=len(decode),
            host=(vslots.transpose(2, 0, 1).reshape(2, rows), lens,
                  slot.transpose(1, 0, 2).reshape(L, rows), by_layer),
            has_local=(policy == Policy.LOCAL).any(axis=(0, 2)),
            boundary=boundary,
            streams=streams,
        )
        if len(b):
            self.vbt.view(-1).index_copy_(0, _to(dev, vbt_idx, np.int64),
                                          _to(dev, block[b, layer, head], np.int32))

    def commit(self, decodes: int) -> None:
        """Copy the step's decode plan to the device (one copy), padded to the ``decodes``
        rows vLLM runs (a CUDA graph's batch size). A padding row reads only its own token,
        from the scratch slot's streams, and stores nothing. Each padded size has one
        layout in :attr:`plan_buf`, so a graph captured for it finds every array there."""
        plan, H, L = self.plan, self.heads, self.layers  # noqa: N806
        real, rows = plan.decodes * H, max(decodes, plan.decodes) * H
        plan.rows = rows
        if not rows:
            return
        host = np.empty(plan_size(rows, L), np.int32)  # fresh: the copy is queued
        slots, lens, store32, store = plan_views(host, rows, L, np.int64)
        if real:
            slots[:, :real], lens[..., :real], store[:, :real], store32[..., :real] = plan.host
        pad = rows - real
        slots[:, real:] = np.tile(self.pad_slots, pad // H)
        lens[:, :2, real:], lens[:, 2, real:] = 1, 0  # own token only; nothing masked
        store[:, real:], store32[0, :, real:] = -1, 0
        store32[1, :, real:] = slots[0, real:]
        buf = self.plan_buf[: host.size]
        buf.copy_(torch.from_numpy(host), non_blocking=True)
        plan.slots, plan.lens, plan.store32, plan.store = plan_views(buf, rows, L, torch.int64)

    def plan_padding(self, decodes: int) -> None:
        """A plan of ``decodes`` padding rows (vLLM's dummy batches, CUDA graph capture);
        it reads both streams in every layer, as a graph captured over it must, so the
        eager warm-up before a capture launches what the capture records."""
        self.plan = _Plan(has_local=np.ones(self.layers, bool))
        self.commit(decodes)

    # --- the backend's call ---------------------------------------------------------------

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                cache: torch.Tensor, tail: torch.Tensor, md: Any, scale: float,
                out: torch.Tensor) -> None:
        """One layer: decode rows over their streams, prefill rows by FlashAttention, then
        profiling and compaction of the prompts this step completes."""
        assert self.kivi is not None
        plan, r = self.plan, self.kivi.residual
        if plan.decodes and not plan.rows:
            raise RuntimeError("FastGen: the step's decode plan was not committed (commit)")
        if plan.rows:
            attend_context, store_step, merge = _kernels(q.is_cuda)
            nd, qpk = plan.rows // self.heads, q.shape[1] // self.heads
            shape = (plan.rows, qpk, q.shape[2])
            qv = q[:nd].reshape(shape)  # slices of the fused QKV row: reshape copies them
            kv = k[:nd].reshape(plan.rows, 1, k.shape[2])
            vv = v[:nd].reshape(plan.rows, 1, v.shape[2])
            if plan.out is None:  # one pair of buffers for every layer of the step
                plan.out = q.new_empty((2, *shape))
                plan.lse = torch.empty((2, qpk, plan.rows), dtype=torch.float32,
                                       device=q.device)
            qsl = self.arange[: plan.rows + 1]
            dst = out[:nd].view(shape)
            # a graph serves any plan of its size: both reads; else the local one only
            # where this step has local streams
            two = (q.is_cuda and torch.cuda.is_current_stream_capturing()) or bool(
                plan.has_local[layer])
            for s in (0, 1) if two else (0,):
                attend_context(qv, kv, vv, cache, tail, self.vbt[layer], plan.lens[layer, s],
                               qsl, plan.slots[s], self.zeros[: plan.rows], self.fmt, r, scale,
                               plan.out[s] if two else dst, decode=True, num_tiles=plan.rows,
                               lse_out=plan.lse[s],
                               num_splits=None if q.is_cuda else 1,  # CPU: interpreter
                               add_self=s == 0, table_by_slot=True,
                               first_valid=plan.lens[layer, 2] if s else None)
            if two:
                merge(dst, plan.out[0], plan.lse[0], plan.out[1], plan.lse[1])
            store_step(kv, vv, cache, tail, plan.store[layer], qsl, plan.store32[0, layer],
                       plan.store32[1, layer], self.fmt, r, decode=True)
        n = md.num_actual_tokens
        ndt = md.num_decode_tokens
        if n > ndt:
            from kivi_vllm.kernels.ops import _chunk_attention

            _chunk_attention(q[ndt:n], k[ndt:n], v[ndt:n], md.prefill_cu_seqlens,
                             md.max_query_len, scale, out[ndt:n])
            lengths = np.diff(md.query_start_loc_cpu.numpy()[md.num_decodes : md.num_reqs + 1])
            self._compact(layer, lengths, q[ndt:n], k[ndt:n], v[ndt:n], cache, tail, scale)

    def _compact(self, layer: int, lengths: np.ndarray, q: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor, cache: torch.Tensor, tail: torch.Tensor, scale: float) -> None:
        """Profile one layer on the step's prompts (``lengths``, back to back in q/k/v)
        and store each head's kept tokens, on the device, in one set of launches and
        without synchronising (the host mirror follows in :meth:`end_step`).

        Streams ``(prompt, head, stream)`` are laid out in order: stream ``i`` holds its
        kept tokens at rows ``qsl[i]:qsl[i + 1]`` of one store launch (the unused rest of
        the ``S * T`` rows is padding), its complete pages take list entries from its
        prompt's device counter, and its vbt row and tail ring are ``vrows[i]``.
        """
        from kivi_vllm.kernels.store import store_step

        assert self.cfg is not None and self.kivi is not None
        st = self.prompts
        assert st is not None
        lay = st.layout
        if lengths.tolist() != lay.lengths:
            raise KiviConfigError(
                "kivi.fastgen on the GPU profiles each prompt in the step that prefills it "
                "whole; start the engine with enable_chunked_prefill=False")
        T, dev, g, H = k.shape[0], k.device, self.kivi.group_size, self.heads  # noqa: N806
        S, P = 2 * H, lay.count  # noqa: N806
        self.timer.start()
        prof = profile_prompts(q, k, lay, st.special, st.punct, recovery=self.cfg.recovery,
                               scale=scale, chunk=profile_chunk(q.shape[1], max(lay.lengths)))
        pid = lay.prompt_of
        masks = torch.stack(prompt_streams(prof.policy.t()[:, pid], st.special, st.punct,
                                           prof.frequent, lay.in_window), dim=1).view(S, T)
        cums = masks.cumsum(dim=1)
        edge = torch.nn.functional.pad(cums, (1, 0))[:, lay.bounds]  # [S, P + 1]
        counts = (edge[:, 1:] - edge[:, :-1]).t().reshape(-1)  # [P * S]
        rank = cums - edge[:, :-1][:, pid] - 1  # of each kept token in its stream
        pages = counts // g
        per_prompt = pages.view(P, S)
        start = st.used[:, None] + per_prompt.cumsum(1) - per_prompt  # first list entries
        st.used = st.used + per_prompt.sum(1)
        qsl = torch.nn.functional.pad(counts.cumsum(0), (1, 0))
        page = rank.div(g, rounding_mode="floor")
        entry = (start.t()[:, pid] + page).clamp(0, st.width - 1)
        # a token of a complete page goes to its block; a tail token only needs slot >= 0
        slot = torch.where(page < per_prompt.t()[:, pid],
                           st.blocks[st.token_row + entry].long() * g, 0)
        slot = torch.cat([(slot + rank % g).view(-1), slot.new_full((1,), -1)])
        row = torch.full((S * T + 1,), S * T, dtype=torch.int64, device=dev)
        row.scatter_(0, torch.where(masks, qsl[:-1].view(P, S).t()[:, pid] + rank, S * T)
                     .view(-1), torch.arange(S * T, device=dev))
        row = row[: S * T]  # store row -> (stream, token); S * T: padding
        src = row.clamp(max=S * T - 1)
        tok, head = src % T, src // T // 2
        p = torch.arange(-(-max(lay.lengths) // g), device=dev)
        vbt = self.vbt[layer]
        old = vbt[st.vrows, : p.shape[0]]
        ent = (start.view(-1, 1) + p).clamp(0, st.width - 1)
        vbt[st.vrows, : p.shape[0]] = torch.where(p < pages[:, None],
                                                  st.blocks[st.stream_row + ent], old)
        store_step(k[tok, head].unsqueeze(1), v[tok, head].unsqueeze(1), cache, tail,
                   slot[row], qsl.to(torch.int32), counts.to(torch.int32),
                   st.vrows32, self.fmt, self.kivi.residual)
        st.pending.append(torch.cat([prof.policy.view(-1), counts,
                                     masks[1::2][:, st.window_tokens].reshape(-1).long()]))
        self.timer.stop()

    # --- after the forward ------------------------------------------------------------------

    def end_step(self, block_table: Any, req_index: dict[str, int]) -> None:
        """Mirror the step's profiling (one synchronisation), then truncate profiled
        requests' block-table rows and queue their page reports."""
        st = self.prompts
        if st is not None and st.pending:
            packed = torch.stack(st.pending).cpu().numpy()  # [L, P*H + P*S + H*W]
            L, P, H = self.layers, len(st.seqs), self.heads  # noqa: N806
            policy = packed[:, : P * H].reshape(L, P, H)
            counts = packed[:, P * H : 3 * P * H].reshape(L, P, H, 2)
            local = packed[:, 3 * P * H :].reshape(L, H, -1)
            at = np.cumsum([0, *st.window_widths])
            for i, seq in enumerate(st.seqs):
                seq.settle_profile(policy[:, i], counts[:, i], local[:, :, at[i] : at[i + 1]])
            self.timer.collect()
        self.prompts = None
        plan, decodes = self.plan, self.plan.decodes
        for i, (req_id, seq) in enumerate(zip(self.row_ids, self.rows, strict=True)):
            if i < decodes:  # counted by the plan
                self.reports[req_id] = seq.report(int(plan.boundary[i]), int(plan.streams[i]))
            elif seq.profiled:  # profiled in this step
                self.reports[req_id] = seq.report()
            else:
                continue
            row = req_index.get(req_id)
            if row is not None:
                block_table.num_blocks_per_row[row] = seq.used
        self.clock.end()

    def stats(self) -> dict[str, Any]:
        return {"requests": len(self.seqs), "peak_rows": self.peak_rows,
                "profile_s": self.timer.seconds, **self.clock.totals(),
                "live": {r: s.summary() for r, s in self.seqs.items()},
                "history": dict(self.history)}


def page_boundaries(length1: np.ndarray, policy: np.ndarray, group: int,
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Per request ``[B]``: the streams one more token would complete a page of, and the
    streams. length1: ``[B, L, H, 2]`` stream lengths + 1; policy ``[B, L, H]`` (a local
    stream exists for ``local`` heads only)."""
    local = policy == Policy.LOCAL
    full = length1 % group == 0
    boundary = full[..., 0].sum(axis=(1, 2)) + (full[..., 1] & local).sum(axis=(1, 2))
    return boundary, local[0].size + local.sum(axis=(1, 2))


def admissions(policy: np.ndarray, cls: np.ndarray) -> np.ndarray:
    """``[B, L, H, 2]`` (permanent, local) admission of each row's new token (class
    ``cls`` [B]) by heads of policies ``policy`` [B, L, H]."""
    c = cls[:, None, None]
    perm = permanent(policy, c == SPECIAL, c == PUNCT)
    return np.stack([perm, ~perm & (policy == Policy.LOCAL)], axis=-1)


class StepClock:
    """Host seconds of the worker's steps: planning (``begin_step``), and the whole span
    from ``begin_step`` to the end of ``end_step`` of decode-only steps (the plan, the
    forward's launches and the reports; the GPU runs behind them until sampling)."""

    def __init__(self) -> None:
        self.steps = self.decode_steps = self.mixed_steps = self.decode_rows = 0
        self.plan_s = self.decode_span_s = 0.0
        self.t0 = 0.0
        self.decode_only = False

    def begin(self) -> None:
        self.t0 = time.perf_counter()

    def planned(self, decode_rows: int, prompts: bool) -> None:
        self.plan_s += time.perf_counter() - self.t0
        self.steps += 1
        self.decode_only = decode_rows > 0 and not prompts
        self.mixed_steps += decode_rows > 0 and prompts
        if self.decode_only:
            self.decode_steps += 1
            self.decode_rows += decode_rows

    def end(self) -> None:
        if self.decode_only:
            self.decode_span_s += time.perf_counter() - self.t0

    def totals(self) -> dict[str, float]:
        return {"steps": self.steps, "decode_steps": self.decode_steps,
                "mixed_steps": self.mixed_steps, "decode_rows": self.decode_rows,
                "plan_s": self.plan_s, "decode_span_s": self.decode_span_s}


class _Timer:
    """Seconds between :meth:`start` and :meth:`stop`: CUDA events on the GPU (read by
    :meth:`collect` after a synchronisation), the host clock otherwise."""

    def __init__(self, cuda: bool) -> None:
        self.cuda, self.seconds = cuda, 0.0
        self.spans: list[Any] = []
        self.t0 = 0.0

    def start(self) -> None:
        if self.cuda:
            self.spans.append(torch.cuda.Event(enable_timing=True))
            self.spans[-1].record()
        else:
            self.t0 = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.spans[-1] = (self.spans[-1], end)
        else:
            self.seconds += time.perf_counter() - self.t0

    def collect(self) -> None:
        for begin, end in self.spans:
            self.seconds += begin.elapsed_time(end) / 1e3
        self.spans = []


def _to(dev: torch.device, x: Any, dtype: Any) -> torch.Tensor:
    """A host array as a contiguous device tensor (asynchronous copy)."""
    return torch.from_numpy(np.ascontiguousarray(x, dtype=dtype)).to(dev, non_blocking=True)


@functools.cache
def _kernels(cuda: bool) -> tuple[Any, Any, Any]:
    """(read, store, merge): the KIVI kernels (Triton: imported when first used) and
    vLLM's merge-attention-states kernel on the GPU, :func:`merge_states` otherwise."""
    from kivi_vllm.kernels.attention import attend_context
    from kivi_vllm.kernels.store import store_step

    if not cuda:
        return attend_context, store_step, merge_states
    from vllm.v1.attention.ops.merge_attn_states import merge_attn_states

    return attend_context, store_step, merge_attn_states


def merge_states(out: torch.Tensor, o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor,
                 lse2: torch.Tensor) -> None:
    """``out`` [T, H, D] = softmax-weighted merge of two partial attentions (LSE [H, T])."""
    m = torch.maximum(lse1, lse2)
    w1, w2 = torch.exp(lse1 - m), torch.exp(lse2 - m)
    total = w1 + w2
    w1, w2 = (w1 / total).t()[:, :, None], (w2 / total).t()[:, :, None]
    out.copy_(o1.float() * w1 + o2.float() * w2)


DEVICE = DeviceFastGen()
