"""Compile-only probe of the v7 plan (``docs/kernel-notes.md``): the four-page decode loop in
Gluon, one warp, 2-bit codes in mma-fragment byte order. No GPU: compiles for sm_90 with the
Triton wheel's ptxas and prints registers and the loop's SASS per iteration (4 pages, 128
tokens), to set against ``benchmarks/kernel_sass.py --bits 2 --stages 2 --maxnreg 0``
(two warps per four pages there)::

    python benchmarks/gluon_decode_probe.py

The code tiles of the next iteration come by ``cp.async`` into a second shared-memory stage
(read back with ``ldmatrix``); value scales and mins are plain loads. Not a kernel yet: one KV
head, every page full, no tail or splits, and a page
layout of its own (per head and page: key codes [32 tokens][32 bytes], value codes
[32 byte columns][32 tokens], key scales then mins [128] float16, value scales and mins
[4 planes][32 + 32] float16). Code bytes (and value scales and mins) are permuted within
runs of 16 along the dot's contraction axis to ``0, 1, 8, 9, 2, 3, 10, 11, ...``, so one
32-bit load is a lane's ``mma.m16n8k16`` fragment and both ``convert_layout`` calls to a
dot operand are register no-ops. Rows are (query head, page slot) with head ``r % 2 + 2 *
(r // 8)`` and slot ``(r % 8) // 2``: rows r and r + 8 of a lane share a page and differ in
head, so no operand register is a known zero or a duplicate (with slot ``r // 4`` ptxas
spends ~250 moves building operand quads).
"""

from __future__ import annotations

import os
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.kernel_sass import sass_report  # noqa: E402
from kivi_vllm.kernels.common import plane_asm  # noqa: E402
from kivi_vllm.kernels.decode_gluon import _ar, _key_chunk, _value_chunk  # noqa: E402


@gluon.jit
def _key_dot(s, q, ks, kt, PLANE: gl.constexpr, B: gl.constexpr):
    """``s += (q * ks) . k`` over bit plane PLANE's 32 channels (exact codes as B)."""
    a = q * gl.load(ks + 32 * PLANE)
    k = gl.inline_asm_elementwise(plane_asm(2, PLANE, False), "=r,=r,r", [kt],
                                  dtype=gl.float16, is_pure=True, pack=4)
    return mma_v2(a, _key_chunk(k, B), s)


@gluon.jit
def _value_dot(o, p16, vt, vsm, PLANE: gl.constexpr, B: gl.constexpr):
    """``o += p . (s*v + m)`` over bit plane PLANE's 32 channels."""
    v = gl.inline_asm_elementwise(plane_asm(2, PLANE, True), "=r,=r,r,r,r,r,r",
                                  [vt, gl.load(vsm + 64 * PLANE), gl.load(vsm + 64 * PLANE + 32)],
                                  dtype=gl.float16, is_pure=True, pack=4)
    return mma_v2(p16, _value_chunk(v, B), o)


@gluon.jit
def _stage(kbuf, vbuf, cache, bt_ptr, it, k_pg, k_tok, k_byte, v_pg, v_col, v_pos,
           PAGE: gl.constexpr, OFF_KC: gl.constexpr, OFF_VC: gl.constexpr):
    """Start copying iteration ``it``'s key and value code tiles into one stage."""
    kpages = gl.load(bt_ptr + it * 4 + k_pg).to(gl.int64) * PAGE
    async_copy.async_copy_global_to_shared(kbuf, cache + kpages + OFF_KC + k_tok * 32 + k_byte)
    vpages = gl.load(bt_ptr + it * 4 + v_pg).to(gl.int64) * PAGE
    async_copy.async_copy_global_to_shared(vbuf, cache + vpages + OFF_VC + v_col * 32 + v_pos)
    async_copy.commit_group()


@gluon.jit
def _v7(q_ptr, cache, bt_ptr, out_ptr, n_iter, PAGE: gl.constexpr):
    OFF_KC: gl.constexpr = 0            # [32 tok][32 B] fragment-ordered bytes
    OFF_VC: gl.constexpr = 1024         # [32 byte col][32 tok] fragment-ordered tokens
    OFF_KS: gl.constexpr = 2048         # [128 ch] fp16 key scales, then mins
    OFF_VSM: gl.constexpr = 2560        # [4 planes][s: 32 tok, m: 32 tok] fp16, fragment order
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1],
                                                  instr_shape=[16, 8])
    A: gl.constexpr = gl.DotOperandLayout(0, mma, 2)
    B: gl.constexpr = gl.DotOperandLayout(1, mma, 2)
    LK: gl.constexpr = gl.BlockedLayout([2, 1, 4, 16, 1], [1, 4, 1, 1, 8], [1, 1, 1, 1, 1],
                                        [2, 1, 4, 3, 0])
    LV: gl.constexpr = gl.BlockedLayout([4, 2, 1, 4, 4, 1], [1, 1, 4, 1, 1, 8],
                                        [1, 1, 1, 1, 1, 1], [3, 2, 5, 4, 1, 0])
    # query rows: row r -> head r % 2 + 2 (r // 8), page slot (r % 8) // 2 (module doc);
    # A operand chunks [16, 32] per plane
    qr = gl.arange(0, 16, layout=gl.SliceLayout(1, A))
    qc = gl.arange(0, 32, layout=gl.SliceLayout(0, A))
    q_rows = q_ptr + ((qr % 2) + 2 * (qr // 8))[:, None] * 128 + qc[None, :]
    q0 = gl.load(q_rows + 0)
    q1 = gl.load(q_rows + 32)
    q2 = gl.load(q_rows + 64)
    q3 = gl.load(q_rows + 96)
    rows = gl.arange(0, 16, layout=gl.SliceLayout(1, mma))
    cols = gl.arange(0, 128, layout=gl.SliceLayout(0, mma))
    slot = (rows % 8) // 2  # each row's page within the iteration
    same_page = slot[:, None] == (cols // 32)[None, :]
    bk = gl.arange(0, 32, layout=gl.SliceLayout(1, B))   # channels of a chunk (B rows)
    bn = gl.arange(0, 8, layout=gl.SliceLayout(0, B))    # pages (B columns, 4 of 8 used)
    km_ok = (bn < 4)[None, :]
    bcol = gl.arange(0, 8, layout=gl.SliceLayout(0, mma))
    # key byte tile offsets within the 4 pages: [r, t, kk, j, ln]
    k_r = _ar(2, LK, 0, 5)
    k_t = _ar(4, LK, 1, 5)
    k_kk = _ar(4, LK, 2, 5)
    k_j = _ar(16, LK, 3, 5)
    k_ln = _ar(8, LK, 4, 5)
    k_byte = ((k_r * 16)[:, None, None, None, None] + (k_t * 4)[None, :, None, None, None]
              + k_kk[None, None, :, None, None])
    k_tok = ((k_j % 4) * 8)[None, None, None, :, None] + k_ln[None, None, None, None, :]
    k_pg = (k_j // 4)[None, None, None, :, None]
    # value offsets: [pg, run, t, kk, j, ln]
    v_pg = _ar(4, LV, 0, 6)
    v_run = _ar(2, LV, 1, 6)
    v_t = _ar(4, LV, 2, 6)
    v_kk = _ar(4, LV, 3, 6)
    v_j = _ar(4, LV, 4, 6)
    v_ln = _ar(8, LV, 5, 6)
    v_pos = ((v_run * 16)[None, :, None, None, None, None]
             + (v_t * 4)[None, None, :, None, None, None] + v_kk[None, None, None, :, None, None])
    v_col = (v_j * 8)[None, None, None, None, :, None] + v_ln[None, None, None, None, None, :]
    v_pg5 = v_pg[:, None, None, None, None, None]

    m_i = gl.full([16], -1e30, gl.float32, layout=gl.SliceLayout(1, mma))
    l_i = gl.zeros([16], gl.float32, layout=gl.SliceLayout(1, mma))
    o0 = gl.zeros([16, 32], gl.float32, layout=mma)
    o1 = gl.zeros([16, 32], gl.float32, layout=mma)
    o2 = gl.zeros([16, 32], gl.float32, layout=mma)
    o3 = gl.zeros([16, 32], gl.float32, layout=mma)
    kbuf = gl.allocate_shared_memory(gl.uint8, [2, 2, 4, 4, 16, 8],
                                     gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 4, 3, 0]))
    vbuf = gl.allocate_shared_memory(gl.uint8, [2, 4, 2, 4, 4, 4, 8],
                                     gl.SwizzledSharedLayout(1, 1, 1, [3, 2, 5, 4, 1, 0]))
    # two stages of code tiles by cp.async; each lane copies the words it reads back
    _stage(kbuf.index(0), vbuf.index(0), cache, bt_ptr, 0, k_pg, k_tok, k_byte, v_pg5, v_col,
           v_pos, PAGE, OFF_KC, OFF_VC)
    for it in range(n_iter):
        _stage(kbuf.index((it + 1) % 2), vbuf.index((it + 1) % 2), cache, bt_ptr,
               gl.minimum(it + 1, n_iter - 1), k_pg, k_tok, k_byte, v_pg5, v_col, v_pos, PAGE,
               OFF_KC, OFF_VC)
        async_copy.wait_group(1)
        kt = kbuf.index(it % 2).load(LK)
        # per-row key scales/mins of the row's page, channels of the A operand chunks
        row_page = gl.load(bt_ptr + it * 4 + (qr % 8) // 2).to(gl.int64) * PAGE
        ks = (cache + row_page + OFF_KS)[:, None].to(gl.pointer_type(gl.float16)) + qc[None, :]
        s = gl.zeros([16, 128], gl.float32, layout=mma)
        kmp = gl.load(bt_ptr + it * 4 + gl.minimum(bn, 3)).to(gl.int64) * PAGE
        km_b = ((cache + kmp + OFF_KS + 256)[None, :].to(gl.pointer_type(gl.float16))
                + bk[:, None])
        s = _key_dot(s, q0, ks, kt, 0, B)
        s = _key_dot(s, q1, ks, kt, 1, B)
        s = _key_dot(s, q2, ks, kt, 2, B)
        s = _key_dot(s, q3, ks, kt, 3, B)
        bsc = gl.zeros([16, 8], gl.float32, layout=mma)
        bsc = mma_v2(q0, gl.load(km_b + 0, mask=km_ok, other=0.0), bsc)
        bsc = mma_v2(q1, gl.load(km_b + 32, mask=km_ok, other=0.0), bsc)
        bsc = mma_v2(q2, gl.load(km_b + 64, mask=km_ok, other=0.0), bsc)
        bsc = mma_v2(q3, gl.load(km_b + 96, mask=km_ok, other=0.0), bsc)
        bias = gl.sum(gl.where(bcol[None, :] == slot[:, None], bsc, 0.0), axis=1)
        s = gl.where(same_page, s + bias[:, None], float("-inf"))
        m_cur = gl.max(s, axis=1)
        if gl.max(m_cur - m_i, axis=0) > 8.0:
            m_new = gl.maximum(m_i, m_cur)
            alpha = gl.exp2(m_i - m_new)
            l_i = l_i * alpha
            o0 = o0 * alpha[:, None]
            o1 = o1 * alpha[:, None]
            o2 = o2 * alpha[:, None]
            o3 = o3 * alpha[:, None]
            m_i = m_new
        pr = gl.exp2(s - m_i[:, None])
        l_i = l_i + gl.sum(pr, axis=1)
        p16 = gl.convert_layout(pr.to(gl.float16), A)
        vpages = gl.load(bt_ptr + it * 4 + v_pg5).to(gl.int64) * PAGE
        vt = vbuf.index(it % 2).load(LV)
        vsm = (cache + vpages + OFF_VSM).to(gl.pointer_type(gl.float16)) + v_pos
        o0 = _value_dot(o0, p16, vt, vsm, 0, B)
        o1 = _value_dot(o1, p16, vt, vsm, 1, B)
        o2 = _value_dot(o2, p16, vt, vsm, 2, B)
        o3 = _value_dot(o3, p16, vt, vsm, 3, B)
    oc = gl.arange(0, 32, layout=gl.SliceLayout(0, mma))
    inv = 1.0 / l_i
    optr = out_ptr + rows[:, None] * 128 + oc[None, :]
    gl.store(optr, o0 * inv[:, None])
    gl.store(optr + 32, o1 * inv[:, None])
    gl.store(optr + 64, o2 * inv[:, None])
    gl.store(optr + 96, o3 * inv[:, None])


def compile_probe():
    """The probe compiled for sm_90 (one warp)."""
    signature = {"q_ptr": "*fp16", "cache": "*u8", "bt_ptr": "*i32", "out_ptr": "*fp32",
                 "n_iter": "i32", "PAGE": "constexpr"}
    src = GluonASTSource(fn=_v7, signature=signature, constexprs={(5,): 4096},
                         attrs={(i,): [["tt.divisibility", 16]] for i in range(4)})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 1})


if __name__ == "__main__":
    sass_report(compile_probe().asm["cubin"])
