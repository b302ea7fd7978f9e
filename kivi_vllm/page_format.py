"""The KIVI page format: the one source of truth for byte offsets in a KV page.

One page (one vLLM block) holds ``group_size`` tokens of every KV head of a layer:

====================  ==================================  =========
section               logical shape                       dtype
====================  ==================================  =========
key codes             [kv_heads, group, head_dim / kcpb]  uint8
value codes           [kv_heads, head_dim / vcpb, group]  uint8
key scale             [kv_heads, head_dim]                float16 (or float8 e4m3)
key min               [kv_heads, head_dim]                float16
value scale           [kv_heads, head_dim / group, group] float16 (or float8 e4m3)
value min             [kv_heads, head_dim / group, group] float16
====================  ==================================  =========

``kcpb`` / ``vcpb`` = codes per byte of keys / values (8 // bits). Keys take ``key_bits``
(``kivi.layer_key_bits``; by default ``bits``), values ``bits``. Codes are packed
*planar* along channels: channel ``c`` lives in byte ``c % P`` at bit ``(c // P) * bits``
(``P = head_dim // cpb``), so unpacking is a shift and a mask per plane, with no
interleaving.
Keys are quantized per channel over the group's tokens, values per token over
groups of ``group_size`` channels. Mins are float16; scales are float16, or float8 e4m3
(``fp8_scales``, ``kivi.fp8_scales``: one byte each, rounded to nearest). Value sections are
token-minor (a byte column or a channel group's scales hold the group's tokens
contiguously): the attention kernel reads values with tokens as the reduction axis.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class PageFormat:
    """Byte layout of one KIVI page for (bits, group_size, head_dim, num_kv_heads).

    ``bits`` is the value code width and, unless ``key_bits`` is set (non-zero), the
    key code width too. ``fp8_scales``: scales in float8 e4m3 instead of float16.
    """

    bits: int
    group_size: int
    head_dim: int
    num_kv_heads: int
    key_bits: int = 0
    fp8_scales: bool = False

    def __post_init__(self) -> None:
        for name, value in (("bits", self.bits), ("key_bits", self.k_bits)):
            if value not in (2, 4):
                raise ValueError(f"{name} must be 2 or 4, got {value}")
        if self.head_dim % self.group_size:
            raise ValueError(
                f"group_size {self.group_size} must divide head_dim {self.head_dim}"
            )
        if self.head_dim % 8:
            raise ValueError(f"head_dim {self.head_dim} must be a multiple of 8")

    @property
    def block_size(self) -> int:
        """Tokens per page: one key group per channel."""
        return self.group_size

    @property
    def k_bits(self) -> int:
        """Key code width."""
        return self.key_bits or self.bits

    @property
    def v_bits(self) -> int:
        """Value code width."""
        return self.bits

    @property
    def k_packed_dim(self) -> int:
        """Bytes of key codes per token per head (= channels per key bit plane)."""
        return self.head_dim * self.k_bits // 8

    @property
    def v_packed_dim(self) -> int:
        """Bytes of value codes per token per head (= channels per value bit plane)."""
        return self.head_dim * self.v_bits // 8

    @property
    def value_groups(self) -> int:
        """Channel groups per token for the values."""
        return self.head_dim // self.group_size

    @property
    def scale_dtype(self) -> torch.dtype:
        """dtype of the key and value scales."""
        return torch.float8_e4m3fn if self.fp8_scales else torch.float16

    @cached_property
    def sections(self) -> dict[str, tuple[int, tuple[int, ...], torch.dtype]]:
        """Name -> (byte offset, logical shape, dtype), in page order."""
        h, g, d = self.num_kv_heads, self.group_size, self.head_dim
        scale = self.scale_dtype
        layout = [
            ("k_codes", (h, g, self.k_packed_dim), torch.uint8),
            ("v_codes", (h, self.v_packed_dim, g), torch.uint8),
            ("k_scale", (h, d), scale),
            ("k_min", (h, d), torch.float16),
            ("v_scale", (h, self.value_groups, g), scale),
            ("v_min", (h, self.value_groups, g), torch.float16),
        ]
        out: dict[str, tuple[int, tuple[int, ...], torch.dtype]] = {}
        offset = 0
        for name, shape, dtype in layout:
            out[name] = (offset, shape, dtype)
            offset += _numel(shape) * dtype.itemsize
        return out

    def offset(self, name: str) -> int:
        return self.sections[name][0]

    @cached_property
    def page_bytes(self) -> int:
        """Bytes of one page, rounded up to 16 for aligned vector loads."""
        last_offset, shape, dtype = self.sections["v_min"]
        end = last_offset + _numel(shape) * dtype.itemsize
        return -(-end // 16) * 16

    @property
    def bytes_per_token(self) -> float:
        """Quantized bytes per token per layer (all KV heads, keys and values)."""
        return self.page_bytes / self.group_size

    def tail_bytes_per_slot(self, residual: int, dtype_size: int) -> int:
        """Bytes of one sequence's full-precision tail ring for one layer."""
        return 2 * residual * self.num_kv_heads * self.head_dim * dtype_size

    def views(self, cache: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed views of every section of a ``[num_blocks, page_bytes]`` uint8 cache."""
        if cache.dtype != torch.uint8 or cache.dim() != 2:
            raise ValueError("cache must be a [num_blocks, page_bytes] uint8 tensor")
        if cache.shape[1] != self.page_bytes:
            raise ValueError(
                f"cache page has {cache.shape[1]} bytes, format needs {self.page_bytes}"
            )
        num_blocks = cache.shape[0]
        out = {}
        for name, (offset, shape, dtype) in self.sections.items():
            nbytes = _numel(shape) * dtype.itemsize
            raw = cache[:, offset : offset + nbytes]
            out[name] = raw.view(dtype).view(num_blocks, *shape)
        return out


def bf16_bytes_per_token(num_kv_heads: int, head_dim: int, dtype_size: int = 2) -> int:
    """Bytes per token per layer of vLLM's unquantized cache, for comparisons."""
    return 2 * num_kv_heads * head_dim * dtype_size


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def layer_page_format(cfg, layer: int | None, head_dim: int, num_kv_heads: int) -> PageFormat:
    """The page format of decoder layer ``layer`` under a ``KiviConfig`` (``None``: a
    layer without a ``kivi.layer_key_bits`` override)."""
    key_bits = cfg.bits if layer is None else cfg.key_bits_of(layer)
    return PageFormat(cfg.bits, cfg.group_size, head_dim, num_kv_heads,
                      key_bits=0 if key_bits == cfg.bits else key_bits,
                      fp8_scales=cfg.fp8_scales)


def kivi_bytes_per_token(cfg, head_dim: int, num_kv_heads: int, num_layers: int,
                         first_layer: int = 0) -> float:
    """KV bytes per token of ``num_layers`` layers from ``first_layer`` (by default the
    whole model) in KIVI pages (a ``KiviConfig``; no tails)."""
    return sum(layer_page_format(cfg, layer, head_dim, num_kv_heads).bytes_per_token
               for layer in range(first_layer, first_layer + num_layers))
