"""Pure-PyTorch KIVI write and read paths: the specification the kernels must match.

Write path: new tokens go to a per-sequence full-precision tail ring of ``residual``
tokens; each completed group of ``group_size`` tokens is quantized (keys per channel,
values per token) and packed into its page. Read path: positions before
``tail_start`` come from dequantized pages, positions from ``tail_start`` to the
context end from the tail ring, and the step's own tokens from the incoming
key/value in full precision (causal).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kivi_vllm.page_format import PageFormat

_NEG_INF = float("-inf")


def fp16_floor(x: torch.Tensor) -> torch.Tensor:
    """Largest float16 value <= x (x float32, finite, within the float16 range)."""
    y = x.to(torch.float16)
    too_big = y.float() > x
    down = torch.nextafter(y, torch.full_like(y, _NEG_INF))
    return torch.where(too_big, down, y)


def fp16_ceil(x: torch.Tensor) -> torch.Tensor:
    """Smallest float16 value >= x."""
    y = x.to(torch.float16)
    too_small = y.float() < x
    up = torch.nextafter(y, torch.full_like(y, float("inf")))
    return torch.where(too_small, up, y)


FP8_MAX = 448.0  # largest finite float8 e4m3fn


def fp8_nearest(x: torch.Tensor) -> torch.Tensor:
    """The float8 e4m3 value nearest x (x float32 >= 0; ties to even), saturating at 448."""
    return x.clamp(max=FP8_MAX).to(torch.float8_e4m3fn)


def quantize(
    x: torch.Tensor, dim: int, bits: int, fp8_scale: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric quantization of ``x`` with one (scale, min) per slice along ``dim``.

    The min is rounded down to float16 and the scale up to float16, so every element lies
    in ``[min, min + (2**bits - 1) * scale]`` and ``|x - dequantize| <= scale / 2``.
    ``fp8_scale``: the scale is rounded to the nearest float8 e4m3 instead (at most 1/16
    off) and codes are clamped, so an element may lie up to ``(2**bits - 1) * (exact -
    scale)`` further out.
    Returns (codes uint8 shaped like x, scale, min fp16), scale/min keep ``dim``.
    """
    qmax = (1 << bits) - 1
    xf = x.float()
    mn = fp16_floor(xf.amin(dim=dim, keepdim=True))
    mx = xf.amax(dim=dim, keepdim=True)
    scale = (fp8_nearest if fp8_scale else fp16_ceil)((mx - mn.float()) / qmax)
    scale_f = scale.float()
    safe = torch.where(scale_f > 0, scale_f, torch.ones_like(scale_f))
    # NaN quotients (non-finite input, overflowed scale) -> code 0: casting NaN to uint8
    # is undefined and could spill into the next bit plane when packed.
    codes = torch.floor((xf - mn.float()) / safe + 0.5).nan_to_num_(0.0).clamp_(0, qmax)
    codes = torch.where(scale_f > 0, codes, torch.zeros_like(codes))
    return codes.to(torch.uint8), scale, mn


def dequantize(codes: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """float32 reconstruction ``min + code * scale`` (scale/min broadcast)."""
    return mn.float() + codes.float() * scale.float()


def pack_planar(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes [..., D] into bytes [..., D / (8 // bits)], planar along D."""
    cpb = 8 // bits
    planes = codes.to(torch.int32).unflatten(-1, (cpb, codes.shape[-1] // cpb))
    packed = torch.zeros_like(planes[..., 0, :])
    for plane in range(cpb):
        packed |= planes[..., plane, :] << (plane * bits)
    return packed.to(torch.uint8)


def unpack_planar(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_planar`: bytes [..., P] -> codes [..., P * (8 // bits)]."""
    cpb = 8 // bits
    mask = (1 << bits) - 1
    p = packed.to(torch.int32)
    planes = [(p >> (plane * bits)) & mask for plane in range(cpb)]
    return torch.cat(planes, dim=-1).to(torch.uint8)


def quantize_page(
    keys: torch.Tensor, values: torch.Tensor, fmt: PageFormat
) -> dict[str, torch.Tensor]:
    """Quantize one complete group ([group, kv_heads, head_dim] each) into page sections."""
    g, h, d = keys.shape
    assert (g, h, d) == (fmt.group_size, fmt.num_kv_heads, fmt.head_dim)
    k = keys.float().permute(1, 0, 2)  # [h, g, d]: per-channel groups over tokens
    k_codes, k_scale, k_min = quantize(k, dim=1, bits=fmt.k_bits, fp8_scale=fmt.fp8_scales)
    v = values.float().permute(1, 0, 2).unflatten(-1, (fmt.value_groups, g))
    v_codes, v_scale, v_min = quantize(v, dim=-1, bits=fmt.v_bits,  # [h, g, vg, G]
                                       fp8_scale=fmt.fp8_scales)
    return {
        "k_codes": pack_planar(k_codes, fmt.k_bits),
        "v_codes": pack_planar(v_codes.flatten(-2), fmt.v_bits).transpose(-1, -2),  # [h, P, g]
        "k_scale": k_scale.squeeze(1),
        "k_min": k_min.squeeze(1),
        "v_scale": v_scale.squeeze(-1).transpose(-1, -2),  # [h, vg, g]
        "v_min": v_min.squeeze(-1).transpose(-1, -2),
    }


def dequantize_pages(
    views: dict[str, torch.Tensor], block_ids: torch.Tensor, fmt: PageFormat
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 keys and values [len(block_ids) * group, kv_heads, head_dim]."""
    n, g = block_ids.numel(), fmt.group_size
    k_codes = unpack_planar(views["k_codes"][block_ids], fmt.k_bits)  # [n, h, g, d]
    k = dequantize(
        k_codes,
        views["k_scale"][block_ids].unsqueeze(2),
        views["k_min"][block_ids].unsqueeze(2),
    )
    v_codes = unpack_planar(views["v_codes"][block_ids].transpose(-1, -2), fmt.v_bits)
    v_codes = v_codes.unflatten(-1, (fmt.value_groups, g))  # [n, h, g, vg, G]
    v = dequantize(
        v_codes,
        views["v_scale"][block_ids].transpose(-1, -2).unsqueeze(-1),
        views["v_min"][block_ids].transpose(-1, -2).unsqueeze(-1),
    ).flatten(-2)
    k = k.permute(0, 2, 1, 3).reshape(n * g, fmt.num_kv_heads, fmt.head_dim)
    v = v.permute(0, 2, 1, 3).reshape(n * g, fmt.num_kv_heads, fmt.head_dim)
    return k, v


def hadamard(n: int) -> torch.Tensor:
    """Normalized (orthogonal, symmetric) Hadamard matrix [n, n] in float32, n a power
    of two: ``kivi.rotate_keys`` multiplies queries and keys by it before attention."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hadamard rotation needs a power-of-two size, got {n}")
    h = torch.ones(1, 1, dtype=torch.float32)  # vLLM builds layers under a bf16 default
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h / n**0.5


def random_hadamard(n: int, seed: int) -> torch.Tensor:
    """Randomized Hadamard rotation ``diag(s) @ hadamard(n)`` in float32, ``s`` a fixed
    +-1 vector drawn from ``torch.Generator().manual_seed(seed)`` (QuaRot style): still
    orthogonal, and ``x @ R`` flips the signs of x's channels before the Hadamard mix."""
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=gen).to(torch.float32) * 2 - 1
    return signs[:, None] * hadamard(n)


def rotate(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """``x @ rotation`` over the last dim in x's dtype (one tensor-core GEMM for bf16 on a
    GPU, float32 accumulation; the normalized Hadamard's entries round to one value, so a
    bf16 rotation stays orthogonal up to a scale within 2e-4 of 1).

    Applied to both queries and keys, an orthogonal rotation leaves ``q . k`` unchanged
    (values are untouched): the keys are stored and quantized in the rotated basis, where
    outlier channels are spread over all channels."""
    return x @ rotation.to(x.dtype)


@dataclass(frozen=True)
class SeqStep:
    """One sequence's part of a step, as the backend sees it."""

    ctx_len: int  # tokens already in the cache before this step
    query_len: int  # tokens of this step
    block_ids: torch.Tensor  # [>= cdiv(ctx_len + query_len, group)] page ids
    tail_slot: int  # row of the tail ring buffers owned by this sequence
    valid_from: int  # first position this sequence wrote itself (group aligned)


def tail_start(ctx_len: int, valid_from: int, group: int, residual: int) -> int:
    """First context position read from the tail ring instead of the pages.

    With attention sinks pass the ring's sliding part (``residual - sinks``) as residual.
    """
    return max(valid_from, (ctx_len // group) * group - (residual - group), 0)


def ring_index(pos: torch.Tensor, residual: int, sinks: int = 0) -> torch.Tensor:
    """Row of the tail ring holding position ``pos``.

    The first ``sinks`` positions of a sequence (attention sinks, whole groups) keep rows
    of their own for the sequence's lifetime; later positions cycle through the other
    ``residual - sinks`` rows. Without sinks this is ``pos % residual``.
    """
    if not sinks:
        return pos % residual
    return torch.where(pos < sinks, pos, sinks + (pos - sinks) % (residual - sinks))


def context_kv(
    views: dict[str, torch.Tensor],
    tail: torch.Tensor,
    seq: SeqStep,
    fmt: PageFormat,
    residual: int,
    sinks: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 keys/values of the context [ctx_len, kv_heads, head_dim] as stored.

    ``sinks``: tokens at the start of the sequence read from the ring in full precision
    (when the sequence wrote them itself, ``valid_from == 0``) instead of their pages.
    """
    g = fmt.group_size
    start = tail_start(seq.ctx_len, seq.valid_from, g, residual - sinks)
    pinned = min(sinks, start) if seq.valid_from == 0 else 0
    k, v = dequantize_pages(views, seq.block_ids[pinned // g : start // g].long(), fmt)
    pos = torch.arange(start, seq.ctx_len)
    if pinned:
        pos = torch.cat([torch.arange(pinned), pos])
    ring = ring_index(pos, residual, sinks)
    k_tail = tail[0, seq.tail_slot, ring].float()
    v_tail = tail[1, seq.tail_slot, ring].float()
    if pinned:
        k = torch.cat([k_tail[:pinned], k])
        v = torch.cat([v_tail[:pinned], v])
        k_tail, v_tail = k_tail[pinned:], v_tail[pinned:]
    return torch.cat([k, k_tail]), torch.cat([v, v_tail])


def attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    ctx_k: torch.Tensor,
    ctx_v: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal GQA attention of the step's queries over context + the step's own tokens.

    query [q, Hq, D]; key/value [q, Hk, D] (the step's tokens, full precision);
    ctx_k/ctx_v [c, Hk, D]. Returns float32 [q, Hq, D].
    """
    q_len, hq, _ = query.shape
    hk = key.shape[1]
    ks = torch.cat([ctx_k.float(), key.float()]).repeat_interleave(hq // hk, dim=1)
    vs = torch.cat([ctx_v.float(), value.float()]).repeat_interleave(hq // hk, dim=1)
    scores = torch.einsum("qhd,khd->hqk", query.float(), ks) * scale
    c = ctx_k.shape[0]
    allowed = torch.arange(c + q_len)[None, :] <= (c + torch.arange(q_len))[:, None]
    scores = scores.masked_fill(~allowed, _NEG_INF)
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, vs)


def store(
    views: dict[str, torch.Tensor],
    tail: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    seq: SeqStep,
    fmt: PageFormat,
    residual: int,
    sinks: int = 0,
) -> None:
    """Write the step's tokens: pack every group that completes, then update the ring.

    tail: [2, num_slots, residual, kv_heads, head_dim] in the model dtype. Positions
    below ``sinks`` are packed like the others and also kept in their own ring rows.
    """
    g = fmt.group_size
    start, end = seq.ctx_len, seq.ctx_len + seq.query_len
    for group in range(start // g, end // g):
        lo = group * g
        old = ring_index(torch.arange(lo, max(lo, start)), residual, sinks)  # in the ring
        new = slice(max(lo - start, 0), lo + g - start)
        k = torch.cat([tail[0, seq.tail_slot, old].float(), key[new].float()])
        v = torch.cat([tail[1, seq.tail_slot, old].float(), value[new].float()])
        page = quantize_page(k, v, fmt)
        block = int(seq.block_ids[group])
        for name, data in page.items():
            views[name][block] = data
    keep = torch.arange(min(max(start, sinks, end - (residual - sinks)), end), end)
    if start < sinks:
        keep = torch.cat([torch.arange(start, min(end, sinks)), keep])
    ring = ring_index(keep, residual, sinks)
    tail[0, seq.tail_slot, ring] = key[keep - start].to(tail.dtype)
    tail[1, seq.tail_slot, ring] = value[keep - start].to(tail.dtype)
