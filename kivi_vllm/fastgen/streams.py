"""Per-head storage of FastGen's kept tokens in KIVI head-pages (CPU reference path).

A :class:`Stream` is an append-only run of kept tokens of one (layer, KV head): every
complete group of ``G`` kept tokens is quantized into one head-page
(``PageFormat(bits, G, head_dim, 1)``, keys per channel over the page's kept tokens,
values per token), and the newest tokens stay in full precision exactly as KIVI's tail
(:func:`reference.tail_start`). Pages are addressed by *handles* through a
:class:`PageSpace`: in vLLM's pool a handle is an entry of the request's block list;
while a request is being compacted, a private scratch space holds them.

A :class:`HeadStore` is one head's storage after profiling: a ``permanent`` stream
(special / punctuation / heavy-hitter tokens, or every token of a ``full`` head) and,
for ``local`` heads, a ``window`` stream of the other recent tokens whose pages are
recycled once all their tokens left the window (docs/fastgen.md, section 3).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kivi_vllm import reference
from kivi_vllm.fastgen.policy import permanent
from kivi_vllm.page_format import PageFormat


@dataclass
class PageSpace:
    """Head-pages in a uint8 tensor ``[rows, page_bytes]``; ``rows_of`` maps handles to
    rows (a request's block ids in the pool), None for a scratch space (handle = row)."""

    fmt: PageFormat
    data: torch.Tensor
    rows_of: torch.Tensor | None = None
    used: int = 0  # scratch rows handed out (``data`` grows geometrically past them)

    @classmethod
    def scratch(cls, fmt: PageFormat) -> PageSpace:
        return cls(fmt, torch.zeros(16, fmt.page_bytes, dtype=torch.uint8))

    def _rows(self, handles: list[int]) -> torch.Tensor:
        idx = torch.tensor(handles, dtype=torch.long)
        return idx if self.rows_of is None else self.rows_of[idx].long()

    def new_scratch_row(self) -> int:
        assert self.rows_of is None
        if self.used == self.data.shape[0]:  # double: compaction adds pages one by one
            self.data = torch.cat([self.data, torch.zeros_like(self.data)])
        self.used += 1
        return self.used - 1

    def write(self, handle: int, page: dict[str, torch.Tensor]) -> None:
        views = self.fmt.views(self.data)
        row = int(self._rows([handle])[0])
        for name, x in page.items():
            views[name][row] = x[0]  # one KV head

    def read(self, handles: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 keys and values ``[len(handles) * G, head_dim]``."""
        k, v = reference.dequantize_pages(self.fmt.views(self.data), self._rows(handles), self.fmt)
        return k[:, 0], v[:, 0]

    def copy_rows(self, src: PageSpace, src_handles: list[int], handles: list[int]) -> None:
        """Byte copy of pages (no re-quantization)."""
        if handles:
            self.data[self._rows(handles)] = src.data[src._rows(src_handles)]


@dataclass
class Stream:
    """Kept tokens of one head in kept order: head-pages, then full-precision rows."""

    group: int
    residual: int
    positions: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)  # handles of groups 0, 1, ...
    fp_k: torch.Tensor | None = None  # rows of kept tokens fp_from..len-1
    fp_v: torch.Tensor | None = None
    fp_from: int = 0

    def __len__(self) -> int:
        return len(self.positions)

    def append(
        self,
        positions: list[int],
        k: torch.Tensor,
        v: torch.Tensor,
        space: PageSpace,
        new_page: Callable[[int], int],
    ) -> None:
        """Add tokens (``[n, head_dim]``); pack each group that completes into the page
        ``new_page(group_index)`` returns."""
        if not positions:
            return
        m0 = len(self.positions)
        self.positions.extend(positions)
        self.fp_k = k if self.fp_k is None else torch.cat([self.fp_k, k])
        self.fp_v = v if self.fp_v is None else torch.cat([self.fp_v, v])
        g, fmt = self.group, space.fmt
        for grp in range(m0 // g, len(self.positions) // g):
            rows = slice(grp * g - self.fp_from, (grp + 1) * g - self.fp_from)
            page = reference.quantize_page(self.fp_k[rows, None], self.fp_v[rows, None], fmt)
            handle = new_page(grp)
            space.write(handle, page)
            self.pages.append(handle)
        self._trim()

    def _trim(self) -> None:
        start = reference.tail_start(len(self.positions), 0, self.group, self.residual)
        if start > self.fp_from:
            assert self.fp_k is not None and self.fp_v is not None
            cut = start - self.fp_from
            self.fp_k, self.fp_v = self.fp_k[cut:], self.fp_v[cut:]
            self.fp_from = start

    def read(self, space: PageSpace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(positions ``[m]``, keys, values ``[m, head_dim]`` float32) as stored."""
        pos = torch.tensor(self.positions, dtype=torch.long)
        n_pages = self.fp_from // self.group
        if n_pages:
            k, v = space.read(self.pages[:n_pages])
        else:
            d = space.fmt.head_dim
            k = v = torch.zeros(0, d)
        if self.fp_k is not None:
            k, v = torch.cat([k, self.fp_k.float()]), torch.cat([v, self.fp_v.float()])
        return pos, k, v

    def copy_to(self, src: PageSpace, dst: PageSpace) -> Stream:
        """This stream with its pages byte-copied into new scratch rows of ``dst``."""
        pages = [dst.new_scratch_row() for _ in self.pages]
        dst.copy_rows(src, self.pages, pages)
        return Stream(self.group, self.residual, list(self.positions), pages, self.fp_k,
                      self.fp_v, self.fp_from)

    def drop_front_page(self) -> int:
        """Forget the oldest page and its tokens; returns its handle for reuse."""
        g = self.group
        assert self.fp_from >= g, "the oldest page is still read from full precision"
        handle = self.pages.pop(0)
        del self.positions[:g]
        self.fp_from -= g
        return handle

    def pages_for_one_more(self) -> int:
        """Head-pages one more appended token would pack (0 or 1)."""
        return int((len(self.positions) + 1) % self.group == 0)


@dataclass
class HeadStore:
    """One (layer, KV head) after profiling: its policy and kept-token streams."""

    policy: int
    window: int
    permanent: Stream
    local: Stream | None  # only for Policy.LOCAL: recent tokens not kept otherwise

    @property
    def streams(self) -> list[Stream]:
        return [self.permanent] if self.local is None else [self.permanent, self.local]

    def admits(self, special: bool, punct: bool) -> Stream | None:
        """Where a new (generated) token goes; None: evicted at once."""
        if permanent(self.policy, special, punct):
            return self.permanent
        return self.local

    def read(self, space: PageSpace, query_pos: int) -> tuple[torch.Tensor, ...]:
        """Context a query at ``query_pos`` reads: (positions, keys, values)."""
        pos, k, v = self.permanent.read(space)
        if self.local is None:
            return pos, k, v
        lpos, lk, lv = self.local.read(space)
        live = lpos > query_pos - self.window
        return torch.cat([pos, lpos[live]]), torch.cat([k, lk[live]]), torch.cat([v, lv[live]])

    def expired_pages(self, query_pos: int) -> list[int]:
        """Drop the local stream's pages whose tokens all left the window of a query at
        ``query_pos``; returns their handles."""
        freed = []
        s = self.local
        while s is not None and s.fp_from >= s.group and (
            s.positions[s.group - 1] <= query_pos - self.window
        ):
            freed.append(s.drop_front_page())
        return freed
