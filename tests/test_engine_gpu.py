"""The KIVI engine on a GPU with vLLM's defaults (torch.compile, CUDA graphs), no JIT in
the serving path. Skipped without CUDA; run on the GPU host by ``scripts/gpu_run.sh``.

vLLM's JIT monitor in ``error`` mode fails any step that compiles a Triton kernel, so
every kernel variant a workload of chunked prefills with earlier context, mixed
batches, split and unsplit decodes needs must already exist after start-up
(``kivi_vllm/kernels/warmup.py``).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.conftest import shutdown_llm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# The pytest process may already hold a CUDA context (a forked engine core could not
# initialise CUDA again), so the engine's processes are spawned.
os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")

TINY_LLAMA = {  # head layout of Llama-3.1-8B (head_dim 128, GQA 4), 4 small layers
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 1024,
    "intermediate_size": 2048, "num_hidden_layers": 4, "num_attention_heads": 8,
    "num_key_value_heads": 2, "head_dim": 128, "vocab_size": 32000,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "torch_dtype": "bfloat16", "tie_word_embeddings": False,
}


SERVE_CONFIGS = [
    {"bits": 2, "group_size": 32, "residual": 32},
    {"bits": 4, "group_size": 32, "residual": 32},
    # the best 2-bit lever setting (docs/benchmarks.md): attention sinks + rotated keys
    {"bits": 2, "group_size": 32, "residual": 96, "sink_groups": 1, "rotate_keys": True},
    # ... with 4-bit keys in two layers: two page formats, two attention groups
    {"bits": 2, "group_size": 32, "residual": 96, "sink_groups": 1, "rotate_keys": True,
     "layer_key_bits": {"0": 4, "2": 4}},
    # ... with float8 scales (the F8 setting of docs/benchmarks.md, fewer 4-bit layers)
    {"bits": 2, "group_size": 32, "residual": 96, "sink_groups": 1, "rotate_keys": True,
     "fp8_scales": True, "layer_key_bits": {"0": 4, "2": 4}},
]


def _config_id(kivi: dict) -> str:
    from kivi_vllm.config import KiviConfig

    return KiviConfig.from_dict(kivi).name


@pytest.mark.parametrize("kivi", SERVE_CONFIGS, ids=_config_id)
def test_no_kernel_compiles_while_serving(tmp_path, kivi):
    from vllm import LLM, SamplingParams

    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA))
    llm = LLM(
        model=str(tmp_path), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
        max_model_len=4096, max_num_batched_tokens=512, max_num_seqs=64,
        gpu_memory_utilization=0.3, seed=0, jit_monitor_mode="error",
        additional_config={"kivi": kivi},
    )
    gen = torch.Generator().manual_seed(kivi["bits"])
    lengths = [1500, 900, 3000, 64, 33, 700] + [int(x) for x in torch.randint(5, 200, (40,),
                                                                                generator=gen)]
    prompts = [{"prompt_token_ids": torch.randint(100, 31000, (n,), generator=gen).tolist()}
               for n in lengths]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    try:
        outs = llm.generate(prompts, params, use_tqdm=False)  # raises if a kernel compiles
        assert [len(o.outputs[0].token_ids) for o in outs] == [24] * len(prompts)
    finally:
        shutdown_llm(llm)


# ---- levers through KiviAttentionImpl.forward on CUDA against the CPU reference path ----

LAYER = "model.layers.0.self_attn.attn"
HEADS, KV_HEADS, D = 8, 2, 128
SCHEDULE = [[70, 50] + [1] * 30, [37, 64, 90, 45, 1, 1, 1, 60] + [1] * 24]  # chunks per seq


class _Layer:
    layer_name = LAYER


def _metadata(steps: list[tuple[int, int, int]], block_table: torch.Tensor, group: int,
              device: torch.device):
    """KiviMetadata of one step, ``steps`` = (seq, ctx, query_len) with decodes first; on
    CUDA the prefill tiles are planned by the builder's own ``_plan_prefill``."""
    from types import SimpleNamespace

    import numpy as np

    from kivi_vllm.backend import KiviMetadata, KiviMetadataBuilder

    seqs = [s for s, _, _ in steps]
    qlens = torch.tensor([q for _, _, q in steps], dtype=torch.int32)
    qsl = torch.zeros(len(steps) + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(qlens, 0)
    seq_lens = torch.tensor([c + q for _, c, q in steps], dtype=torch.int32)
    bt = block_table[seqs]
    pos = torch.cat([torch.arange(c, c + q) for _, c, q in steps])
    row = torch.repeat_interleave(torch.arange(len(steps)), qlens.long())
    slot_mapping = bt[row, pos // group].long() * group + pos % group
    slots = np.array(seqs, dtype=np.int32)
    valid_from = np.zeros(len(steps), dtype=np.int32)
    nd = int((qlens == 1).sum())
    assert bool((qlens[:nd] == 1).all()), "decodes first"
    md = KiviMetadata(
        num_actual_tokens=int(qsl[-1]), num_reqs=len(steps), num_decodes=nd,
        num_decode_tokens=nd, max_query_len=int(qlens.max()), max_seq_len=int(seq_lens.max()),
        query_start_loc=qsl.to(device), seq_lens=seq_lens.to(device),
        block_table=bt.to(device), slot_mapping=slot_mapping.to(device),
        tail_slots=torch.from_numpy(slots).to(device),
        valid_from=torch.from_numpy(valid_from).to(device), query_start_loc_cpu=qsl,
        seq_lens_cpu=seq_lens, tail_slots_cpu=slots, valid_from_cpu=valid_from,
    )
    if device.type == "cuda" and nd < len(steps):
        tiles = torch.zeros((2, 4096), dtype=torch.int32, device=device)
        cam = SimpleNamespace(query_start_loc_cpu=qsl, query_start_loc=md.query_start_loc)
        KiviMetadataBuilder._plan_prefill(SimpleNamespace(_tiles=tiles), md, cam, nd)
    return md, pos


def _run_impl(cfg, qkv, device: torch.device) -> torch.Tensor:
    """Feed SCHEDULE's sequences step by step (bf16, as vLLM runs the model); the
    attention outputs of every position as float32 [seq, pos, HEADS, D]."""
    from kivi_vllm import state
    from kivi_vllm.backend import KiviAttentionImpl
    from kivi_vllm.page_format import layer_page_format

    q, k, v = qkv
    state._ACTIVE, state._TAILS = None, {}
    state.activate(cfg)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # as vLLM builds the model's layers
    try:
        impl = KiviAttentionImpl(HEADS, D, D**-0.5, KV_HEADS)
    finally:
        torch.set_default_dtype(default)
    state.allocate_tails([LAYER], len(SCHEDULE), cfg.residual, KV_HEADS, D, torch.bfloat16,
                         device)
    g, n = cfg.group_size, q.shape[1]
    per_seq = -(-n // g)
    block_table = torch.randperm(len(SCHEDULE) * per_seq, generator=torch.Generator()
                                 .manual_seed(0)).view(len(SCHEDULE), per_seq).int()
    fmt = layer_page_format(cfg, 0, D, KV_HEADS)  # LAYER is layer 0
    kv_cache = torch.zeros(block_table.numel(), fmt.page_bytes, dtype=torch.uint8,
                           device=device)
    outs = torch.full((len(SCHEDULE), n, HEADS, D), float("nan"))
    done = [0] * len(SCHEDULE)
    for step in range(max(len(s) for s in SCHEDULE)):
        steps = [(i, done[i], s[step]) for i, s in enumerate(SCHEDULE) if step < len(s)]
        steps.sort(key=lambda x: x[2] != 1)  # decodes first, as vLLM reorders the batch
        md, pos = _metadata(steps, block_table, g, device)
        seqs = torch.cat([torch.full((ql,), i) for i, _, ql in steps])
        flat = [x[seqs, pos].flatten(1).to(device, torch.bfloat16) for x in (q, k, v)]
        out = torch.full((len(pos), HEADS * D), float("nan"), dtype=torch.bfloat16,
                         device=device)
        impl.forward(_Layer(), *flat, kv_cache, md, output=out)
        outs[seqs, pos] = out.view(-1, HEADS, D).float().cpu()
        for i, _, ql in steps:
            done[i] += ql
    state._ACTIVE, state._TAILS = None, {}
    return outs


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert not torch.isnan(a).any() and not torch.isnan(b).any(), "unwritten output"
    return float((a.double() - b.double()).norm() / b.double().norm())


LEVER_CASES = [  # (config with the lever(s), the same without them)
    ({"bits": 2, "residual": 32, "rotate_keys": True}, {"bits": 2, "residual": 32}),
    ({"bits": 2, "residual": 96, "sink_groups": 1, "rotate_keys": True},
     {"bits": 2, "residual": 96}),
    ({"bits": 4, "residual": 64, "sink_groups": 1}, {"bits": 4, "residual": 64}),
    ({"bits": 2, "residual": 32, "layer_key_bits": {"0": 4}}, {"bits": 2, "residual": 32}),
    ({"bits": 2, "residual": 32, "fp8_scales": True}, {"bits": 2, "residual": 32}),
]


@pytest.mark.parametrize(("levers", "plain"), LEVER_CASES)
def test_levers_on_gpu_match_cpu_reference(levers, plain):
    """Prefill chunks with and without context, mixed and pure decode steps of two
    sequences through the CUDA path (kernels, FlashAttention, merge) equal the CPU
    reference path of the same config up to bf16/fp16 rounding, and are clearly further
    from the reference path without the levers (so a lever the GPU ignored would fail)."""
    from kivi_vllm.config import KiviConfig

    gen = torch.Generator().manual_seed(len(str(levers)))
    n = max(sum(s) for s in SCHEDULE)
    q = torch.randn(len(SCHEDULE), n, HEADS, D, generator=gen) * 2
    k = torch.randn(len(SCHEDULE), n, KV_HEADS, D, generator=gen)
    k[..., 5] = k[..., 5] * 6 + 4  # an outlier channel, as real keys have
    k[:, :4] *= 3  # large early keys: the sinks matter
    v = torch.randn(len(SCHEDULE), n, KV_HEADS, D, generator=gen)
    qkv = tuple(x.to(torch.bfloat16).float() for x in (q, k, v))
    cfg, cfg_plain = KiviConfig.from_dict(levers), KiviConfig.from_dict(plain)
    gpu = _run_impl(cfg, qkv, torch.device("cuda"))
    cpu = _run_impl(cfg, qkv, torch.device("cpu"))
    cpu_plain = _run_impl(cfg_plain, qkv, torch.device("cpu"))
    written = torch.arange(n)[None, :] < torch.tensor([sum(s) for s in SCHEDULE])[:, None]
    gpu, cpu, cpu_plain = gpu[written], cpu[written], cpu_plain[written]
    err, err_plain = _rel(gpu, cpu), _rel(gpu, cpu_plain)
    print(f"LEVERS {cfg.name}: |gpu-cpu|/|cpu| {err:.2e}, vs {cfg_plain.name} {err_plain:.2e}")
    assert err < 1e-2
    assert err_plain > 3 * err
