"""Cost of FastGen's per-layer profiling on a GPU: fused Triton kernels vs float32 chunks.

For each prompt length, one layer of ``--heads`` query heads over ``--kv-heads`` KV heads
(head size ``--head-dim``, bfloat16, random queries and keys) is profiled by
``fastgen.profile.profile_heads`` both ways, and the policies are compared; then
``--batch`` such prompts are profiled together by ``fastgen.profile.profile_prompts`` (as
one engine step that prefills several prompts does) and the time per prompt is reported,
as is one prompt through that call with its layout built beforehand (``prebuilt``: the
engine builds the layout once per step; ``profile_heads`` builds it inside every call).
Prints a table and writes JSON. GPU only:

    python benchmarks/fastgen_profile_cost.py --out $OUT/fastgen-profile-cost.json
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kivi_vllm.fastgen.device import profile_chunk  # noqa: E402
from kivi_vllm.fastgen.profile import Prompts, profile_heads, profile_prompts  # noqa: E402


def time_ms(fn, reps: int = 5) -> float:
    """Median milliseconds of ``fn()`` (CUDA events, after one warm-up call)."""
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def measure(n: int, heads: int, kv_heads: int, head_dim: int, batch: int) -> dict:
    """Both profiling paths on one random layer of an ``n``-token prompt, and the fused
    path on ``batch`` such prompts at once."""
    gen = torch.Generator(device="cuda").manual_seed(n)
    total = n * batch
    q = torch.randn((total, heads, head_dim), generator=gen, device="cuda").to(torch.bfloat16)
    k = torch.randn((total, kv_heads, head_dim), generator=gen, device="cuda").to(torch.bfloat16)
    special = torch.zeros(total, dtype=torch.bool, device="cuda")
    special[::n] = True
    punct = torch.rand(total, generator=gen, device="cuda") < 0.1
    ratios = dict(frequent_ratio=0.1, local_ratio=0.2)
    run = functools.partial(profile_heads, q[:n], k[:n], special[:n], punct[:n], recovery=0.9,
                            scale=head_dim ** -0.5, chunk=profile_chunk(heads, n), **ratios)
    same = torch.equal(run(fused=True).policy, run(fused=False).policy)
    fused = time_ms(functools.partial(run, fused=True))
    chunked = time_ms(functools.partial(run, fused=False))
    prompts = Prompts.build([n] * batch, **ratios, rows=None, device="cuda")
    together = functools.partial(profile_prompts, q, k, prompts, special, punct,
                                 recovery=0.9, scale=head_dim ** -0.5, fused=True)
    alone = [profile_heads(q[i * n : (i + 1) * n], k[i * n : (i + 1) * n],
                           special[i * n : (i + 1) * n], punct[i * n : (i + 1) * n],
                           recovery=0.9, scale=head_dim ** -0.5, fused=True, **ratios).policy
             for i in range(batch)]
    same_batched = torch.equal(together().policy, torch.stack(alone))
    batched = time_ms(together)
    one = Prompts.build([n], **ratios, rows=None, device="cuda")  # the engine's way: the
    single = time_ms(functools.partial(  # layout built once per step, outside the layers
        profile_prompts, q[:n], k[:n], one, special[:n], punct[:n], recovery=0.9,
        scale=head_dim ** -0.5, fused=True))
    return {"prompt": n, "q_heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
            "fused_ms": round(fused, 3), "chunked_ms": round(chunked, 3),
            "prebuilt_ms": round(single, 3),
            "same_policies": same, "batch": batch,
            "batched_ms_per_prompt": round(batched / batch, 3),
            "same_policies_batched": same_batched, "gpu": torch.cuda.get_device_name(),
            "date": str(datetime.date.today())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", default="512,2048,8192")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=4, help="prompts profiled together")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    records = []
    print(f"{'prompt':>7} {'fused ms':>9} {'chunked ms':>11} {'speed-up':>9} {'same policies':>14}"
          f" {'prebuilt ms':>12} {f'x{args.batch} ms/prompt':>15} {'same':>6}")
    for n in map(int, args.lengths.split(",")):
        r = measure(n, args.heads, args.kv_heads, args.head_dim, args.batch)
        print(f"{n:>7} {r['fused_ms']:>9.2f} {r['chunked_ms']:>11.2f} "
              f"{r['chunked_ms'] / r['fused_ms']:>8.1f}x {str(r['same_policies']):>14}"
              f" {r['prebuilt_ms']:>12.2f} {r['batched_ms_per_prompt']:>15.2f}"
              f" {str(r['same_policies_batched']):>6}",
              flush=True)
        records.append(r)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
