"""Compile-only probe for the v7 plan (``docs/kernel-notes.md``): can Gluon turn 2-bit codes
stored in mma-fragment byte order into the value dot's B operand with no data movement?

One warp: probabilities ``[16, 64]`` (an mma accumulator, as the score dot leaves them) times
values ``[64 tokens, 32 channels]`` whose code bytes are stored token-minor with each run of
16 tokens in the order ``0, 1, 8, 9, 2, 3, 10, 11, ...``: one 32-bit load gives a lane the four
tokens of its ``mma.m16n8k16`` B fragment. Compiles for sm_90 with the Triton wheel's
ptxas (no GPU) and prints the SASS opcode counts, e.g.::

    python benchmarks/gluon_fragment_probe.py

What to look for: no ``SHFL``, ``STS``/``LDS`` or ``IMAD.MOV`` between the loads and the
``HMMA``s, i.e. both ``convert_layout``s are register no-ops.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

# plane 0 of four 2-bit codes -> two float16 pairs, exact (the v6d magic number, no shift)
UNPACK = "\n".join([
    "{", ".reg .b32 a, h, k;", "mov.b32 h, 0x64646464;", "mov.b32 k, 0x64006400;",
    "and.b32 a, $2, 0x03030303;", "prmt.b32 $0, a, h, 0x4140;", "prmt.b32 $1, a, h, 0x4342;",
    "sub.f16x2 $0, $0, k;", "sub.f16x2 $1, $1, k;", "}"])


@gluon.jit
def _probe(codes_ptr, p_ptr, out_ptr, ASM: gl.constexpr):
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1],
                                                  instr_shape=[16, 8])
    rows = gl.arange(0, 16, layout=gl.SliceLayout(1, mma))
    toks = gl.arange(0, 64, layout=gl.SliceLayout(0, mma))
    p = gl.load(p_ptr + rows[:, None] * 64 + toks[None, :]).to(gl.float16)
    p = gl.convert_layout(p, gl.DotOperandLayout(0, mma, 2))
    # bytes in storage order [run 4, lane pair t 4, kk 4, n-tile j 4, n-lane 8]: channel
    # n = 8j + ln, storage position 16 run + 4 t + kk (kk = 2 k_hi + k_lo)
    st: gl.constexpr = gl.BlockedLayout([4, 1, 4, 4, 1], [1, 4, 1, 1, 8], [1, 1, 1, 1, 1],
                                        [2, 1, 4, 3, 0])
    run = gl.arange(0, 4, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(
        3, gl.SliceLayout(4, st)))))
    t = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(
        3, gl.SliceLayout(4, st)))))
    kk = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(
        3, gl.SliceLayout(4, st)))))
    j = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(
        2, gl.SliceLayout(4, st)))))
    ln = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(
        2, gl.SliceLayout(3, st)))))
    pos = ((run * 16)[:, None, None, None, None] + (t * 4)[None, :, None, None, None]
           + kk[None, None, :, None, None])
    chan = (j * 8)[None, None, None, :, None] + ln[None, None, None, None, :]
    codes = gl.load(codes_ptr + chan * 64 + pos)
    v = gl.inline_asm_elementwise(ASM, "=r,=r,r", [codes], dtype=gl.float16, is_pure=True,
                                  pack=4)
    v = gl.permute(gl.reshape(v, [4, 4, 2, 2, 4, 8]), [0, 2, 1, 3, 4, 5])  # (run, k_hi, t, k_lo)
    v = gl.convert_layout(gl.reshape(v, [64, 32]), gl.DotOperandLayout(1, mma, 2))
    acc = mma_v2(p, v, gl.zeros([16, 32], gl.float32, layout=mma))
    cols = gl.arange(0, 32, layout=gl.SliceLayout(0, mma))
    gl.store(out_ptr + rows[:, None] * 32 + cols[None, :], acc)


def sass_opcodes() -> collections.Counter[str]:
    """Compile the probe for sm_90 and count its SASS opcodes."""
    aligned = [["tt.divisibility", 16]]
    src = GluonASTSource(fn=_probe, signature={"codes_ptr": "*u8", "p_ptr": "*fp32",
                                               "out_ptr": "*fp32", "ASM": "constexpr"},
                         constexprs={"ASM": UNPACK},
                         attrs={(0,): aligned, (1,): aligned, (2,): aligned})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 1})
    tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "probe.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True,
                              check=True).stdout
    ops = re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", sass, re.M)
    return collections.Counter(ops)


if __name__ == "__main__":
    counts = sass_opcodes()
    print(f"{sum(counts.values())} SASS instructions")
    for op, n in counts.most_common():
        print(f"{n:5d} {op}")
