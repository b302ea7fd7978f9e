"""FastGen's compression policies, token classes and the per-KV-head policy choice.

Policies are nested, cheapest first (FastGen's hybrids): ``special`` keeps special
tokens; ``punct`` adds punctuation; ``frequent`` adds the heavy hitters (largest
accumulated attention); ``local`` adds a window of the most recent tokens; ``full``
keeps everything. A query always sees its own token.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np
import torch


class Policy(IntEnum):
    SPECIAL = 0
    PUNCT = 1
    FREQUENT = 2
    LOCAL = 3
    FULL = 4


POLICY_NAMES = (
    "special",
    "special+punct",
    "special+punct+frequent",
    "special+punct+frequent+local",
    "full",
)
NUM_POLICIES = len(Policy)

# Characters a punctuation token may consist of (after stripping spaces); tokens made
# only of newlines count as punctuation too (line breaks delimit like full stops).
PUNCT_CHARS = frozenset(".,;:!?\n")
PLAIN, SPECIAL, PUNCT = 0, 1, 2  # token class codes (special wins over punctuation)


@dataclass(frozen=True)
class TokenClasses:
    """Token ids of the special and punctuation classes of a vocabulary."""

    special_ids: frozenset[int]
    punct_ids: frozenset[int]

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> TokenClasses:
        """Special ids from the tokenizer; punctuation by each token's decoded text."""
        special = frozenset(int(i) for i in tokenizer.all_special_ids)
        punct = set()
        for token_id in range(len(tokenizer)):
            if token_id in special:
                continue
            text = tokenizer.decode([token_id]).strip(" ")
            if text and set(text) <= PUNCT_CHARS:
                punct.add(token_id)
        return cls(special, frozenset(punct))

    @classmethod
    def for_engine(cls, cfg: Any, model_config: Any) -> TokenClasses:
        """The classes ``kivi.fastgen`` (``cfg``) names, else the model's tokenizer's."""
        if cfg.token_ids_given:
            return cls(frozenset(cfg.special_ids), frozenset(cfg.punct_ids))
        cfg.require_token_classes(model_config.skip_tokenizer_init)
        from transformers import AutoTokenizer

        return cls.from_tokenizer(AutoTokenizer.from_pretrained(
            model_config.tokenizer, trust_remote_code=model_config.trust_remote_code))

    @functools.cached_property
    def _sorted_ids(self) -> tuple[np.ndarray, np.ndarray]:
        return (np.array(sorted(self.special_ids), np.int64),
                np.array(sorted(self.punct_ids), np.int64))

    def codes(self, token_ids: Iterable[int] | np.ndarray) -> np.ndarray:
        """int8 class code (``PLAIN``, ``SPECIAL``, ``PUNCT``) of each of ``token_ids``."""
        ids = np.asarray(token_ids if isinstance(token_ids, np.ndarray) else list(token_ids),
                         np.int64)
        special, punct = self._sorted_ids
        out = np.full(ids.shape, PLAIN, np.int8)
        out[np.isin(ids, punct)] = PUNCT
        out[np.isin(ids, special)] = SPECIAL  # special wins over punctuation
        return out

    def masks(self, token_ids: Iterable[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(special, punct) boolean masks over the positions of ``token_ids``."""
        codes = torch.from_numpy(self.codes(token_ids))
        return codes == SPECIAL, codes == PUNCT


def budgets(num_tokens: int, frequent_ratio: float, local_ratio: float) -> tuple[int, int]:
    """(heavy hitters kept, local window) for a prompt of ``num_tokens`` tokens."""
    return math.ceil(frequent_ratio * num_tokens), math.ceil(local_ratio * num_tokens)


def permanent(policy: Any, special: Any, punct: Any) -> Any:
    """Whether a token of class (``special``, ``punct``) joins a head's permanent stream
    under ``policy`` (bools, or arrays / tensors that broadcast); heavy hitters join it at
    profiling, see :func:`prompt_streams`."""
    return (policy == Policy.FULL) | special | (punct & (policy >= Policy.PUNCT))


def prompt_streams(
    policy: torch.Tensor, special: torch.Tensor, punct: torch.Tensor, frequent: torch.Tensor,
    in_window: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each head's kept prompt tokens after profiling: bool ``[H, n]`` (permanent, local).

    policy ``[H, 1]`` (or ``[H, n]``: per token, for prompts back to back); special /
    punct / in_window ``[n]``; frequent ``[H, n]``. ``in_window``: the token lies in the
    local window of its prompt's last position, where a ``local`` head's local stream
    holds its other tokens."""
    perm = permanent(policy, special, punct) | ((policy >= Policy.FREQUENT) & frequent)
    return perm, (policy == Policy.LOCAL) & ~perm & in_window


def kept_rows(
    policy: int,
    rows: torch.Tensor,
    special: torch.Tensor,
    punct: torch.Tensor,
    frequent: torch.Tensor,
    window: int,
) -> torch.Tensor:
    """Keys each query row may read under ``policy``: bool ``[len(rows), n]``.

    rows: query positions; special/punct/frequent: bool ``[n]`` over key positions
    (``frequent`` may be shorter than ``n``: positions past it are not heavy hitters).
    Causal: key positions after a row are never kept; the row's own token always is.
    """
    n = special.shape[0]
    keys = torch.arange(n, device=special.device)
    causal = keys[None, :] <= rows[:, None]
    if policy == Policy.FULL:
        return causal
    kept = special.clone()
    if policy >= Policy.PUNCT:
        kept |= punct
    if policy >= Policy.FREQUENT:
        kept[: frequent.shape[0]] |= frequent
    out = kept[None, :] | (keys[None, :] == rows[:, None])
    if policy >= Policy.LOCAL:
        out |= keys[None, :] > rows[:, None] - window
    return out & causal


def choose_policies(recovery: torch.Tensor, num_kv_heads: int, threshold: float) -> torch.Tensor:
    """Cheapest policy per KV head whose recovery is >= ``threshold`` for every query
    head of its group.

    recovery: ``[..., num_q_heads, NUM_POLICIES]`` attention mass each policy keeps
    (leading dimensions: e.g. prompts). Returns int64 ``[..., num_kv_heads]`` (``Policy``
    values).
    """
    *lead, hq, num = recovery.shape
    if num != NUM_POLICIES or hq % num_kv_heads:
        raise ValueError(f"recovery must be [q_heads, {NUM_POLICIES}] with q_heads % kv_heads == 0")
    ok = (recovery >= threshold).view(*lead, num_kv_heads, hq // num_kv_heads, num).all(dim=-2)
    ok[..., Policy.FULL] = True
    return ok.to(torch.int8).argmax(dim=-1).to(torch.int64)
