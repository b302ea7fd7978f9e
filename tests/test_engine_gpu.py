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


@pytest.mark.parametrize("bits", [2, 4])
def test_no_kernel_compiles_while_serving(tmp_path, bits):
    from vllm import LLM, SamplingParams

    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA))
    llm = LLM(
        model=str(tmp_path), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
        max_model_len=4096, max_num_batched_tokens=512, max_num_seqs=64,
        gpu_memory_utilization=0.3, seed=0, jit_monitor_mode="error",
        additional_config={"kivi": {"bits": bits, "group_size": 32, "residual": 32}},
    )
    gen = torch.Generator().manual_seed(bits)
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
