"""GPU forward of the KIVI backend: decode and prefill attention, then the write path."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kivi_vllm import reference
from kivi_vllm.kernels.attention import attend_context
from kivi_vllm.kernels.store import store_step

if TYPE_CHECKING:
    from kivi_vllm.backend import KiviAttentionImpl, KiviMetadata

PREFILL_BLOCK_Q = 16  # query tokens per prefill tile (x QPK heads per KV head)


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    tail: torch.Tensor,
    md: KiviMetadata,
    impl: KiviAttentionImpl,
    out: torch.Tensor,
) -> None:
    """Attend (decodes, then prefill chunks), then store the step's tokens."""
    fmt, residual, scale = impl.fmt, impl.cfg.residual, impl.scale
    sinks = impl.cfg.sink_tokens
    n, nd, ndt = md.num_actual_tokens, md.num_decodes, md.num_decode_tokens
    common = (kv_cache, tail, md.block_table, md.seq_lens, md.query_start_loc,
              md.tail_slots, md.valid_from, fmt, residual, scale)
    if nd:
        attend_context(q, k, v, *common, out[:ndt], decode=True, num_tiles=nd, sinks=sinks)
    if n > ndt:
        _prefill(q, k, v, common, md, out, sinks)
    store_step(k, v, kv_cache, tail, md.slot_mapping[:n], md.query_start_loc, md.seq_lens,
               md.tail_slots, fmt, residual, sinks)


def _prefill(q, k, v, common, md: KiviMetadata, out: torch.Tensor, sinks: int) -> None:
    """Chunk tokens: own chunk in full precision (FlashAttention, causal), context from
    the pages + tail (Triton), merged by log-sum-exp."""
    n, ndt = md.num_actual_tokens, md.num_decode_tokens
    scale = common[-1]
    qp, kp, vp = q[ndt:n], k[ndt:n], v[ndt:n]
    cu = md.prefill_cu_seqlens
    if not md.prefill_has_context:
        _chunk_attention(qp, kp, vp, cu, md.max_query_len, scale, out[ndt:n])
        return
    hq = q.shape[1]
    ctx_out = torch.empty_like(qp)
    ctx_lse = torch.empty((hq, n - ndt), dtype=torch.float32, device=q.device)
    attend_context(q, k, v, *common, ctx_out, decode=False, num_tiles=md.num_prefill_tiles,
                   tile_req=md.prefill_tile_req, tile_tok=md.prefill_tile_tok,
                   block_q=PREFILL_BLOCK_Q, tok_base=ndt, lse_out=ctx_lse, sinks=sinks)
    chunk_out = torch.empty_like(qp)
    chunk_lse = _chunk_attention(qp, kp, vp, cu, md.max_query_len, scale, chunk_out,
                                 return_lse=True)
    from vllm.v1.attention.ops.merge_attn_states import merge_attn_states

    merge_attn_states(out[ndt:n], ctx_out, ctx_lse, chunk_out, chunk_lse)


def _chunk_attention(q, k, v, cu_seqlens, max_len, scale, out, return_lse=False):
    """Causal varlen attention of the chunk tokens among themselves (vLLM's FA; on the
    CPU, where only the FastGen device worker calls it, the reference attention)."""
    if not q.is_cuda:
        assert not return_lse, "the CPU stand-in returns no LSE"
        _chunk_attention_cpu(q, k, v, cu_seqlens, scale, out)
        return None
    from vllm.v1.attention.backends.fa_utils import (
        flash_attn_varlen_func,
        get_flash_attn_version,
    )

    result = flash_attn_varlen_func(
        q=q, k=k, v=v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
        max_seqlen_q=max_len, max_seqlen_k=max_len, softmax_scale=scale, causal=True,
        return_softmax_lse=return_lse, out=out,
        fa_version=get_flash_attn_version(head_size=q.shape[-1]),
    )
    if return_lse:
        return result[1]
    return None


def _chunk_attention_cpu(q, k, v, cu_seqlens, scale, out) -> None:
    """:func:`reference.attend` per request, without context (reads ``cu_seqlens`` on the
    host)."""
    bounds = cu_seqlens.tolist()
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        empty = k[a:a]
        out[a:b] = reference.attend(q[a:b], k[a:b], v[a:b], empty, empty, scale)
