"""The GPU FastGen worker (kivi_vllm.fastgen.device) against exact FastGen attention.

On CPU the Triton kernels run under TRITON_INTERPRET=1 at small sizes; the policies are
given (profiling is tested in tests/test_fastgen.py), so the test checks the streams:
admission, pages, tails, window masking and recycling, merges, and the page reports.
"""

from __future__ import annotations

import contextlib
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

DEVICE = os.environ.get("KIVI_KERNEL_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

from kivi_vllm.config import KiviConfig  # noqa: E402
from kivi_vllm.fastgen import device as fg  # noqa: E402
from kivi_vllm.fastgen.attention import attend_heads, kivi_kept_kv  # noqa: E402
from kivi_vllm.fastgen.policy import Policy, TokenClasses  # noqa: E402
from kivi_vllm.fastgen.profile import PromptsProfile  # noqa: E402
from tests.kernel_cases import rel_err  # noqa: E402

pytestmark = pytest.mark.triton

L, H, QPK, D, G, R, BITS = 2, 2, 2, 64, 32, 32, 2
POLICIES = [[Policy.LOCAL, Policy.FULL], [Policy.PUNCT, Policy.LOCAL]]
SPECIAL_ID, PUNCT_ID = 0, 1


@contextlib.contextmanager
def sync_free(on: bool = True):
    """On the GPU, make any host-device synchronisation inside the block an error."""
    if DEVICE != "cuda":
        yield
        return
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error" if on else "default")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(before)


def _causal(q, k, v, cu, max_len, scale, out, return_lse=False):
    """Stand-in for FlashAttention's varlen call (fp32, causal within each request); it
    synchronises (the real kernel does not), so it is exempt from :func:`sync_free`."""
    with sync_free(on=False):
        bounds = cu.tolist()
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            qc, kc, vc = q[a:b].cpu(), k[a:b].cpu(), v[a:b].cpu()
            out[a:b] = attend_heads(qc, kc, vc, [(kc[:0, 0], vc[:0, 0])] * kc.shape[1],
                                    scale).to(out.device)


class Request:
    """One request's tokens and its expected kept sets (FastGen semantics)."""

    def __init__(self, n: int, gen: torch.Generator) -> None:
        self.ids = torch.randint(2, 50, (n,), generator=gen)
        self.ids[torch.rand(n, generator=gen) < 0.08] = PUNCT_ID
        self.ids[0] = SPECIAL_ID
        self.n = n
        self.frequent = [torch.rand(H, n, generator=gen) < 0.3 for _ in range(L)]
        self.on_device = [f.to(DEVICE) for f in self.frequent]  # what profiling returns
        self.k = [torch.zeros(0, H, D) for _ in range(L)]
        self.v = [torch.zeros(0, H, D) for _ in range(L)]

    def kept(self, layer: int, h: int, qpos: int) -> tuple[list[int], list[int]]:
        """(permanent, live local) context positions of head h for a query at qpos."""
        policy, window = POLICIES[layer][h], math.ceil(0.3 * self.n)
        perm, local = [], []
        for p in range(qpos):
            tid = int(self.ids[p])
            frequent = p < self.n and bool(self.frequent[layer][h, p])
            if (policy == Policy.FULL or tid == SPECIAL_ID
                    or (tid == PUNCT_ID and policy >= Policy.PUNCT)
                    or (frequent and policy >= Policy.FREQUENT)):
                perm.append(p)
            elif policy == Policy.LOCAL and p > self.n - window:
                local.append(p)
        return perm, [p for p in local if p > qpos - window]

    def stream(self, layer: int, h: int, positions: list[int], qpos: int, s: int):
        """KIVI storage of a stream: all its tokens up to qpos (incl. expired ones, which
        shape its pages), then the given positions."""
        perm, _ = self.kept(layer, h, qpos)
        if s == 0:
            every = perm
        else:
            window = math.ceil(0.3 * self.n)
            every = [p for p in range(self.n - window + 1, qpos) if p not in perm]
        idx = torch.tensor(every, dtype=torch.long)
        k, v, _ = kivi_kept_kv(self.k[layer][idx, h], self.v[layer][idx, h], BITS, G, R)
        sel = torch.tensor([every.index(p) for p in positions], dtype=torch.long)
        return k[sel], v[sel]


def _profile_stub(req_of_n):
    """profile_prompts returning the given policies and heavy hitters (device tensors)."""
    policies = [torch.tensor([int(p) for p in ps], device=DEVICE) for ps in POLICIES]

    def profile(q, k, prompts, special, punct, **kwargs):
        found = [req_of_n[n] for n in prompts.lengths]
        assert prompts.windows == [math.ceil(0.3 * req.n) for req, _ in found]
        frequent = torch.cat([req.on_device[layer] for req, layer in found], dim=1)
        return PromptsProfile(
            recovery=torch.zeros(len(found), H * QPK, 5, device=DEVICE), frequent=frequent,
            policy=torch.stack([policies[layer] for _, layer in found]),
            scores=frequent.double())
    return profile


class Graphs:
    """The worker's decode forward of every layer captured once per padded batch size, as
    vLLM captures a uniform decode batch: over a plan of padding rows, inputs and outputs
    in fixed buffers; a step commits its plan to the same buffers and replays."""

    def __init__(self, worker, cache, tail, scale) -> None:
        self.worker, self.cache, self.tail, self.scale = worker, cache, tail, scale
        self.graphs: dict = {}

    def _forward(self, qkv, outs, md) -> None:
        for layer in range(L):
            qd, kd, vd = _split(qkv[layer])
            self.worker.forward(layer, qd, kd, vd, self.cache[layer], self.tail[layer], md,
                                self.scale, outs[layer])

    def run(self, decodes: int, qkv: list, outs: list, md) -> None:
        if decodes not in self.graphs:
            plan = self.worker.plan
            self.worker.plan_padding(decodes)
            static = ([torch.zeros_like(x) for x in qkv], [torch.zeros_like(o) for o in outs])
            self._forward(*static, md)  # warm-up: compiles what the capture launches
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._forward(*static, md)
            self.graphs[decodes] = (graph, static)
            self.worker.plan = plan
        graph, (qkv_in, outs_in) = self.graphs[decodes]
        self.worker.commit(decodes)
        for dst, src in zip(qkv_in, qkv, strict=True):
            dst.copy_(src)
        graph.replay()
        for dst, src in zip(outs, outs_in, strict=True):
            dst.copy_(src)


def _split(qkv: torch.Tensor):
    """q, k, v as strided slices of one fused QKV row, as vLLM's attention layers pass them."""
    return (part.view(-1, heads, D) for part, heads in zip(
        qkv.split([H * QPK * D, H * D, H * D], dim=1), (H * QPK, H, H), strict=True))


def _padding(mode: str, step: int) -> int:
    """Padding rows of a decode-only step. "padded": two on odd steps (vLLM pads a CUDA
    graph's batch), none on even ones (as planned: eager); "graph": three, and the step
    replays a CUDA graph captured over them (GPU)."""
    return 3 if mode == "graph" else 2 * (step % 2)


@pytest.mark.parametrize("mode", [
    "padded",
    pytest.param("graph", marks=pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs")),
])
def test_device_worker_matches_fastgen_attention(mode, monkeypatch):
    from kivi_vllm.kernels import ops

    gen = torch.Generator().manual_seed(0)
    monkeypatch.setattr(ops, "_chunk_attention", _causal)
    cfg = KiviConfig(bits=BITS, group_size=G, residual=R, fastgen={"recovery": 0.9})
    worker = fg.DeviceFastGen()
    classes = TokenClasses(frozenset({SPECIAL_ID}), frozenset({PUNCT_ID}))
    slots = 8
    worker.enable(cfg, classes, L, H, D, slots, 256, torch.device(DEVICE))
    blocks = 600
    cache = [torch.randint(0, 256, (blocks, worker.fmt.page_bytes), dtype=torch.uint8,
                           device=DEVICE) for _ in range(L)]
    tail = [torch.randn(2, (slots + 1) * H * 2, R, 1, D, device=DEVICE) for _ in range(L)]
    rows_of = torch.randperm(blocks, generator=gen).numpy().astype(np.int32).reshape(3, -1)
    reqs = {"a": Request(90, gen), "b": Request(70, gen), "c": Request(45, gen)}
    slot_of = {"a": 2, "b": 0, "c": 1}
    begins = {"a": 0, "b": 5, "c": 5}  # b and c: two prompts profiled in one step
    req_of_n: dict = {}
    monkeypatch.setattr(fg, "profile_prompts", _profile_stub(req_of_n))
    scale = D ** -0.5
    graphs = Graphs(worker, cache, tail, scale)
    computed = dict.fromkeys(reqs, 0)
    reports = {}
    for step in range(int(os.environ.get("FGSTEPS", 48))):
        batch = [r for r in reqs if computed[r] or step == begins[r]]
        batch.sort(key=lambda r: computed[r] == 0)  # decodes first
        sched = {r: 1 if computed[r] else reqs[r].n for r in batch}
        for r in batch:  # a decode step appends a generated token
            if computed[r] and computed[r] >= reqs[r].ids.shape[0]:
                tid = torch.randint(2, 50, (1,), generator=gen)
                if step % 7 == 0:
                    tid[0] = PUNCT_ID
                reqs[r].ids = torch.cat([reqs[r].ids, tid])
        token_ids = np.zeros((len(batch), 256), np.int64)
        for i, r in enumerate(batch):
            token_ids[i, : reqs[r].ids.shape[0]] = reqs[r].ids.numpy()
        held = np.array([10_000] * len(batch))
        worker.begin_step(set(), batch, np.array([computed[r] for r in batch]), sched,
                          np.array([slot_of[r] for r in batch]), token_ids, held,
                          np.stack([rows_of["abc".index(r)] for r in batch]))
        qlens = [sched[r] for r in batch]
        cu = torch.tensor([0, *np.cumsum(qlens)], dtype=torch.int32)
        nd = sum(1 for r in batch if computed[r])
        pad = _padding(mode, step) if nd == len(batch) else 0
        tokens = int(cu[-1]) + pad
        md = SimpleNamespace(num_actual_tokens=tokens, num_decode_tokens=nd + pad,
                             num_decodes=nd + pad, num_reqs=len(batch) + pad,
                             query_start_loc_cpu=cu, prefill_cu_seqlens=(cu[nd:] - nd).to(DEVICE),
                             max_query_len=max(qlens))
        qs = [torch.randn(tokens, H * QPK, D, generator=gen) for _ in range(L)]
        ks = [torch.randn(tokens, H, D, generator=gen) + torch.randn(H, D, generator=gen)
              for _ in range(L)]
        vs = [torch.randn(tokens, H, D, generator=gen) for _ in range(L)]
        # one fused QKV row per token, as vLLM's attention layers slice it (strided views)
        qkv = [torch.cat([x.flatten(1) for x in xs], dim=1).to(DEVICE)
               for xs in zip(qs, ks, vs, strict=True)]
        outs = [torch.full_like(q, float("nan"), device=DEVICE) for q in qs]
        if mode == "graph" and pad:
            graphs.run(nd + pad, qkv, outs, md)
        else:
            worker.commit(nd + pad)  # the metadata builder's call (padded)
            for layer in range(L):
                for r in batch:
                    if not computed[r]:
                        req_of_n[reqs[r].n] = (reqs[r], layer)
                qd, kd, vd = _split(qkv[layer])
                with sync_free():  # no host-device synchronisation in the forward
                    worker.forward(layer, qd, kd, vd, cache[layer], tail[layer], md, scale,
                                   outs[layer])
        for layer, (q, k, v, out) in enumerate(zip(qs, ks, vs, outs, strict=True)):
            for i, r in enumerate(batch):
                a, b = int(cu[i]), int(cu[i + 1])
                req = reqs[r]
                if computed[r]:  # decode row: FastGen attention over the kept streams
                    qpos = computed[r]
                    contexts = []
                    for h in range(H):
                        perm, live = req.kept(layer, h, qpos)
                        pk, pv = req.stream(layer, h, perm, qpos, 0)
                        lk, lv = req.stream(layer, h, live, qpos, 1)
                        contexts.append((torch.cat([pk, lk]), torch.cat([pv, lv])))
                    ref = attend_heads(q[a:b], k[a:b], v[a:b], contexts, scale)
                    assert rel_err(out[a:b].cpu(), ref) < 5e-3, (step, layer, r)
                req.k[layer] = torch.cat([req.k[layer], k[a:b]])
                req.v[layer] = torch.cat([req.v[layer], v[a:b]])
            assert not out[int(cu[-1]):].isnan().any(), "padding rows left unwritten"
        worker.end_step(SimpleNamespace(num_blocks_per_row=np.zeros(4, np.int32)),
                        {r: i for i, r in enumerate(batch)})
        step_reports = worker.take_reports()
        for r, rep in step_reports.items():  # the plan's counts = the request's own
            assert rep == worker.seqs[r].report(), (step, r)
        reports.update(step_reports)
        for sq in worker.seqs.values():  # each live page in one stream, none also free
            live = [int(e) for layer in range(L) for h in range(H) for s in (0, 1)
                    for i, e in enumerate(sq.entries[layer, h, s])
                    if e >= 0 and i >= (sq.recycled[layer, h] if s else 0)]
            assert len(set(live)) == len(live) and not set(live) & set(sq.free), step
        for r in batch:
            computed[r] += sched[r]
    seq = worker.seqs["a"]
    assert reports["a"].keep == seq.used and seq.recycled.sum() > 0  # local pages recycled
    live_pages = sum(int(np.sum(seq.entries[layer, h, s] >= 0)) for layer in range(L)
                     for h in range(H) for s in (0, 1)) - int(seq.recycled.sum())
    assert live_pages == seq.used - len(seq.free)


def test_profile_mirror_hands_out_entries_in_order_and_checks_the_allocation():
    """settle_profile: entries in (layer, head, stream) order; more pages than the
    scheduler gave the request is an error, not a silent overwrite."""
    window = 5
    policy = np.full((L, H), Policy.LOCAL)
    lengths = np.array([[[70, 3], [31, 32]], [[0, 64], [33, 1]]])  # [L, H, 2] tokens
    local = np.zeros((L, H, window - 1), bool)
    pages = lengths // G  # 2, 0, 0, 1, 0, 2, 1, 0: 6 pages
    seq = fg.DeviceSeq(0, L, H, 8, window=window, held=6, group=G)
    seq.settle_profile(policy, lengths, local)
    assert seq.used == 6 and seq.layer_pages == [3, 3]
    got = [list(seq.entries[la, h, s][seq.entries[la, h, s] >= 0])
           for la in range(L) for h in range(H) for s in (0, 1)]
    assert got == [[0, 1], [], [], [2], [], [3, 4], [5], []]
    assert (seq.length == lengths).all() and pages.sum() == 6
    short = fg.DeviceSeq(0, L, H, 8, window=window, held=5, group=G)
    with pytest.raises(RuntimeError, match="holds 5"):
        short.settle_profile(policy, lengths, local)


NUM_LAYERS = 2  # the engine test's SmolLM2 (dummy weights, its first layers only)
PROMPTS, GEN = (150, 90, 120), 6  # the first two fill step 1; the third joins 2 decodes


@pytest.fixture(scope="module")
def device_worker_llm(default_model_path: str):
    """A CPU engine whose FastGen runs on the device worker (its Triton kernels under the
    interpreter): two layers of SmolLM2 with dummy weights, token-id prompts."""
    if DEVICE != "cpu":
        pytest.skip("the CPU engine (on a GPU the device worker is the default)")
    from conftest import engine

    from kivi_vllm.memory import DEVICE_WORKER_ENV

    kivi = {"bits": BITS, "group_size": G, "residual": R,
            "fastgen": {"recovery": 0.9, "special_ids": [SPECIAL_ID], "punct_ids": [PUNCT_ID]}}
    with pytest.MonkeyPatch.context() as env:  # set while this module's engine lives
        env.setenv(DEVICE_WORKER_ENV, "1")
        with engine(default_model_path, kivi, 1, load_format="dummy", dtype="float32",
                    skip_tokenizer_init=True, hf_overrides={"num_hidden_layers": NUM_LAYERS},
                    enable_chunked_prefill=False, max_num_batched_tokens=256,
                    max_model_len=256, max_num_seqs=4) as llm:
            yield llm


@pytest.mark.slow
def test_engine_through_the_device_worker(device_worker_llm) -> None:
    """vLLM's runner hooks drive the device worker end to end (strided q/k/v from the
    fused QKV projection, a mixed decode + prefill step, compaction, page reports): every
    request generates in full, its head-pages shrink after profiling, and finished
    requests leave no FastGen state, tail slot or KV block behind."""
    from conftest import metric, wait_tail_slots_free
    from vllm import SamplingParams

    from kivi_vllm.fastgen.engine import fastgen_stats

    llm = device_worker_llm
    rng = np.random.default_rng(0)
    prompts = []
    for n in PROMPTS:
        ids = rng.integers(100, 40000, n)
        ids[0], ids[rng.random(n) < 0.1] = SPECIAL_ID, PUNCT_ID
        prompts.append({"prompt_token_ids": ids.tolist()})
    outs = llm.generate(prompts, SamplingParams(max_tokens=GEN, temperature=0, ignore_eos=True))
    stats = llm.collective_rpc(fastgen_stats)[0]
    heads = NUM_LAYERS * llm.llm_engine.vllm_config.model_config.get_total_num_kv_heads()
    assert stats["enabled"] and stats["device"] == "gpu" and stats["requests"] == 0
    assert stats["peak_rows"] == 3 and stats["decode_steps"] > 0
    assert stats["mixed_steps"] >= 1  # the third prompt joined a decode step
    history = {k.rsplit("-", 1)[0]: v for k, v in stats["history"].items()}
    for out, n in zip(outs, PROMPTS, strict=True):
        assert len(out.outputs[0].token_ids) == GEN
        summary = history[out.request_id]
        assert summary["prompt_len"] == n and summary["tokens"] == n + GEN - 1
        assert sum(summary["policy_counts"]) == heads
        assert 0 < summary["pages_after_profile"] < heads * -(-n // G)
    assert wait_tail_slots_free(llm)["tail_slots_in_use"] == 0
    assert metric(llm, "vllm:kv_cache_usage_perc") == 0


def test_graph_support_and_dummy_plans(monkeypatch) -> None:
    """The builder declares full decode graphs with the device worker (the CPU worker plans
    every layer on the host: none); vLLM's dummy batches of decodes (warm-up, capture) get
    a plan of padding rows that reads both streams, other dummy batches none."""
    from vllm.platforms import current_platform
    from vllm.v1.attention.backend import AttentionCGSupport

    from kivi_vllm import backend, state
    from kivi_vllm.memory import DEVICE_WORKER_ENV

    cfg = KiviConfig(bits=BITS, group_size=G, residual=R, fastgen={"recovery": 0.9})
    monkeypatch.setattr(state, "_ACTIVE", cfg)
    builder = backend.KiviMetadataBuilder
    if current_platform.is_cpu():  # the CPU worker unless asked for the device worker
        monkeypatch.delenv(DEVICE_WORKER_ENV, raising=False)
        assert builder.get_cudagraph_support(None, None) == AttentionCGSupport.NEVER
        monkeypatch.setenv(DEVICE_WORKER_ENV, "1")
    support = builder.get_cudagraph_support(None, None)
    assert support == AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE

    worker = fg.DeviceFastGen()
    classes = TokenClasses(frozenset({SPECIAL_ID}), frozenset({PUNCT_ID}))
    worker.enable(cfg, classes, L, H, D, 4, 128, torch.device(DEVICE))
    monkeypatch.setattr(fg, "DEVICE", worker)
    monkeypatch.setattr(state.STEP, "in_dummy", True)
    builder._commit_fastgen(3, True)
    plan = worker.plan
    assert plan.decodes == 0 and plan.rows == 3 * H and plan.has_local.all()
    assert (plan.store == -1).all() and (plan.lens[:, :2] == 1).all()
    assert (plan.lens[:, 2] == 0).all()
    scratch = worker.vslot(4, np.arange(H), np.arange(2)[:, None])  # slot 4: no request's
    assert (plan.slots.cpu().numpy() == np.tile(scratch, 3)).all()
    builder._commit_fastgen(5, False)  # prompts among the rows: FlashAttention only
    assert worker.plan.rows == 0
