"""Per-KV-head attention over kept tokens, and KIVI storage of a head's kept tokens."""

from __future__ import annotations

import torch

from kivi_vllm import reference
from kivi_vllm.fastgen.policy import kept_rows
from kivi_vllm.page_format import PageFormat


def kept_indices(
    policy: torch.Tensor,
    ctx_len: int,
    special: torch.Tensor,
    punct: torch.Tensor,
    frequent: torch.Tensor,
    window: int,
) -> list[torch.Tensor]:
    """Context positions (< ``ctx_len``) each KV head keeps for a query at ``ctx_len``.

    policy: ``[kv_heads]``; special/punct: bool ``[>= ctx_len]``; frequent: bool
    ``[kv_heads, n_prompt]``. The query's own token is not context (it is the step's).
    """
    row = torch.tensor([ctx_len])
    out = []
    for h in range(policy.shape[0]):
        mask = kept_rows(
            int(policy[h]), row, special[: ctx_len + 1], punct[: ctx_len + 1],
            frequent[h, : ctx_len + 1], window,
        )[0, :ctx_len]
        out.append(mask.nonzero().flatten())
    return out


def attend_heads(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    contexts: list[tuple[torch.Tensor, torch.Tensor]],
    scale: float,
) -> torch.Tensor:
    """Causal GQA attention in which KV head ``h`` reads its own context ``contexts[h]``
    (keys, values ``[c_h, D]``), then the step's tokens.

    query ``[q, Hq, D]``; key/value ``[q, Hk, D]`` (the step's tokens, always read).
    Returns float32 ``[q, Hq, D]``.
    """
    q_len, hq, d = query.shape
    hk = key.shape[1]
    g = hq // hk
    out = torch.empty(q_len, hq, d, dtype=torch.float32)
    causal = torch.arange(q_len)[None, :] <= torch.arange(q_len)[:, None]
    for h, (ctx_k, ctx_v) in enumerate(contexts):
        ks = torch.cat([ctx_k.float(), key[:, h].float()])  # [c + q, D]
        vs = torch.cat([ctx_v.float(), value[:, h].float()])
        qh = query[:, h * g : (h + 1) * g].float()  # [q, g, D]
        scores = torch.einsum("qgd,kd->gqk", qh, ks) * scale
        allowed = torch.cat([causal.new_ones(q_len, ctx_k.shape[0]), causal], dim=1)
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        out[:, h * g : (h + 1) * g] = torch.einsum("gqk,kd->qgd", probs, vs)
    return out


def attend_kept(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    ctx_k: torch.Tensor,
    ctx_v: torch.Tensor,
    kept: list[torch.Tensor],
    scale: float,
) -> torch.Tensor:
    """:func:`attend_heads` where KV head ``h`` reads context rows ``kept[h]`` of
    ``ctx_k``/``ctx_v`` (``[c, Hk, D]``)."""
    contexts = [(ctx_k[idx, h], ctx_v[idx, h]) for h, idx in enumerate(kept)]
    return attend_heads(query, key, value, contexts, scale)


def kivi_kept_kv(
    k: torch.Tensor, v: torch.Tensor, bits: int, group: int, residual: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A head's kept tokens ``[m, D]`` as KIVI stores them, in kept order.

    Complete groups of ``group`` kept tokens older than KIVI's full-precision window
    (:func:`reference.tail_start`) go through the real page format (one KV head,
    :func:`reference.quantize_page` / :func:`reference.dequantize_pages`); the rest
    stay as given. Returns (keys, values, quantized mask ``[m]``), float32.
    """
    m, d = k.shape
    fmt = PageFormat(bits, group, d, 1)
    start = reference.tail_start(m, 0, group, residual)
    n_pages = start // group
    keys, values = k.float().clone(), v.float().clone()
    quantized = torch.zeros(m, dtype=torch.bool)
    if n_pages:
        cache = torch.zeros(n_pages, fmt.page_bytes, dtype=torch.uint8)
        views = fmt.views(cache)
        for p in range(n_pages):
            rows = slice(p * group, (p + 1) * group)
            page = reference.quantize_page(k[rows, None], v[rows, None], fmt)
            for name, data in page.items():
                views[name][p] = data
        dk, dv = reference.dequantize_pages(views, torch.arange(n_pages), fmt)
        keys[:start], values[:start] = dk[:, 0], dv[:, 0]
        quantized[:start] = True
    return keys, values, quantized
