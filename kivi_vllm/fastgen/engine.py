"""Worker side of FastGen in the engine (CPU reference path): profiles and kept sets.

The model-runner hook (``patches/runner.py``) calls :meth:`FastGenWorker.begin_step`
once per step with the batch rows: it releases finished and preempted requests and
extends each request's special/punctuation flags with the step's token ids. The
backend's reference path calls :meth:`FastGenWorker.attend` per row and layer: rows
before the end of the prompt attend in full (a prefill); the chunk that completes the
prompt profiles the layer on its own query rows against all prompt keys
(:func:`profile_heads`); every later row reads, per KV head, only its kept set.

This gives FastGen's attention (and its quality) inside vLLM. The KV memory of the
evicted tokens is **not** returned yet: pages still hold every token (see
docs/fastgen.md, Status, and :mod:`kivi_vllm.fastgen.manager`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kivi_vllm import reference
from kivi_vllm.config import FastGenConfig
from kivi_vllm.fastgen.attention import attend_kept, kept_indices
from kivi_vllm.fastgen.policy import NUM_POLICIES, Policy, TokenClasses
from kivi_vllm.fastgen.profile import HeadProfile, profile_heads

PROFILE_CHUNK = 256
_HISTORY = 64  # finished requests whose summary stays readable (tests, metrics)


@dataclass
class SeqState:
    """One running request: prompt length, token classes so far, per-layer profiles."""

    prompt_len: int
    special: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))
    punct: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))
    profiles: dict[str, HeadProfile] = field(default_factory=dict)

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
        }


class FastGenWorker:
    """Per-process FastGen state; inactive until :meth:`enable`."""

    def __init__(self) -> None:
        self.cfg: FastGenConfig | None = None
        self.classes: TokenClasses | None = None
        self.seqs: dict[str, SeqState] = {}
        self.rows: list[SeqState] = []
        self.history: OrderedDict[str, dict[str, Any]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.cfg is not None

    def enable(self, cfg: FastGenConfig, tokenizer: Any) -> None:
        if self.cfg is None:
            self.classes = TokenClasses.from_tokenizer(tokenizer)
        self.cfg = cfg

    def release(self, req_ids: Any) -> None:
        for req_id in req_ids:
            seq = self.seqs.pop(req_id, None)
            if seq is not None:
                self.history[req_id] = seq.summary()
                while len(self.history) > _HISTORY:
                    self.history.popitem(last=False)

    def begin_step(
        self,
        ended: set[str],
        req_ids: list[str],
        num_computed: np.ndarray,
        num_scheduled: dict[str, int],
        prompt_lens: np.ndarray,
        token_ids: np.ndarray,
    ) -> None:
        """Bind this step's rows to their requests; classify the tokens they add."""
        assert self.classes is not None
        self.release(ended)
        self.rows = []
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
            self.rows.append(seq)

    def attend(
        self,
        layer: str,
        row: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        ctx_k: torch.Tensor,
        ctx_v: torch.Tensor,
        ctx_len: int,
        scale: float,
    ) -> torch.Tensor:
        """Attention of one row's step tokens (``[q_len, H, D]``) under FastGen."""
        assert self.cfg is not None
        seq = self.rows[row]
        q_len = q.shape[0]
        n_pre = min(max(seq.prompt_len - ctx_len, 0), q_len)  # rows inside the prompt
        out = torch.empty(q_len, q.shape[1], q.shape[2], dtype=torch.float32)
        if n_pre:
            out[:n_pre] = reference.attend(q[:n_pre], k[:n_pre], v[:n_pre], ctx_k, ctx_v, scale)
        prof = seq.profiles.get(layer)
        if prof is None and n_pre and ctx_len + n_pre == seq.prompt_len:
            keys = torch.cat([ctx_k.float(), k[:n_pre].float()])
            prof = seq.profiles[layer] = profile_heads(
                q[:n_pre], keys, seq.special[: seq.prompt_len], seq.punct[: seq.prompt_len],
                recovery=self.cfg.recovery, frequent_ratio=self.cfg.frequent_ratio,
                local_ratio=self.cfg.local_ratio, scale=scale, chunk=PROFILE_CHUNK,
            )
        if n_pre == q_len:
            return out
        if prof is None:
            raise RuntimeError(f"FastGen: {layer} has no profile for a row past its prompt")
        for j in range(n_pre, q_len):
            pos = ctx_len + j
            ck = torch.cat([ctx_k.float(), k[:j].float()])
            cv = torch.cat([ctx_v.float(), v[:j].float()])
            kept = kept_indices(
                prof.policy, pos, seq.special, seq.punct, prof.frequent, prof.window
            )
            out[j : j + 1] = attend_kept(q[j : j + 1], k[j : j + 1], v[j : j + 1], ck, cv,
                                         kept, scale)
        return out


WORKER = FastGenWorker()


def fastgen_stats(worker: Any = None) -> dict[str, Any]:
    """Worker-side FastGen figures for ``LLM.collective_rpc`` (tests, metrics)."""
    return {
        "enabled": WORKER.enabled,
        "requests": len(WORKER.seqs),
        "history": dict(WORKER.history),
        "policies": [p.name.lower() for p in Policy],
    }
