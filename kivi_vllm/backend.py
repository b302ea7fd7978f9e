"""The KIVI attention backend for vLLM 0.26: backend, metadata, builder and impl.

Each step's metadata is built once on the host. ``forward`` attends first (context
from the quantized pages and the full-precision tail, the step's own tokens in full
precision) and then stores the step's tokens, so a chunk never reads a tail entry it
overwrote itself. On CPU the pure-PyTorch reference runs; on CUDA the Triton kernels.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any, ClassVar

import numpy as np
import torch
from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionLayer,
    AttentionMetadata,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.attention.backends.utils import split_decodes_and_prefills

from kivi_vllm import reference, state
from kivi_vllm.config import ALLOWED_GROUP_SIZES, KiviConfig, KiviConfigError
from kivi_vllm.memory import (
    fastgen_device_worker,
    num_ring_slots,
    num_tail_slots,
    tail_streams,
)
from kivi_vllm.page_format import layer_page_format
from kivi_vllm.spec import KiviAttentionSpec

logger = init_logger("vllm.kivi")


class KiviAttentionBackend(AttentionBackend):
    """Paged KV cache in KIVI form (2/4-bit codes + full-precision tail)."""

    accept_output_buffer: bool = True
    forward_includes_kv_cache_update: bool = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [
        torch.float16,
        torch.bfloat16,
        torch.float32,
    ]
    supported_kv_cache_dtypes: ClassVar[list] = ["auto"]

    @staticmethod
    def get_name() -> str:
        """The registry entry KIVI occupies: CPU_ATTN on CPU, CUSTOM elsewhere."""
        from vllm.platforms import current_platform

        return "CPU_ATTN" if current_platform.is_cpu() else "CUSTOM"

    @staticmethod
    def get_supported_kernel_block_sizes() -> list[int | MultipleOf]:
        return list(ALLOWED_GROUP_SIZES)

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return [64, 96, 128, 192, 256]

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @staticmethod
    def get_impl_cls() -> type[KiviAttentionImpl]:
        return KiviAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[KiviMetadataBuilder]:
        return KiviMetadataBuilder

    @staticmethod
    def get_kv_cache_shape(
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_size: int,
        cache_dtype_str: str = "auto",
    ) -> tuple[int, ...]:
        cfg = state.active_config()
        heads = 1 if cfg.fastgen is not None else num_kv_heads  # FastGen: head-pages
        fmt = layer_page_format(cfg, None, head_size, heads)
        assert block_size == fmt.block_size, (block_size, fmt.block_size)
        if cfg.layer_key_bits:  # pages differ by layer; each layer's tensor holds its own
            return (num_blocks, -1)
        return (num_blocks, fmt.page_bytes)

    @staticmethod
    def use_cascade_attention(*args, **kwargs) -> bool:
        return False


@dataclass
class KiviMetadata(AttentionMetadata):
    """Per-step metadata (decodes first, then prefill chunks)."""

    num_actual_tokens: int
    num_reqs: int
    num_decodes: int
    num_decode_tokens: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor  # [num_reqs + 1] int32, device
    seq_lens: torch.Tensor  # [num_reqs] int32, device (context + this step)
    block_table: torch.Tensor  # [num_reqs, max_blocks] int32, device
    slot_mapping: torch.Tensor  # [num_tokens] int64, device (-1 = padding)
    tail_slots: torch.Tensor  # [num_reqs] int32, device
    valid_from: torch.Tensor  # [num_reqs] int32, device
    query_start_loc_cpu: torch.Tensor
    seq_lens_cpu: torch.Tensor
    tail_slots_cpu: np.ndarray
    valid_from_cpu: np.ndarray
    # prefill part (rows num_decodes..num_reqs), for the GPU path
    prefill_has_context: bool = False
    prefill_cu_seqlens: torch.Tensor | None = None  # chunk cu_seqlens, device
    num_prefill_tiles: int = 0
    prefill_tile_req: torch.Tensor | None = None  # [tiles] int32, device
    prefill_tile_tok: torch.Tensor | None = None  # [tiles] int32, device

    @cached_property
    def seq_steps(self) -> tuple[list[reference.SeqStep], list[int]]:
        """Per-sequence views of the step and query bounds, for the reference path.

        Computed once per step (the metadata is shared by every layer of the group).
        """
        qsl = self.query_start_loc_cpu.tolist()
        seq_lens = self.seq_lens_cpu.tolist()
        steps = []
        for i in range(self.num_reqs):
            q_len = qsl[i + 1] - qsl[i]
            steps.append(
                reference.SeqStep(
                    ctx_len=seq_lens[i] - q_len,
                    query_len=q_len,
                    block_ids=self.block_table[i],
                    tail_slot=int(self.tail_slots_cpu[i]),
                    valid_from=int(self.valid_from_cpu[i]),
                )
            )
        return steps, qsl


class KiviMetadataBuilder(AttentionMetadataBuilder[KiviMetadata]):
    """Builds :class:`KiviMetadata` and owns the tail rings of its layers."""

    _cudagraph_support: ClassVar[AttentionCGSupport] = (
        AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    )

    @classmethod
    def get_cudagraph_support(cls, vllm_config: VllmConfig, kv_cache_spec: Any
                              ) -> AttentionCGSupport:
        """Uniform decode batches in full CUDA graphs. kivi.fastgen's CPU worker plans
        every layer on the host: no graphs of attention (vLLM captures the rest
        piecewise); its GPU worker commits each step's plan to fixed buffers."""
        cfg = state.active_config()
        if cfg.fastgen is not None and not fastgen_device_worker(cfg):
            return AttentionCGSupport.NEVER
        return cls._cudagraph_support

    def __init__(
        self,
        kv_cache_spec: KiviAttentionSpec,
        layer_names: list[str],
        vllm_config: VllmConfig,
        device: torch.device,
    ) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._init_reorder_batch_threshold(1, supports_spec_as_decode=False)
        self.cfg = state.active_config()
        state.STEP.ensure(num_tail_slots(vllm_config))
        # kivi.fastgen on the GPU: one ring per (slot, KV head, stream), one head each
        self._stream_rows = tail_streams(self.cfg) > 1
        streams = 2 * kv_cache_spec.num_kv_heads if self._stream_rows else 1
        state.allocate_tails(
            layer_names,
            num_slots=num_ring_slots(vllm_config) * streams,
            residual=self.cfg.residual,
            num_kv_heads=1 if streams > 1 else kv_cache_spec.num_kv_heads,
            head_size=kv_cache_spec.head_size,
            dtype=vllm_config.model_config.dtype,
            device=device,
        )
        max_reqs = vllm_config.scheduler_config.max_num_seqs
        self._tail_slots = torch.zeros(max_reqs, dtype=torch.int32, device=device)
        self._valid_from = torch.zeros(max_reqs, dtype=torch.int32, device=device)
        max_tiles = vllm_config.scheduler_config.max_num_batched_tokens + max_reqs
        max_tiles = -(-max_tiles // 4) * 4  # both rows 16-byte aligned (one compiled variant)
        self._tiles = torch.zeros((2, max_tiles), dtype=torch.int32, device=device)
        if device.type == "cuda":
            from kivi_vllm.kernels.warmup import warm_up

            mc = vllm_config.model_config
            num_heads = mc.get_num_attention_heads(vllm_config.parallel_config)
            fmt = kv_cache_spec.page_format
            if self._stream_rows:  # one KV head and its query heads per row
                num_heads //= kv_cache_spec.num_kv_heads
                fmt = replace(fmt, num_kv_heads=1)
            warm_up(fmt, self.cfg.residual, num_heads, mc.dtype, device,
                    streams=self._stream_rows)
        if self.cfg.fastgen is not None:
            from kivi_vllm.fastgen.engine import WORKER
            from kivi_vllm.fastgen.manager import FastGenAttentionSpec
            from kivi_vllm.fastgen.policy import TokenClasses

            if not isinstance(kv_cache_spec, FastGenAttentionSpec):
                raise KiviConfigError("kivi.fastgen needs the head-page KV cache spec")
            mc = vllm_config.model_config
            classes = TokenClasses.for_engine(self.cfg.fastgen, mc)
            layers = kv_cache_spec.fastgen_heads // kv_cache_spec.num_kv_heads
            if fastgen_device_worker(self.cfg):
                from kivi_vllm.fastgen.device import DEVICE

                DEVICE.enable(self.cfg, classes, layers, kv_cache_spec.num_kv_heads,
                              kv_cache_spec.head_size, num_tail_slots(vllm_config),
                              mc.max_model_len, device)
            else:
                WORKER.enable(self.cfg, classes, layers)

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> KiviMetadata:
        cam = common_attn_metadata
        n = cam.num_reqs
        num_decodes, _, num_decode_tokens, _ = split_decodes_and_prefills(
            cam, decode_threshold=1
        )
        # Fresh (pageable) host arrays every step: the copy is staged at once, so a later
        # step can never overwrite a host buffer an earlier, still queued copy reads.
        slots, valid_from = state.STEP.rows(n)
        self._tail_slots[:n].copy_(torch.from_numpy(slots), non_blocking=True)
        self._valid_from[:n].copy_(torch.from_numpy(valid_from), non_blocking=True)
        seq_lens_cpu = cam.seq_lens_cpu_upper_bound
        if seq_lens_cpu is None:
            seq_lens_cpu = cam.seq_lens.cpu()
        state.STEP.count_packed_groups(
            seq_lens_cpu[:n].numpy(), cam.query_start_loc_cpu[: n + 1].numpy(),
            self.cfg.group_size, len(self.layer_names),
        )
        md = KiviMetadata(
            num_actual_tokens=cam.num_actual_tokens,
            num_reqs=n,
            num_decodes=num_decodes,
            num_decode_tokens=num_decode_tokens,
            max_query_len=cam.max_query_len,
            max_seq_len=cam.max_seq_len,
            query_start_loc=cam.query_start_loc,
            seq_lens=cam.seq_lens,
            block_table=cam.block_table_tensor,
            slot_mapping=cam.slot_mapping,
            tail_slots=self._tail_slots[:n],
            valid_from=self._valid_from[:n],
            query_start_loc_cpu=cam.query_start_loc_cpu,
            seq_lens_cpu=seq_lens_cpu,
            tail_slots_cpu=slots,
            valid_from_cpu=valid_from,
        )
        if num_decodes < n and (self.device.type == "cuda" or self._stream_rows):
            self._plan_prefill(md, cam, num_decode_tokens)
        if self._stream_rows:
            self._commit_fastgen(num_decodes, num_decodes == n)
        return md

    @staticmethod
    def _commit_fastgen(num_decodes: int, uniform: bool) -> None:
        """kivi.fastgen's GPU worker: the step's decode plan, padded to the decode rows of
        this batch (vLLM pads a CUDA graph's batch); a dummy batch of decodes (capture,
        warm-up) runs padding rows only."""
        from kivi_vllm.fastgen.device import DEVICE

        if not state.STEP.in_dummy:
            DEVICE.commit(num_decodes)
        else:
            DEVICE.plan_padding(num_decodes if uniform else 0)

    def _plan_prefill(
        self, md: KiviMetadata, cam: CommonAttentionMetadata, num_decode_tokens: int
    ) -> None:
        """Host-side tiling of the prefill rows for the context kernel."""
        from kivi_vllm.kernels.ops import PREFILL_BLOCK_Q

        nd, n = md.num_decodes, md.num_reqs
        qsl = cam.query_start_loc_cpu[: n + 1].numpy()
        q_lens = np.diff(qsl)[nd:]
        ctx = md.seq_lens_cpu[nd:n].numpy() - q_lens
        md.prefill_cu_seqlens = cam.query_start_loc[nd : n + 1] - num_decode_tokens
        md.prefill_has_context = bool((ctx > 0).any())
        if not md.prefill_has_context:
            return
        tiles = -(-q_lens // PREFILL_BLOCK_Q)
        req = np.repeat(np.arange(nd, n, dtype=np.int32), tiles)
        # tile j of request r starts at token qsl[r] + j * BLOCK_Q
        starts = np.repeat(np.cumsum(tiles) - tiles, tiles)
        tok = (np.repeat(qsl[nd:n], tiles) + (np.arange(len(req)) - starts) * PREFILL_BLOCK_Q)
        num_tiles = len(req)
        md.num_prefill_tiles = num_tiles
        host = torch.from_numpy(np.stack([req, tok.astype(np.int32)]))
        self._tiles[:, :num_tiles].copy_(host, non_blocking=True)
        md.prefill_tile_req = self._tiles[0, :num_tiles]
        md.prefill_tile_tok = self._tiles[1, :num_tiles]


class KiviAttentionImpl(AttentionImpl[KiviMetadata]):
    """Attention over KIVI pages + tail; stores the step's tokens after attending."""

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        **kwargs,
    ) -> None:
        unsupported = {
            "alibi_slopes": alibi_slopes,
            "sliding_window": sliding_window,
            "logits_soft_cap": logits_soft_cap,
            "kv_sharing_target_layer_name": kv_sharing_target_layer_name,
            "sinks": kwargs.get("sinks"),
        }
        for name, value in unsupported.items():
            if value is not None:
                raise NotImplementedError(f"KIVI attention does not support {name}")
        if attn_type != AttentionType.DECODER:
            raise NotImplementedError(f"KIVI attention serves decoder layers, not {attn_type}")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.cfg: KiviConfig = state.active_config()
        self.cfg.check_head_size(head_size)
        # the layer's own format (kivi.layer_key_bits) is resolved from its name on the
        # first forward: vLLM builds the impl without the layer's name
        self.fmt = layer_page_format(self.cfg, None, head_size, self.num_kv_heads)
        self._layer_resolved = not self.cfg.layer_key_bits
        # kivi.rotate_keys: one orthogonal matrix for queries and keys (moved on first use)
        self.rotation = reference.hadamard(head_size) if self.cfg.rotate_keys else None
        self.fastgen_device = fastgen_device_worker(self.cfg)

    def forward(
        self,
        layer: AttentionLayer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: KiviMetadata | None,
        output: torch.Tensor | None = None,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        assert output is not None
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("KIVI attention does not fuse output quantization")
        if attn_metadata is None:  # profiling run
            return output.fill_(0)
        if not self._layer_resolved:
            self._resolve_layer_format(layer.layer_name, kv_cache)
        tail = state.tail_for(layer.layer_name)
        n = attn_metadata.num_actual_tokens
        q = query[:n].view(n, self.num_heads, self.head_size)
        k = key[:n].view(n, self.num_kv_heads, self.head_size)
        v = value[:n].view(n, self.num_kv_heads, self.head_size)
        out = output[:n].view(n, self.num_heads, self.head_size)
        if self.rotation is not None:  # before both paths: attention and storage
            if self.rotation.device != q.device or self.rotation.dtype != q.dtype:
                self.rotation = self.rotation.to(q.device, q.dtype)
            q, k = reference.rotate(q, self.rotation), reference.rotate(k, self.rotation)
        if self.fastgen_device:
            self._forward_fastgen_device(q, k, v, kv_cache, tail, attn_metadata, out,
                                         layer.layer_name)
        elif kv_cache.is_cuda:
            from kivi_vllm.kernels import ops

            ops.forward(q, k, v, kv_cache, tail, attn_metadata, self, out)
        else:
            self._forward_reference(q, k, v, kv_cache, tail, attn_metadata, out, layer.layer_name)
        return output

    def _forward_fastgen_device(self, q, k, v, kv_cache, tail, md: KiviMetadata, out,
                                layer_name: str) -> None:
        """kivi.fastgen on the GPU (:mod:`kivi_vllm.fastgen.device`); vLLM's dummy steps
        attend within the step, or run padding decode rows (CUDA graph capture), and store
        nothing."""
        from vllm.model_executor.models.utils import extract_layer_index

        from kivi_vllm.fastgen.device import DEVICE
        from kivi_vllm.kernels.ops import _chunk_attention

        if state.STEP.in_dummy and not DEVICE.plan.rows:
            _chunk_attention(q, k, v, md.query_start_loc, md.max_query_len, self.scale, out)
            return
        DEVICE.forward(extract_layer_index(layer_name), q, k, v, kv_cache, tail, md,
                       self.scale, out)

    def _resolve_layer_format(self, layer_name: str, kv_cache: torch.Tensor) -> None:
        """This layer's page format under ``kivi.layer_key_bits`` (checked against the
        bytes per page vLLM allocated for it from the layer's spec)."""
        from vllm.model_executor.models.utils import extract_layer_index

        layer = extract_layer_index(layer_name)
        self.fmt = layer_page_format(self.cfg, layer, self.head_size, self.num_kv_heads)
        if kv_cache.dim() != 2 or kv_cache.shape[1] != self.fmt.page_bytes:
            raise KiviConfigError(
                f"layer {layer_name}: KV cache pages of shape {tuple(kv_cache.shape)} do not "
                f"match its KIVI format ({self.fmt.page_bytes} bytes per page, key bits "
                f"{self.fmt.k_bits}); every process must get the same --additional-config"
            )
        self._layer_resolved = True

    def _forward_reference(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        tail: torch.Tensor,
        md: KiviMetadata,
        out: torch.Tensor,
        layer_name: str = "",
    ) -> None:
        steps, bounds = md.seq_steps
        if self.cfg.fastgen is not None:
            self._forward_fastgen(q, k, v, kv_cache, steps, bounds, out, layer_name)
            return
        views = self.fmt.views(kv_cache)
        for i, seq in enumerate(steps):
            lo, hi = bounds[i], bounds[i + 1]
            ck, cv = reference.context_kv(
                views, tail, seq, self.fmt, self.cfg.residual, self.cfg.sink_tokens
            )
            out[lo:hi] = reference.attend(q[lo:hi], k[lo:hi], v[lo:hi], ck, cv, self.scale)
        for i, seq in enumerate(steps):
            lo, hi = bounds[i], bounds[i + 1]
            reference.store(
                views, tail, k[lo:hi], v[lo:hi], seq, self.fmt, self.cfg.residual,
                self.cfg.sink_tokens,
            )

    def _forward_fastgen(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        steps: list[reference.SeqStep],
        bounds: list[int],
        out: torch.Tensor,
        layer_name: str,
    ) -> None:
        """kivi.fastgen: per-head kept sets in head-pages (:mod:`kivi_vllm.fastgen.engine`).
        vLLM's warm-up (dummy) steps attend within the step and store nothing."""
        from vllm.model_executor.models.utils import extract_layer_index

        from kivi_vllm.fastgen.engine import WORKER

        layer = extract_layer_index(layer_name)
        for i, seq in enumerate(steps):
            lo, hi = bounds[i], bounds[i + 1]
            if state.STEP.in_dummy:
                empty = k[lo:lo]
                out[lo:hi] = reference.attend(q[lo:hi], k[lo:hi], v[lo:hi], empty, empty,
                                              self.scale)
                continue
            out[lo:hi] = WORKER.forward(layer, i, q[lo:hi], k[lo:hi], v[lo:hi], seq, kv_cache,
                                        self.scale)
