"""Compile the decode kernel for sm_90 without a GPU; print registers and per-loop SASS.

Uses the Triton wheel's own ptxas/cuobjdump, with the specializations a real launch
makes (16-byte-aligned pointers, strides divisible by 16), so register counts match
the GPU's within a few. For each loop: instructions per warp per iteration, barriers,
loads and the opcode histogram, e.g.::

    python benchmarks/kernel_sass.py --bits 2 --warps 2 --stages 3
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

POINTERS = {
    "query": "*bf16", "key": "*bf16", "value": "*bf16", "cache": "*u8", "tail": "*bf16",
    "block_table": "*i32", "seq_lens": "*i32", "query_start_loc": "*i32", "tail_slots": "*i32",
    "valid_from": "*i32", "tile_req": "*i32", "tile_tok": "*i32", "mid_o": "*fp32",
    "mid_lse": "*fp32",
}
SCALARS = {"sm_scale": "fp32", "tok_base": "i32", "S": "i32", "sinks": "i32"}
# strides that are multiples of 16 in a launch (head_dim 128), as Triton specializes them
# unless a kernel lists them in do_not_specialize
ALIGNED_STRIDES = ("stride_bt", "stride_tail_kv", "stride_tail_slot", "stride_tail_pos",
                   "stride_tail_h", "stride_qt", "stride_qh", "stride_kt", "stride_kh",
                   "stride_vt", "stride_vh", "stride_ot", "stride_oh", "stride_os")


def _launch_like(fn, consts: dict) -> dict:
    """Signature, alignment attributes and constexprs of kernel ``fn`` as a real launch
    specializes them."""
    names = fn.arg_names
    signature = {n: POINTERS.get(n) or SCALARS.get(n) or
                 ("i32" if n.startswith("stride_") else "constexpr") for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
             if (n in POINTERS or n in ALIGNED_STRIDES) and n not in fn.do_not_specialize}
    return {"signature": signature, "attrs": attrs,
            "constexprs": {(names.index(k),): v for k, v in consts.items()}}


def compile_decode(bits: int, group: int, head_dim: int, kv_heads: int, qpk: int,
                   residual: int, warps: int, stages: int, maxnreg: int | None,
                   fp8_scales: bool = False):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kivi_vllm.kernels import attention
    from kivi_vllm.kernels.common import format_constants
    from kivi_vllm.page_format import PageFormat

    fmt = PageFormat(bits, group, head_dim, kv_heads, fp8_scales=fp8_scales)
    width, nch = attention.chunking(fmt)
    fn = attention._kivi_attend_context
    consts = dict(R=residual, BLOCK_R=triton.next_power_of_2(residual), QPK=qpk, BLOCK_Q=1,
                  **attention.tile_shape(qpk, group, 1, True), DECODE=True,
                  W=width, NCH=nch, USE_ASM=True, SINGLE=False, PAGES=True, WRITE_LSE=True,
                  **format_constants(fmt))
    src = ASTSource(fn=fn, **_launch_like(fn, consts))
    options = dict(num_warps=warps, num_stages=stages)
    if maxnreg:
        options["maxnreg"] = maxnreg
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def compile_gluon_decode(kv_heads: int, residual: int, **flags: bool):
    """The Gluon page loop (``kernels/decode_gluon.py``, 2-bit, group 32, d=128), one warp;
    ``flags`` override its constexprs (TAIL, SELF, SINGLE, WRITE_LSE)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from kivi_vllm.kernels import decode_gluon
    from kivi_vllm.kernels.common import format_constants
    from kivi_vllm.page_format import PageFormat

    fn = decode_gluon._kivi_decode_pages
    consts = {k: v for k, v in format_constants(PageFormat(2, 32, 128, kv_heads)).items()
              if k in fn.arg_names}
    consts.update(R=residual, BLOCK_R=max(16, triton.next_power_of_2(residual)), TAIL=True,
                  SELF=True, SINGLE=True, WRITE_LSE=False)
    consts.update(flags)
    src = GluonASTSource(fn=fn, **_launch_like(fn, consts))
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 1})


def dump_gluon_variants(folder: str) -> None:
    """Write v7's SASS for every combination of its launch flags (TAIL, SELF, SINGLE,
    WRITE_LSE) and residuals 32 and 96 into ``folder``, one file each: two trees' folders
    diff to nothing when a source change leaves the machine code as it was."""
    os.makedirs(folder, exist_ok=True)
    names = ("TAIL", "SELF", "SINGLE", "WRITE_LSE")
    for values in itertools.product((True, False), repeat=len(names)):
        for residual in (32, 96):
            cubin = compile_gluon_decode(8, residual, **dict(zip(names, values, strict=True)))
            tag = "-".join(f"{n}{int(v)}" for n, v in zip(names, values, strict=True))
            with open(os.path.join(folder, f"{tag}-R{residual}.sass"), "w") as f:
                f.write(_sass(cubin.asm["cubin"], "-sass"))


def _sass(cubin: bytes, flag: str) -> str:
    """``cuobjdump FLAG`` (the Triton wheel's) of a cubin."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, flag, f.name], capture_output=True, text=True).stdout


def sass_loops(cubin: bytes) -> tuple[str, list[tuple[int, int, collections.Counter]],
                                       collections.Counter]:
    """(register usage line, [(start, end, opcode histogram of one iteration)] per loop,
    opcode histogram of the instructions outside every loop)."""
    usage, sass = _sass(cubin, "-res-usage"), _sass(cubin, "-sass")
    ins = []
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)(.*);", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(3), m.group(4)))
    loops = []
    for addr, op, rest in ins:
        target = re.search(r"0x([0-9a-f]+)", rest) if op.startswith("BRA") else None
        if target and int(target.group(1), 16) < addr:  # a backward branch closes a loop
            lo = int(target.group(1), 16)
            loops.append((lo, addr, collections.Counter(o for a, o, _ in ins if lo <= a <= addr)))
    outside = collections.Counter(o for a, o, _ in ins
                                  if not any(lo <= a <= hi for lo, hi, _ in loops))
    return usage.strip().splitlines()[-1].strip(), loops, outside


def sass_report(cubin: bytes) -> None:
    usage, loops, outside = sass_loops(cubin)
    print(usage)
    top = int(os.environ.get("KIVI_SASS_TOP", 24))
    for lo, hi, body in loops:
        print(f"loop {lo:#x}-{hi:#x}: {sum(body.values())} instructions per warp "
              "per iteration")
        for name, count in body.most_common(top):
            print(f"  {count:5d} {name}")
    print(f"outside the loops: {sum(outside.values())} instructions")
    for name, count in outside.most_common(top):
        print(f"  {count:5d} {name}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--group", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--qpk", type=int, default=4, help="query heads per KV head")
    p.add_argument("--residual", type=int, default=32)
    p.add_argument("--warps", type=int, default=2)
    p.add_argument("--stages", type=int, default=3)
    p.add_argument("--maxnreg", type=int, default=128, help="0: no register cap")
    p.add_argument("--fp8-scales", action="store_true", help="the kivi.fp8_scales variant")
    p.add_argument("--gluon", action="store_true",
                   help="the Gluon page loop (decode v7) instead of the Triton kernel")
    p.add_argument("--dump", metavar="DIR",
                   help="with --gluon: write the SASS of every launch-flag combination to DIR")
    p.add_argument("--json", action="store_true",
                   help="print the register usage and the opcode counts of each loop and "
                        "outside the loops as JSON")
    a = p.parse_args()
    if a.gluon and a.dump:
        dump_gluon_variants(a.dump)
        return
    if a.gluon:
        cubin = compile_gluon_decode(a.kv_heads, a.residual).asm["cubin"]
        if a.json:
            usage, loops, outside = sass_loops(cubin)
            print(json.dumps({"usage": usage, "loops": [dict(body) for _, _, body in loops],
                              "outside": dict(outside)}))
        else:
            sass_report(cubin)
        return
    kernel = compile_decode(a.bits, a.group, a.head_dim, a.kv_heads, a.qpk, a.residual,
                            a.warps, a.stages, a.maxnreg or None, a.fp8_scales)
    sass_report(kernel.asm["cubin"])


if __name__ == "__main__":
    main()
