"""Compile every launch variant of the KIVI kernels before the engine serves.

Triton compiles a kernel on its first launch with a new set of constexprs and argument
specializations. CUDA-graph capture only runs decode batches, so without this the first
chunked prefill with earlier context (and its split reduce with LSE) compiled inside a
request, stalling the engine for seconds (vLLM's JIT monitor reports it; an engine built
with ``jit_monitor_mode="error"`` fails on it, see ``tests/test_engine_gpu.py``). The
arguments that change from step to step are marked ``do_not_specialize`` in the kernels,
so the variants compiled here on tiny inputs are the ones every later step uses.
"""

from __future__ import annotations

import torch

from kivi_vllm.kernels.attention import attend_context
from kivi_vllm.kernels.ops import PREFILL_BLOCK_Q
from kivi_vllm.kernels.store import store_step
from kivi_vllm.page_format import PageFormat

_DONE: set[tuple] = set()


def warm_up(
    fmt: PageFormat, residual: int, num_heads: int, dtype: torch.dtype, device: torch.device,
    streams: bool = False,
) -> None:
    """Launch the store kernels and the read kernel in each mode (decode / prefill with
    context x one split / several splits) once on a scratch cache of four pages;
    ``streams``: also kivi.fastgen's decode variants (LSE out; without the step's token
    and windowed; the one-launch decode store), for its one-head stream format."""
    key = (fmt, residual, num_heads, dtype, str(device), streams)
    if key in _DONE:
        return
    hk, d, g = fmt.num_kv_heads, fmt.head_dim, fmt.group_size
    tokens = PREFILL_BLOCK_Q
    # q, k, v as views of one fused projection, like the model's qkv split
    qkv = torch.randn(tokens, (num_heads + 2 * hk) * d, dtype=dtype, device=device)
    q, k, v = qkv.split([num_heads * d, hk * d, hk * d], dim=-1)
    q, k, v = q.view(tokens, num_heads, d), k.view(tokens, hk, d), v.view(tokens, hk, d)
    cache = torch.zeros((4, fmt.page_bytes), dtype=torch.uint8, device=device)
    tail = torch.zeros((2, 3, residual, hk, d), dtype=dtype, device=device)
    block_table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32, device=device)
    ctx = 2 * g + residual // 2  # pages and a part-full tail
    slots = torch.tensor([0, 1], dtype=torch.int32, device=device)
    valid_from = torch.zeros(2, dtype=torch.int32, device=device)
    common = dict(fmt=fmt, residual=residual, scale=d**-0.5)

    # decode: two requests, one token each
    seq_lens = torch.tensor([ctx + 1, ctx + 1], dtype=torch.int32, device=device)
    qsl = torch.tensor([0, 1, 2], dtype=torch.int32, device=device)
    out = torch.empty((2, num_heads, d), dtype=dtype, device=device)
    for splits in (1, 2):
        attend_context(q, k, v, cache, tail, block_table, seq_lens, qsl, slots, valid_from,
                       out=out, decode=True, num_tiles=2, num_splits=splits, **common)
        for windowed in (False, True) if streams else ():
            lse = torch.empty((num_heads, 2), dtype=torch.float32, device=device)
            attend_context(q, k, v, cache, tail, block_table, seq_lens, qsl, slots,
                           valid_from, out=out, decode=True, num_tiles=2, num_splits=splits,
                           lse_out=lse, add_self=not windowed,
                           first_valid=valid_from if windowed else None, table_by_slot=True,
                           **common)

    # prefill chunk of one request with earlier context: output + LSE for the merge
    seq_lens = torch.tensor([ctx + tokens], dtype=torch.int32, device=device)
    qsl = torch.tensor([0, tokens], dtype=torch.int32, device=device)
    tiles = torch.zeros((2, 4), dtype=torch.int32, device=device)
    out = torch.empty((tokens, num_heads, d), dtype=dtype, device=device)
    lse = torch.empty((num_heads, tokens), dtype=torch.float32, device=device)
    for splits in (1, 2):
        attend_context(q, k, v, cache, tail, block_table, seq_lens, qsl, slots, valid_from,
                       out=out, decode=False, num_tiles=1, tile_req=tiles[0, :1],
                       tile_tok=tiles[1, :1], block_q=PREFILL_BLOCK_Q, lse_out=lse,
                       num_splits=splits, **common)

    slot_mapping = torch.arange(tokens, dtype=torch.int64, device=device) + ctx
    store_step(k, v, cache, tail, slot_mapping, qsl, seq_lens, slots[:1], fmt, residual)
    if streams:  # kivi.fastgen's decode store: two requests, one token each, one launch;
        # the first completes a group (page 0 of the scratch cache, for any residual)
        store_step(k[:2], v[:2], cache, tail,
                   torch.tensor([g - 1, g], dtype=torch.int64, device=device),
                   torch.arange(3, dtype=torch.int32, device=device),
                   torch.full((2,), ctx + 1, dtype=torch.int32, device=device), slots, fmt,
                   residual, decode=True)
    if device.type == "cuda":
        _warm_slot_mapping(g, device)
        torch.cuda.synchronize(device)
    _DONE.add(key)


def _warm_slot_mapping(block_size: int, device: torch.device) -> None:
    """vLLM 0.26's own warm-up compiles its slot-mapping kernel for block sizes 3 and 16
    only (a constexpr); KIVI pages hold one group (32/64/128 tokens), so run it for ours."""
    from vllm.model_executor.warmup import v1_block_table_warmup as vllm_warmup

    sizes = vllm_warmup._SLOT_MAPPING_WARMUP_BLOCK_SIZES
    vllm_warmup._SLOT_MAPPING_WARMUP_BLOCK_SIZES = (block_size,)
    try:
        vllm_warmup.warm_v1_block_table_kernels(device, 8)
    finally:
        vllm_warmup._SLOT_MAPPING_WARMUP_BLOCK_SIZES = sizes
