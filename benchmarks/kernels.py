"""Decode attention time: KIVI-2 / KIVI-4 Triton kernels vs FlashAttention on a bf16 cache.

Llama-3.1-8B head layout (32 query heads, 8 KV heads, head_dim 128), batch x context
grid; achieved bytes/s against the card's measured copy bandwidth. Each case is timed as
one CUDA-graph replay after an L2 flush, as the engine serves decode (full graphs), so small
grids measure the GPU and not Python's launch cost (``--eager`` times plain launches);
``--flush read`` leaves L2 clean instead of dirty before each call.
GPU only:

    python benchmarks/kernels.py --out benchmarks/results/kernels-h100.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import kivi_env  # noqa: E402
from kivi_vllm.kernels.attention import attend_context  # noqa: E402
from kivi_vllm.page_format import PageFormat, bf16_bytes_per_token  # noqa: E402

HQ, HK, D = 32, 8, 128
KINDS = ("kivi4", "kivi2", "kivi4-fp8s", "kivi2-fp8s")  # -fp8s: ``kivi.fp8_scales``


def copy_bandwidth() -> float:
    """Bytes/s of a large device-to-device copy (bytes read + written)."""
    import triton.testing

    src = torch.empty(2 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300,
                                 return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def time_us(run, graph: bool, flush: str = "write") -> float:
    """Median time of ``run`` in microseconds (a captured CUDA-graph replay, or a plain
    call), each call after an L2 flush: ``write`` zeroes 256 MB (``triton.testing.do_bench``:
    L2 left full of dirty lines, written back during the timed call), ``read`` reads 256 MB
    (L2 left clean, as the layer's GEMMs leave it before attention in the engine)."""
    import triton.testing

    run()  # compiles
    if graph:
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            run()
        run = g.replay
    if flush == "write":
        return triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median") * 1e3
    buf = torch.ones(256 << 20, dtype=torch.int8, device="cuda")
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(100)]
    for i in range(110):
        buf.sum()
        if i >= 10:
            events[i - 10][0].record()
        run()
        if i >= 10:
            events[i - 10][1].record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in events) * 1e3


def kivi_case(bits: int, batch: int, ctx: int, group: int = 32, residual: int = 32,
              q_heads: int = HQ, fp8_scales: bool = False):
    fmt = PageFormat(bits, group, D, HK, fp8_scales=fp8_scales)
    blocks_per = -(-(ctx + 1) // group)
    num_blocks = batch * blocks_per + 1
    cache = torch.randint(0, 256, (num_blocks, fmt.page_bytes), dtype=torch.uint8,
                          device="cuda")
    views = fmt.views(cache)
    for name in ("k_scale", "v_scale"):
        views[name].copy_(torch.rand_like(views[name], dtype=torch.float32).half() * 0.1)
    for name in ("k_min", "v_min"):
        views[name].copy_(torch.randn_like(views[name], dtype=torch.float32).half())
    block_table = (torch.randperm(num_blocks - 1, device="cuda")[: batch * blocks_per] + 1)
    block_table = block_table.view(batch, blocks_per).int()
    tail = torch.randn((2, batch + 1, residual, HK, D), dtype=torch.bfloat16, device="cuda")
    q = torch.randn(batch, q_heads, D, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(batch, HK, D, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    seq_lens = torch.full((batch,), ctx + 1, dtype=torch.int32, device="cuda")
    qsl = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
    slots = torch.arange(batch, dtype=torch.int32, device="cuda")
    valid_from = torch.zeros(batch, dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)

    def run():
        return attend_context(q, k, v, cache, tail, block_table, seq_lens, qsl, slots, valid_from,
                       fmt, residual, D ** -0.5, out, decode=True, num_tiles=batch)

    nbytes = batch * HK * (ctx // group) * (fmt.page_bytes // HK) + batch * q_heads * D * 4
    return run, nbytes


def fa_case(batch: int, ctx: int, block: int = 16):
    from vllm.v1.attention.backends.fa_utils import flash_attn_varlen_func

    blocks_per = -(-(ctx + 1) // block)
    num_blocks = batch * blocks_per + 1
    kc = torch.randn(num_blocks, block, HK, D, dtype=torch.bfloat16, device="cuda")
    vc = torch.randn_like(kc)
    bt = (torch.randperm(num_blocks - 1, device="cuda")[: batch * blocks_per] + 1)
    bt = bt.view(batch, blocks_per).int()
    q = torch.randn(batch, HQ, D, dtype=torch.bfloat16, device="cuda")
    cu = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
    seq = torch.full((batch,), ctx + 1, dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)

    def run():
        flash_attn_varlen_func(q=q, k=kc, v=vc, cu_seqlens_q=cu, max_seqlen_q=1,
                               seqused_k=seq, max_seqlen_k=ctx + 1, softmax_scale=D ** -0.5,
                               causal=True, block_table=bt, out=out, fa_version=3)

    nbytes = batch * (ctx + 1) * bf16_bytes_per_token(HK, D) + batch * HQ * D * 4
    return run, nbytes


def decode_loop(kv: str) -> str:
    """Which page loop serves ``kv``: FlashAttention, decode v7 (Gluon) or the Triton loop."""
    from kivi_vllm.kernels import attention
    from kivi_vllm.kernels.decode_gluon import gluon_supports

    if kv == "bf16_fa":
        return "fa3"
    fmt = PageFormat(int(kv[4]), 32, D, HK, fp8_scales=kv.endswith("-fp8s"))
    v7 = attention.USE_GLUON and gluon_supports(fmt, HQ // HK, torch.device("cuda"))
    return "v7" if v7 else "triton"


TUNE_SETTINGS = (  # (warps, stages, max registers, decode slots)
    (2, 3, 128, 1), (2, 2, None, 4), (2, 3, None, 4), (2, 2, 168, 4), (2, 2, None, 2),
)
TUNE_CASES = (  # (batch, context, bits, group, query heads per KV head)
    (64, 8192, 2, 32, 4), (64, 8192, 4, 32, 4), (8, 32768, 2, 32, 4), (256, 2048, 2, 32, 4),
    (64, 8192, 2, 64, 4), (64, 8192, 2, 32, 8), (64, 8192, 2, 32, 2),
)


def tune() -> None:
    """Decode kernel time for a few launch settings (prints one line each)."""
    import triton.testing

    from kivi_vllm.kernels import attention

    attention.USE_GLUON = False  # the Triton loop's launch settings
    for batch, ctx, bits, group, qpk in TUNE_CASES:
        run, nbytes = kivi_case(bits, batch, ctx, group=group, q_heads=HK * qpk)
        for warps, stages, regs, slots in TUNE_SETTINGS:
            attention.DECODE_WARPS, attention.MAX_SLOTS = warps, slots
            attention.NUM_STAGES = attention.SLOT_STAGES = stages
            attention.MAX_REGISTERS = attention.SLOT_MAX_REGISTERS = regs
            handle = run()
            ms = triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median")
            print(f"tune B={batch} ctx={ctx} bits={bits} G={group} qpk={qpk} warps={warps} "
                  f"stages={stages} maxnreg={regs} slots={slots} regs={handle.n_regs} "
                  f"spills={handle.n_spills}: {ms * 1e3:.1f}us "
                  f"{nbytes / (ms * 1e-3) / 1e12:.2f} TB/s", flush=True)
        del run
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", default="1,16,64,256")
    parser.add_argument("--contexts", default="1024,4096,8192,32768")
    parser.add_argument("--out", default=None)
    parser.add_argument("--kv", default="kivi4,kivi2",
                        help=f"KIVI variants besides FlashAttention on bf16, from {KINDS}")
    parser.add_argument("--eager", action="store_true",
                        help="time plain launches (Python's launch cost included), no graph")
    parser.add_argument("--flush", choices=("write", "read"), default="write",
                        help="L2 flush before each timed call: zero 256 MB (do_bench's, "
                             "dirty lines) or read it (clean lines, as in the engine)")
    parser.add_argument("--tune", action="store_true",
                        help="sweep warps and split targets at batch 64 x 8k, then exit")
    args = parser.parse_args()
    if args.tune:
        tune()
        return
    kinds = ["bf16_fa", *args.kv.split(",")]
    if unknown := [kv for kv in kinds[1:] if kv not in KINDS]:
        parser.error(f"--kv: unknown {unknown}; allowed: {', '.join(KINDS)}")
    bw = copy_bandwidth()
    print(f"copy bandwidth: {bw / 1e12:.2f} TB/s (read + write)")
    gpu = torch.cuda.get_device_name()
    settings = kivi_env()
    print(f"settings: {settings}")
    records = []
    for batch in map(int, args.batches.split(",")):
        for ctx in map(int, args.contexts.split(",")):
            if batch * ctx > 256 * 32768:
                continue
            row = {}
            for kv in kinds:
                run, nbytes = fa_case(batch, ctx) if kv == "bf16_fa" else kivi_case(
                    int(kv[4]), batch, ctx, fp8_scales=kv.endswith("-fp8s"))
                us = time_us(run, graph=not args.eager, flush=args.flush)
                rec = {"kv": kv, "batch": batch, "context": ctx, "loop": decode_loop(kv),
                       "timing": "eager" if args.eager else "cuda-graph",
                       "l2_flush": args.flush,
                       "time_us": round(us, 2),
                       "bytes": nbytes, "bytes_per_s": round(nbytes / (us * 1e-6)),
                       "fraction_of_copy_bw": round(nbytes / (us * 1e-6) / bw, 3),
                       "copy_bandwidth_bytes_per_s": round(bw),
                       "gpu": gpu, "date": str(datetime.date.today()),
                       "settings": settings}
                records.append(rec)
                row[kv] = rec
                del run
                torch.cuda.empty_cache()
            fa = row["bf16_fa"]["time_us"]
            print(f"B={batch:4d} ctx={ctx:6d}  FA-bf16 {fa:9.1f}us  " + "  ".join(
                f"{kv}[{r['loop']}] {r['time_us']:9.1f}us ({fa / r['time_us']:.2f}x, "
                f"{r['fraction_of_copy_bw']:.0%} bw)" for kv, r in row.items() if kv != "bf16_fa"),
                flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
