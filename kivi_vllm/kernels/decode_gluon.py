"""Decode v7: the page loop of 2-bit decode attention in Gluon (one warp per program).

Serves the shape of Llama-style decode that the throughput goals are measured on: 2-bit
keys and values, group 32, head_dim 128, 4 query heads per KV head, float16 scales. Each
program (one warp) reads four pages of one KV head per loop iteration, like the Triton
kernel's slotted loop (``attention._attend_slots``): 16 dot rows = 4 query heads x 4 page
slots, scores masked block-diagonally, the key scale folded into the query rows and the
key min added as ``q . m`` (one extra n8 tile, a constant per row). Unlike Triton, Gluon lets
the layouts be chosen so that no operand moves between lanes:

- A lane's ``mma.m16n8k16`` B fragment is 4 bytes (contraction indices ``2t, 2t+1, 2t+8,
  2t+9`` of a run of 16) and the natural page order stores bytes ``4t..4t+3`` together. The
  kernel's contraction index ``k`` therefore stands for storage position ``frag(k)``
  (:func:`_frag`): the query rows, key scales and key mins are loaded in that channel order
  (vector loads of 4 elements, permuted in registers), and score column ``n`` of a page
  holds token ``frag(n)`` (the key tile rows are loaded in that order). The score
  accumulator then is the value dot's A operand in registers; the value codes are read in
  storage order, the value scales and mins in that token order.
- The next iteration's code tiles and all its scales and mins come by ``cp.async`` into a
  second shared-memory stage while this one is computed (the block ids of the stage after
  that are loaded an iteration ahead): the loop's only global loads are those four ids.
- Codes enter both dots as float16 subnormals (``plane_asm(subnormal=True)``: a mask and
  two byte permutes per four codes, no offset to subtract). Plane ``p`` reads ``code *
  2**(2p - 24)``: the query planes carry ``2**(3 - 2p)`` so that every score product carries
  ``2**-21`` (undone in the exponent), and each value plane has its own accumulator.
- Values are ``s * code + m`` per token: the scales multiply the probabilities (the
  A operand, one float16 product per pair), and ``p . m`` of the four planes comes from
  one more n8 tile whose column 4 is ones (the row sums).
- The 4 page slots of a query head are merged by log-sum-exp at the end, all heads by
  one reduction over the slot axis.

The last split also reads the full-precision tail ring and the step's own token (``TAIL``;
else the Triton kernel does, as one more split). A program writes its split's output and
log2-domain LSE for ``attention._kivi_reduce_splits``, or with one split the final output
(``SINGLE``), as ``attention._kivi_attend_context`` does. Gluon does not run under
``TRITON_INTERPRET``: on the CPU the tests compile this kernel for sm_90 and execute its
source through ``tests/gluon_shim.py``; on the GPU they run it.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2

from kivi_vllm.kernels.common import plane_asm, read_strides
from kivi_vllm.page_format import PageFormat

# ptxas register cap (0: none; the loop takes 255 registers, so 8 programs fit an SM)
MAX_REGISTERS = int(os.environ.get("KIVI_GLUON_MAX_REGISTERS", 0))

QPK = 4  # query heads per KV head


@functools.cache
def _is_hopper(index: int | None) -> bool:
    return torch.cuda.get_device_capability(index) == (9, 0)


def gluon_supports(fmt: PageFormat, qpk: int, device: torch.device | None = None) -> bool:
    """Whether the Gluon page loop serves this format and GQA ratio, and ``device`` where it
    is a CUDA device: it is built and measured for Hopper (sm_90) only."""
    on_device = device is None or device.type != "cuda" or _is_hopper(device.index)
    return (fmt.k_bits == fmt.v_bits == 2 and fmt.group_size == 32 and fmt.head_dim == 128
            and not fmt.fp8_scales and qpk == QPK and on_device)


@gluon.constexpr_function
def _only(layout, keep, ndim):
    """Slice every dim of ``layout`` but ``keep`` (for a 1-D arange along ``keep``)."""
    for d in reversed(range(ndim)):
        if d != keep:
            layout = gl.SliceLayout(d, layout)
    return layout


@gluon.jit
def _ar(n: gl.constexpr, layout: gl.constexpr, keep: gl.constexpr, ndim: gl.constexpr):
    return gl.arange(0, n, layout=_only(layout, keep, ndim))


@gluon.jit
def _frag(x):
    """Storage position of contraction index ``x``: within each run of 16, the mma
    fragment order ``0, 1, 8, 9, 2, 3, 10, 11, ...`` maps to bytes ``0, 1, 2, 3, ...``."""
    return (x // 16) * 16 + ((x % 8) // 2) * 4 + ((x % 16) // 8) * 2 + x % 2


@gluon.jit
def _key_chunk(kt, B: gl.constexpr):
    """fp16 [2 run, 4 t, 4 byte, 16 j, 8 ln] (storage order) -> B operand [32 ch, 128 tok]."""
    kt = gl.permute(gl.reshape(kt, [2, 4, 2, 2, 16, 8]), [0, 2, 1, 3, 4, 5])
    return gl.convert_layout(gl.reshape(kt, [32, 128]), B)


@gluon.jit
def _value_chunk(vt, B: gl.constexpr):
    """fp16 [4 pg, 2 run, 4 t, 4 byte, 4 j, 8 ln] -> B operand [128 tok, 32 ch]."""
    vt = gl.permute(gl.reshape(vt, [4, 2, 4, 2, 2, 4, 8]), [0, 1, 3, 2, 4, 5, 6])
    return gl.convert_layout(gl.reshape(vt, [128, 32]), B)


@gluon.jit
def _frag_a(rows, LA: gl.constexpr, A: gl.constexpr):
    """[16] row pointers -> A operand [16, 32]: column ``k`` of a row reads element
    ``frag(k)`` (4 contiguous elements per lane and run: one vector load)."""
    run = _ar(2, LA, 1, 4)
    t = _ar(4, LA, 2, 4)
    e = _ar(4, LA, 3, 4)
    off = (run * 16)[None, :, None, None] + (t * 4)[None, None, :, None] + e[None, None, None, :]
    x = gl.load(rows[:, None, None, None] + off)
    x = gl.permute(gl.reshape(x, [16, 2, 4, 2, 2]), [0, 1, 3, 2, 4])
    return gl.convert_layout(gl.reshape(x, [16, 32]), A)


@gluon.jit
def _codes(x, PLANE: gl.constexpr):
    """Bit plane PLANE of code bytes as float16 subnormals ``code * 2**(2 PLANE - 24)``."""
    return gl.inline_asm_elementwise(plane_asm(2, PLANE, False, True), "=r,=r,r", [x],
                                     dtype=gl.float16, is_pure=True, pack=4)


@gluon.jit
def _key_dot(s, q, ks, kt, PLANE: gl.constexpr, B: gl.constexpr):
    """``s += (q * ks) . k * 2**-21`` over bit plane PLANE's 32 channels (``ks``: each row's
    key scales, an A operand): the codes are subnormals ``code * 2**(2 PLANE - 24)`` and
    ``q`` holds ``2**(3 - 2 PLANE)``."""
    return mma_v2(q * ks, _key_chunk(_codes(kt, PLANE), B), s)


@gluon.jit
def _slot_rows(kq, PR: gl.constexpr, A: gl.constexpr):
    """A operand [16, 32] from one plane's staged key scales ``kq`` [4 slot, 2 run,
    4 t, 4 e]: row ``r`` reads slot ``(r % 8) // 2``, column ``k`` element ``frag(k)``. The
    load leaves row bits 0 and 3 to lane and register replicas (``PR``: [row // 8, slot,
    row % 2, run, t, e]), so each lane holds what ``_frag_a`` would load."""
    x = kq.load(gl.SliceLayout(0, gl.SliceLayout(2, PR)))
    x = gl.expand_dims(gl.expand_dims(x, 0), 2)
    x, _ = gl.broadcast(x, gl.zeros([2, 4, 2, 2, 4, 4], gl.float16, layout=PR))
    x = gl.permute(gl.reshape(x, [16, 2, 4, 2, 2]), [0, 1, 3, 2, 4])
    return gl.convert_layout(gl.reshape(x, [16, 32]), A)


@gluon.jit
def _slot_cols(kq, PC: gl.constexpr, B: gl.constexpr):
    """B operand [32, 8] from one plane's staged key mins ``kq`` [4 slot, 2 run, 4 t, 4 e]:
    column ``n`` is slot ``n % 4`` (row ``k`` element ``frag(k)``; ``PC``: [n // 4, slot,
    run, t, e], the high column bit a lane replica). Columns 4-7 repeat 0-3: the bias
    reads only the row's own slot."""
    x = kq.load(gl.SliceLayout(0, PC))
    x, _ = gl.broadcast(gl.expand_dims(x, 0), gl.zeros([2, 4, 2, 4, 4], gl.float16, layout=PC))
    x = gl.permute(gl.reshape(x, [8, 2, 4, 4]), [1, 2, 3, 0])
    x = gl.permute(gl.reshape(x, [2, 4, 2, 2, 8]), [0, 2, 1, 3, 4])
    return gl.convert_layout(gl.reshape(x, [32, 8]), B)


@gluon.jit
def _value_dot(o, p16, vt, sbuf, stage, PLANE: gl.constexpr, LSR: gl.constexpr,
               mma: gl.constexpr, A: gl.constexpr, B: gl.constexpr):
    """``o += (p * s) . code * 2**(2 PLANE - 24)`` over bit plane PLANE's 32 channels (=
    value group PLANE): the per-token scales (from ``stage`` of their shared-memory buffer)
    are folded into the probabilities, the codes enter as subnormals."""
    x = sbuf[PLANE].index(stage).load(LSR)  # [pg, run, t, 4 tokens]
    x = gl.permute(gl.reshape(x, [4, 2, 4, 2, 2]), [0, 1, 3, 2, 4])
    vs = gl.convert_layout(gl.reshape(x, [128]), gl.SliceLayout(0, mma))
    a = gl.convert_layout(p16 * vs[None, :], A)
    return mma_v2(a, _value_chunk(_codes(vt, PLANE), B), o)


@gluon.jit
def _mins_and_ones(mbuf, stage, LMR: gl.constexpr, B: gl.constexpr):
    """B operand [128 tokens, 8]: columns 0-3 the value mins of planes 0-3, column 4 ones
    (the row sums), from ``stage`` of the mins' shared-memory buffer."""
    x = mbuf.index(stage).load(LMR)  # [col, pg, run, t, 4 tokens]
    x = gl.permute(gl.reshape(x, [8, 4, 2, 4, 2, 2]), [0, 1, 2, 4, 3, 5])
    return gl.convert_layout(gl.permute(gl.reshape(x, [8, 128]), [1, 0]), B)


@gluon.jit
def _stage_ids(bt_row, p0, p_last):
    """Block ids of pages ``p0 .. p0 + 3``, each clamped to ``[0, p_last]``."""
    return (gl.load(bt_row + gl.maximum(gl.minimum(p0, p_last), 0)),
            gl.load(bt_row + gl.maximum(gl.minimum(p0 + 1, p_last), 0)),
            gl.load(bt_row + gl.maximum(gl.minimum(p0 + 2, p_last), 0)),
            gl.load(bt_row + gl.maximum(gl.minimum(p0 + 3, p_last), 0)))


@gluon.jit
def _block_of(pg, ids):
    """Block id (int64) of the stage's page ``pg`` from ``ids``, its four (loaded an
    iteration earlier)."""
    x = gl.where(pg == 0, ids[0], gl.where(pg == 1, ids[1], gl.where(pg == 2, ids[2], ids[3])))
    return x.to(gl.int64)


@gluon.jit
def _stage(kbuf, vbuf, sbuf, mbuf, qbuf, stage, kc, vc, vs, ks, ids, k_pg, k_off, v_pg, v_off,
           s_pg, s_off, m_pg, m_off, q_pg, q_off, PAGE_BYTES: gl.constexpr):
    """Start copying four pages (block ids ``ids``, from ``_stage_ids``) into one
    shared-memory stage: the key and value code tiles (as views with t and byte merged),
    the value scales and mins, and the key scales and mins (``kc``, ``vc``, ``vs``, ``ks``:
    the head's sections in page 0)."""
    kbuf = kbuf._reinterpret(gl.uint8, [2, 16, 16, 8],
                             gl.SwizzledSharedLayout(1, 1, 1, [1, 3, 2, 0]))
    vbuf = vbuf._reinterpret(gl.uint8, [4, 2, 16, 4, 8],
                             gl.SwizzledSharedLayout(1, 1, 1, [2, 4, 3, 1, 0]))
    kpages = _block_of(k_pg, ids) * PAGE_BYTES
    async_copy.async_copy_global_to_shared(kbuf, kc + kpages + k_off)
    vpages = _block_of(v_pg, ids) * PAGE_BYTES
    async_copy.async_copy_global_to_shared(vbuf, vc + vpages + v_off)
    sp = vs + _block_of(s_pg, ids) * (PAGE_BYTES // 2)
    for i in gl.static_range(4):  # the scales of planes 0-3
        async_copy.async_copy_global_to_shared(sbuf[i].index(stage), sp + s_off[i])
    mp = vs + _block_of(m_pg, ids) * (PAGE_BYTES // 2)
    async_copy.async_copy_global_to_shared(mbuf.index(stage).slice(0, 4), mp + m_off)
    qp = ks + _block_of(q_pg, ids) * (PAGE_BYTES // 2)
    async_copy.async_copy_global_to_shared(qbuf.index(stage), qp + q_off)
    async_copy.commit_group()


@gluon.jit
def _tail_dot(s, q, ring, rows, ok, ch, PLANE: gl.constexpr):
    """``s += q . k`` over plane PLANE's channels ``ch`` (fragment order) for the tail keys
    at ring rows ``rows`` (B operand columns; 0 where not ``ok``)."""
    k = gl.load(ring + rows[None, :] + (32 * PLANE + ch)[:, None], mask=ok[None, :], other=0.0)
    return mma_v2(q, k.to(gl.float16), s)


@gluon.jit
def _tail_values(o, p16, p_self, ring_v, rows, ok, ch, self_v, oc, PLANE: gl.constexpr,
                 SELF: gl.constexpr):
    """``o += p . v`` over the tail rows (B operand rows ``rows``, channels ``ch`` of plane
    PLANE), plus the step's own value weighted by ``p_self``."""
    v = gl.load(ring_v + rows[:, None] + (32 * PLANE + ch)[None, :], mask=ok[:, None],
                other=0.0)
    o = mma_v2(p16, v.to(gl.float16), o)
    if SELF:
        o += p_self[:, None] * gl.load(self_v + 32 * PLANE + oc).to(gl.float32)[None, :]
    return o


@gluon.jit
def _tail_rows(r, pinned, tstart, sinks, R: gl.constexpr):
    """Tail row ``r``'s context position (sink positions ``[0, pinned)``, then ``tstart``
    on) and its ring row (``store.ring_row``, as int64)."""
    pos = gl.where(r < pinned, r, tstart + r - pinned)
    return pos, gl.where(pos < sinks, pos, sinks + (pos - sinks) % (R - sinks)).to(gl.int64)


@gluon.jit
def _attend_tail(m_i, l_i, o0, o1, o2, o3, q0, q1, q2, q3, key, value, tail, tail_slots,
                 req, kvh, ctx, tstart, pinned, sinks, stride_kt, stride_kh, stride_vt,
                 stride_vh, stride_tail_kv, stride_tail_slot, stride_tail_pos, stride_tail_h,
                 R: gl.constexpr, BLOCK_R: gl.constexpr, SELF: gl.constexpr,
                 mma: gl.constexpr, A: gl.constexpr, B: gl.constexpr):
    """Exact online-softmax update with the full-precision tail ring (sink positions
    ``[0, pinned)``, then ``[tstart, ctx)``) and, with ``SELF``, the step's own token; the
    rows of page slot 0 hold each query head once, the other slots take no part."""
    ring = (tail + gl.load(tail_slots + req).to(gl.int64) * stride_tail_slot
            + kvh * stride_tail_h)
    q0 = q0 * 0.125  # the query planes without the page loop's 2**(3 - 2p)
    q1 = q1 * 0.5
    q2 = q2 * 2.0
    q3 = q3 * 8.0
    # key dot: tail rows as B columns, channels in fragment order (as the query's)
    pos_k, row_k = _tail_rows(gl.arange(0, BLOCK_R, layout=gl.SliceLayout(0, B)), pinned,
                              tstart, sinks, R)
    row_k = row_k * stride_tail_pos
    ch_k = _frag(gl.arange(0, 32, layout=gl.SliceLayout(1, B)))
    st = gl.zeros([16, BLOCK_R], gl.float32, layout=mma)
    st = _tail_dot(st, q0, ring, row_k, pos_k < ctx, ch_k, 0)
    st = _tail_dot(st, q1, ring, row_k, pos_k < ctx, ch_k, 1)
    st = _tail_dot(st, q2, ring, row_k, pos_k < ctx, ch_k, 2)
    st = _tail_dot(st, q3, ring, row_k, pos_k < ctx, ch_k, 3)
    rows = gl.arange(0, 16, layout=gl.SliceLayout(1, mma))
    first = (rows % 8) // 2 == 0
    pos_c, _ = _tail_rows(gl.arange(0, BLOCK_R, layout=gl.SliceLayout(0, mma)), pinned, tstart,
                          sinks, R)
    st = gl.where(first[:, None] & (pos_c < ctx)[None, :], st, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(st, axis=1))
    oc = gl.arange(0, 32, layout=gl.SliceLayout(0, mma))
    self_v = value + req.to(gl.int64) * stride_vt + kvh * stride_vh
    s_self = gl.full([16], float("-inf"), gl.float32, layout=gl.SliceLayout(1, mma))
    if SELF:  # the step's own key as column 0 of an n8 tile
        bn = gl.arange(0, 8, layout=gl.SliceLayout(0, B))
        self_k = key + req.to(gl.int64) * stride_kt + kvh * stride_kh
        s8 = gl.zeros([16, 8], gl.float32, layout=mma)
        s8 = _tail_dot(s8, q0, self_k, bn * 0, bn == 0, ch_k, 0)
        s8 = _tail_dot(s8, q1, self_k, bn * 0, bn == 0, ch_k, 1)
        s8 = _tail_dot(s8, q2, self_k, bn * 0, bn == 0, ch_k, 2)
        s8 = _tail_dot(s8, q3, self_k, bn * 0, bn == 0, ch_k, 3)
        bcol = gl.arange(0, 8, layout=gl.SliceLayout(0, mma))
        s_self = gl.where(first, gl.sum(gl.where(bcol[None, :] == 0, s8, 0.0), axis=1),
                          float("-inf"))
        m_new = gl.maximum(m_new, s_self)
    alpha = gl.exp2(m_i - m_new)  # m_i starts finite (-1e30): never inf - inf
    pt = gl.exp2(st - m_new[:, None])
    p_self = gl.exp2(s_self - m_new)
    l_i = l_i * alpha + gl.sum(pt, axis=1) + p_self
    p16 = gl.convert_layout(pt.to(gl.float16), A)
    # value dot: tail rows as B rows, channels in storage order
    pos_v, row_v = _tail_rows(gl.arange(0, BLOCK_R, layout=gl.SliceLayout(1, B)), pinned,
                              tstart, sinks, R)
    row_v = row_v * stride_tail_pos
    ch_v = gl.arange(0, 32, layout=gl.SliceLayout(0, B))
    ring_v = ring + stride_tail_kv
    o0 = _tail_values(o0 * alpha[:, None], p16, p_self, ring_v, row_v, pos_v < ctx, ch_v,
                      self_v, oc, 0, SELF)
    o1 = _tail_values(o1 * alpha[:, None], p16, p_self, ring_v, row_v, pos_v < ctx, ch_v,
                      self_v, oc, 1, SELF)
    o2 = _tail_values(o2 * alpha[:, None], p16, p_self, ring_v, row_v, pos_v < ctx, ch_v,
                      self_v, oc, 2, SELF)
    o3 = _tail_values(o3 * alpha[:, None], p16, p_self, ring_v, row_v, pos_v < ctx, ch_v,
                      self_v, oc, 3, SELF)
    return m_new, l_i, o0, o1, o2, o3


@gluon.jit
def _merge_by_slot_sum(out, lse_out, o0, o1, o2, o3, m_i, l_i, lse_r, stride_oh, stride_lh,
                       SINGLE: gl.constexpr, WRITE_LSE: gl.constexpr, mma: gl.constexpr):
    """Merge the 4 slot rows of each query head by log-sum-exp (``lse_r``: each row's) and
    store the heads at ``out`` (the KV head's first query head; their LSE at ``lse_out``).
    The rows are viewed as [row // 8, slot, row % 2] (head 2 (row // 8) + row % 2): one
    reduction over the slot axis serves all 4 heads."""
    rows = gl.arange(0, 16, layout=gl.SliceLayout(1, mma))
    oc = gl.arange(0, 32, layout=gl.SliceLayout(0, mma))
    lse3 = gl.reshape(lse_r, [2, 4, 2])
    mx = gl.max(lse3, axis=1)
    mx_safe = gl.where(mx == float("-inf"), 0.0, mx)
    total = gl.sum(gl.exp2(lse3 - gl.expand_dims(mx_safe, 1)), axis=1)
    total_safe = gl.where(total > 0.0, total, 1.0)
    # o_r / l_r weighted by exp2(lse_r - mx) / total = exp2(m_r - mx) / total
    f = gl.where(gl.reshape(l_i, [2, 4, 2]) > 0.0,
                 gl.exp2(gl.reshape(m_i, [2, 4, 2]) - gl.expand_dims(mx_safe, 1)), 0.0)
    f = gl.convert_layout(gl.reshape(f / gl.expand_dims(total_safe, 1), [16]),
                          gl.SliceLayout(1, mma))[:, None]
    # each head's output offsets, in the layout of the slot sums (the 4 slots' are equal)
    head_r = (rows % 2) + 2 * (rows // 8)
    o_off = _slot_sum(head_r[:, None] * stride_oh + oc[None, :]) // 4
    dtype: gl.constexpr = out.dtype.element_ty
    gl.store(out + o_off, _slot_sum(o0 * f).to(dtype))
    gl.store(out + 32 + o_off, _slot_sum(o1 * f).to(dtype))
    gl.store(out + 64 + o_off, _slot_sum(o2 * f).to(dtype))
    gl.store(out + 96 + o_off, _slot_sum(o3 * f).to(dtype))
    lse = gl.where(total > 0.0, mx_safe + gl.log2(total_safe), float("-inf"))
    if SINGLE:
        lse = lse * 0.6931471805599453
    if WRITE_LSE:
        gl.store(lse_out + gl.max(gl.reshape(head_r, [2, 4, 2]), axis=1) * stride_lh, lse)


@gluon.jit
def _slot_sum(x):
    """[16, 32] -> [2, 2, 32]: the sum of each query head's 4 slot rows (rows as [row // 8,
    slot, row % 2]; head 2 (row // 8) + row % 2)."""
    return gl.sum(gl.reshape(x, [2, 4, 2, 32]), axis=1)


@gluon.jit(do_not_specialize=["S", "sinks", "stride_bt", "stride_ot", "stride_oh",
                              "stride_os", "stride_lt", "stride_lh"])
def _kivi_decode_pages(
    query,  # [T, HQ, D]: decode row i is request i
    key,  # [T, HK, D]: the step's own token (TAIL and SELF)
    value,
    cache,  # uint8 [num_blocks, PAGE_BYTES]
    tail,  # [2, slots, R, HK, D] (TAIL)
    block_table,  # [num_reqs, max_blocks] int32
    seq_lens,
    tail_slots,
    valid_from,
    mid_o,  # fp32 [T, HQ, >=S, D]: split s's output (normalised); SINGLE: the output
    mid_lse,  # fp32 [T, HQ, >=S] (log2 domain); SINGLE: the LSE [HQ, T] (natural log)
    sm_scale,
    S,
    sinks,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_bt,
    stride_tail_kv,
    stride_tail_slot,
    stride_tail_pos,
    stride_tail_h,
    stride_ot,
    stride_oh,
    stride_os,
    stride_lt,
    stride_lh,
    R: gl.constexpr,
    BLOCK_R: gl.constexpr,
    TAIL: gl.constexpr,  # the last split also reads the tail ring (and SELF: the own token)
    SELF: gl.constexpr,
    SINGLE: gl.constexpr,  # S == 1 (with TAIL): write the output and natural-log LSE
    WRITE_LSE: gl.constexpr,
    PAGE_BYTES: gl.constexpr,
    OFF_KC: gl.constexpr,
    OFF_VC: gl.constexpr,
    OFF_KS: gl.constexpr,
    OFF_KM: gl.constexpr,
    OFF_VS: gl.constexpr,
    OFF_VM: gl.constexpr,
    G: gl.constexpr,
    D: gl.constexpr,
):
    req = gl.program_id(0)
    kvh = gl.program_id(1)
    split = gl.program_id(2)
    # the pages of this split (as in attention._kivi_attend_context; the tail is not read)
    ctx = gl.load(seq_lens + req) - 1
    vfrom = gl.load(valid_from + req)
    tstart = gl.maximum(gl.maximum(vfrom, (ctx // G) * G - (R - sinks - G)), 0)
    pinned = gl.where(vfrom == 0, gl.minimum(sinks, tstart), 0)
    p_first = pinned // G
    n_pages = gl.maximum(tstart // G - p_first, 0)
    per_split = gl.cdiv(gl.cdiv(n_pages, S), 4) * 4
    p_lo = p_first + split * per_split
    p_hi = gl.minimum(p_lo + per_split, tstart // G)
    n_iter = gl.cdiv(gl.maximum(p_hi - p_lo, 0), 4)
    p_last = p_hi - 1
    bt_row = block_table + req.to(gl.int64) * stride_bt

    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1],
                                                  instr_shape=[16, 8])
    A: gl.constexpr = gl.DotOperandLayout(0, mma, 2)
    B: gl.constexpr = gl.DotOperandLayout(1, mma, 2)
    # storage-order load layouts: [rows, run, t, 4 elements] for A operands, [run, t, 4
    # elements, cols] for B, [run, t, 4 bytes, j, ln] key codes, [pg, run, t, 4 bytes, j,
    # ln] value codes; each converts to its dot operand without moving data between lanes
    LA: gl.constexpr = gl.BlockedLayout([1, 1, 1, 4], [8, 1, 4, 1], [1, 1, 1, 1], [3, 2, 0, 1])
    LK: gl.constexpr = gl.BlockedLayout([2, 1, 4, 16, 1], [1, 4, 1, 1, 8], [1, 1, 1, 1, 1],
                                        [2, 1, 4, 3, 0])
    LV: gl.constexpr = gl.BlockedLayout([4, 2, 1, 4, 4, 1], [1, 1, 4, 1, 1, 8],
                                        [1, 1, 1, 1, 1, 1], [3, 2, 5, 4, 1, 0])
    # value scales of one plane: copied as [pg, run, t, 4 tokens] (8 bytes a lane), read
    # as the score columns' tokens (each lane its 32, in every row group); value mins of the
    # 4 planes: copied as [plane, pg, run, t, 4 tokens], read as B operand columns
    LSC: gl.constexpr = gl.BlockedLayout([1, 1, 1, 4], [4, 2, 4, 1], [1, 1, 1, 1],
                                         [3, 2, 1, 0])
    LSR: gl.constexpr = gl.BlockedLayout([4, 2, 1, 4], [8, 1, 4, 1], [1, 1, 1, 1],
                                         [3, 2, 1, 0])
    LMC: gl.constexpr = gl.BlockedLayout([1, 1, 1, 1, 4], [4, 4, 2, 1, 1], [1, 1, 1, 1, 1],
                                         [4, 3, 2, 1, 0])
    LMR: gl.constexpr = gl.BlockedLayout([1, 4, 2, 1, 4], [8, 1, 1, 4, 1], [1, 1, 1, 1, 1],
                                         [4, 3, 2, 1, 0])
    # key scales and mins: copied as [scale/min x plane, slot, run, t, 4 ch]; read as
    # [row // 8, slot, row % 2, run, t, 4 ch] (PR: LA's lanes and registers with rows 8
    # apart and rows 2 apart replicas) and [col // 4, slot, run, t, 4 ch] (PC: the lanes and
    # registers of B columns loaded in storage order, [run, t, 4 elements, cols])
    LQC: gl.constexpr = gl.BlockedLayout([1, 1, 1, 1, 4], [1, 4, 2, 4, 1], [1, 1, 1, 1, 1],
                                         [4, 3, 2, 1, 0])
    PR: gl.constexpr = gl.BlockedLayout([2, 1, 1, 2, 1, 4], [1, 4, 2, 1, 4, 1],
                                        [1, 1, 1, 1, 1, 1], [5, 4, 2, 1, 0, 3])
    PC: gl.constexpr = gl.BlockedLayout([1, 1, 2, 1, 4], [2, 4, 1, 4, 1], [1, 1, 1, 1, 1],
                                        [4, 3, 1, 0, 2])
    # the head's sections in page 0 (a page's are PAGE_BYTES further per block id)
    cache16 = cache.to(gl.pointer_type(gl.float16))
    kc = cache + (OFF_KC + kvh * G * 32)  # [G tokens, 32 bytes]
    vc = cache + (OFF_VC + kvh * 32 * G)  # [32 byte columns, G tokens]
    ks = cache16 + (OFF_KS // 2 + kvh * D)  # [D] float16
    vs = cache16 + (OFF_VS // 2 + kvh * 4 * G)  # [4 groups, G tokens] float16; mins after
    # the key codes enter the score dot as subnormals code * 2**(2p - 24): query plane p
    # holds 2**(3 - 2p), so every plane's products carry 2**-21 (SCORE undoes it)
    SCORE: gl.constexpr = 2097152.0
    # dot row r: query head r % 2 + 2 (r // 8), page slot (r % 8) // 2; rows r and r + 8
    # of a lane share a page, so no operand register is a known zero or a duplicate
    ra = _ar(16, LA, 0, 4)
    qk_scale = sm_scale * 1.4426950408889634
    q_rows = (query + req.to(gl.int64) * stride_qt
              + (kvh * 4 + (ra % 2) + 2 * (ra // 8)).to(gl.int64) * stride_qh)
    q0 = (_frag_a(q_rows, LA, A).to(gl.float32) * (qk_scale * 8.0)).to(gl.float16)
    q1 = (_frag_a(q_rows + 32, LA, A).to(gl.float32) * (qk_scale * 2.0)).to(gl.float16)
    q2 = (_frag_a(q_rows + 64, LA, A).to(gl.float32) * (qk_scale * 0.5)).to(gl.float16)
    q3 = (_frag_a(q_rows + 96, LA, A).to(gl.float32) * (qk_scale * 0.125)).to(gl.float16)
    rows = gl.arange(0, 16, layout=gl.SliceLayout(1, mma))
    cols = gl.arange(0, 128, layout=gl.SliceLayout(0, mma))
    slot = (rows % 8) // 2
    same_page = slot[:, None] == (cols // 32)[None, :]
    bcol = gl.arange(0, 8, layout=gl.SliceLayout(0, mma))
    # the code tiles are copied through views with t and byte merged (``tb``: byte is the
    # fastest dim, so the same bytes): 4 bytes a lane and copy as LK/LV hold them (16-byte
    # copies, a token's or byte column's half a lane, were 10% slower on the H200)
    LKC: gl.constexpr = gl.BlockedLayout([2, 4, 16, 1], [1, 4, 1, 8], [1, 1, 1, 1], [1, 3, 2, 0])
    LVC: gl.constexpr = gl.BlockedLayout([4, 2, 4, 4, 1], [1, 1, 4, 1, 8], [1, 1, 1, 1, 1],
                                         [2, 4, 3, 1, 0])
    # key code words [run, tb, j, ln]: bytes run*16 + tb of token frag(x)
    k_j = _ar(16, LKC, 2, 4)
    k_tok = _frag(((k_j % 4) * 8)[None, None, :, None] + _ar(8, LKC, 3, 4)[None, None, None, :])
    k_off = (k_tok * 32 + (_ar(2, LKC, 0, 4) * 16)[:, None, None, None]
             + _ar(16, LKC, 1, 4)[None, :, None, None])
    k_pg = (k_j // 4)[None, None, :, None]
    # value code words [pg, run, tb, j, ln]: byte column j*8 + ln, token run*16 + tb
    v_pg = _ar(4, LVC, 0, 5)[:, None, None, None, None]
    v_pos = ((_ar(2, LVC, 1, 5) * 16)[None, :, None, None, None]
             + _ar(16, LVC, 2, 5)[None, None, :, None, None])
    v_col = ((_ar(4, LVC, 3, 5) * 8)[None, None, None, :, None]
             + _ar(8, LVC, 4, 5)[None, None, None, None, :])
    v_off = v_col * G + v_pos
    # value scale words [pg, run, t, 4 tokens] of each plane
    s_pg = _ar(4, LSC, 0, 4)[:, None, None, None]
    s_pos = ((_ar(2, LSC, 1, 4) * 16)[None, :, None, None]
             + (_ar(4, LSC, 2, 4) * 4)[None, None, :, None]
             + _ar(4, LSC, 3, 4)[None, None, None, :])
    s_off = (s_pos, s_pos + G, s_pos + 2 * G, s_pos + 3 * G)
    # value min words [plane, pg, run, t, 4 tokens]
    m_pg = _ar(4, LMC, 1, 5)[None, :, None, None, None]
    m_off = ((OFF_VM - OFF_VS) // 2 + (_ar(4, LMC, 0, 5) * G)[:, None, None, None, None]
             + (_ar(2, LMC, 2, 5) * 16)[None, None, :, None, None]
             + (_ar(4, LMC, 3, 5) * 4)[None, None, None, :, None]
             + _ar(4, LMC, 4, 5)[None, None, None, None, :])
    # key scale and min words [scale/min x plane, slot, run, t, 4 ch]
    q_wp = _ar(8, LQC, 0, 5)
    q_pg = _ar(4, LQC, 1, 5)[None, :, None, None, None]
    q_off = (((OFF_KM - OFF_KS) // 2 * (q_wp // 4) + (q_wp % 4) * 32)[:, None, None, None, None]
             + (_ar(2, LQC, 2, 5) * 16)[None, None, :, None, None]
             + (_ar(4, LQC, 3, 5) * 4)[None, None, None, :, None]
             + _ar(4, LQC, 4, 5)[None, None, None, None, :])

    m_i = gl.full([16], -1e30, gl.float32, layout=gl.SliceLayout(1, mma))
    mo = gl.zeros([16, 8], gl.float32, layout=mma)  # p . min of planes 0-3; row sums
    o0 = gl.zeros([16, 32], gl.float32, layout=mma)
    o1 = gl.zeros([16, 32], gl.float32, layout=mma)
    o2 = gl.zeros([16, 32], gl.float32, layout=mma)
    o3 = gl.zeros([16, 32], gl.float32, layout=mma)
    kbuf = gl.allocate_shared_memory(gl.uint8, [2, 2, 4, 4, 16, 8],
                                     gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 4, 3, 0]))
    vbuf = gl.allocate_shared_memory(gl.uint8, [2, 4, 2, 4, 4, 4, 8],
                                     gl.SwizzledSharedLayout(1, 1, 1, [3, 2, 5, 4, 1, 0]))
    SL: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [3, 2, 1, 0])
    sbuf = (gl.allocate_shared_memory(gl.float16, [2, 4, 2, 4, 4], SL),
            gl.allocate_shared_memory(gl.float16, [2, 4, 2, 4, 4], SL),
            gl.allocate_shared_memory(gl.float16, [2, 4, 2, 4, 4], SL),
            gl.allocate_shared_memory(gl.float16, [2, 4, 2, 4, 4], SL))
    # the mins' B operand columns: 0-3 copied per stage, 4 ones, 5-7 zeros
    mbuf = gl.allocate_shared_memory(gl.float16, [2, 8, 4, 2, 4, 4],
                                     gl.SwizzledSharedLayout(1, 1, 1, [4, 3, 2, 1, 0]))
    # [stage, scale/min x plane, slot, run, t, 4 ch]; read as [stage x scale/min x plane, ...]
    qbuf = gl.allocate_shared_memory(gl.float16, [2, 8, 4, 2, 4, 4],
                                     gl.SwizzledSharedLayout(1, 1, 1, [4, 3, 2, 1, 0]))
    qv = qbuf._reinterpret(gl.float16, [16, 4, 2, 4, 4],
                           gl.SwizzledSharedLayout(1, 1, 1, [3, 2, 1, 0]))
    col = _ar(4, LMC, 0, 5)[:, None, None, None, None] + gl.zeros([4, 4, 2, 4, 4], gl.int32,
                                                                    layout=LMC)
    mbuf.index(0).slice(4, 4).store(gl.where(col == 0, 1.0, 0.0).to(gl.float16))
    mbuf.index(1).slice(4, 4).store(gl.where(col == 0, 1.0, 0.0).to(gl.float16))
    p_end = p_lo + (n_iter - 1) * 4  # the last iteration's first page
    ids = _stage_ids(bt_row, p_lo, p_last)
    if n_iter > 0:
        _stage(kbuf.index(0), vbuf.index(0), sbuf, mbuf, qbuf, 0, kc, vc, vs, ks, ids, k_pg,
               k_off, v_pg, v_off, s_pg, s_off, m_pg, m_off, q_pg, q_off, PAGE_BYTES)
    ids = _stage_ids(bt_row, gl.minimum(p_lo + 4, p_end), p_last)  # the next stage's
    for it in range(n_iter):
        p0 = p_lo + it * 4
        nxt = (it + 1) % 2
        _stage(kbuf.index(nxt), vbuf.index(nxt), sbuf, mbuf, qbuf, nxt, kc, vc, vs, ks, ids,
               k_pg, k_off, v_pg, v_off, s_pg, s_off, m_pg, m_off, q_pg, q_off, PAGE_BYTES)
        ids = _stage_ids(bt_row, gl.minimum(p0 + 8, p_end), p_last)  # an iteration ahead
        # from this stage: the key mins of its 4 pages as B columns (bias = q . m of each
        # row's page), then each row's key scales
        qi = (it % 2) * 8  # this stage's key scales in qv, then its mins
        async_copy.wait_group(1)
        gl.thread_barrier()  # ldmatrix reads words other lanes copied
        bsc = gl.zeros([16, 8], gl.float32, layout=mma)  # (mins scaled as the query planes)
        bsc = mma_v2(q0, _slot_cols(qv.index(qi + 4), PC, B) * 0.125, bsc)
        bsc = mma_v2(q1, _slot_cols(qv.index(qi + 5), PC, B) * 0.5, bsc)
        bsc = mma_v2(q2, _slot_cols(qv.index(qi + 6), PC, B) * 2.0, bsc)
        bsc = mma_v2(q3, _slot_cols(qv.index(qi + 7), PC, B) * 8.0, bsc)
        kt = kbuf.index(it % 2).load(LK)
        s = gl.zeros([16, 128], gl.float32, layout=mma)
        s = _key_dot(s, q0, _slot_rows(qv.index(qi), PR, A), kt, 0, B)
        s = _key_dot(s, q1, _slot_rows(qv.index(qi + 1), PR, A), kt, 1, B)
        s = _key_dot(s, q2, _slot_rows(qv.index(qi + 2), PR, A), kt, 2, B)
        s = _key_dot(s, q3, _slot_rows(qv.index(qi + 3), PR, A), kt, 3, B)
        bias = gl.sum(gl.where(bcol[None, :] == slot[:, None], bsc, 0.0), axis=1)
        keep = same_page & (p0 + cols // 32 < p_hi)[None, :]
        s = gl.where(keep, s, float("-inf"))  # scores: s * SCORE + bias (a row constant)
        m_cur = gl.max(s, axis=1) * SCORE + bias
        # lazy rescale, as in the Triton kernel but at 2**4: the probabilities times the value
        # scales are float16 operands (p * s <= 16 s)
        if gl.max(m_cur - m_i, axis=0) > 4.0:
            m_new = gl.maximum(m_i, m_cur)
            alpha = gl.exp2(m_i - m_new)
            mo = mo * alpha[:, None]
            o0 = o0 * alpha[:, None]
            o1 = o1 * alpha[:, None]
            o2 = o2 * alpha[:, None]
            o3 = o3 * alpha[:, None]
            m_i = m_new
        p16 = gl.exp2(s * SCORE - (m_i - bias)[:, None]).to(gl.float16)
        mo = mma_v2(gl.convert_layout(p16, A), _mins_and_ones(mbuf, it % 2, LMR, B), mo)
        vt = vbuf.index(it % 2).load(LV)
        o0 = _value_dot(o0, p16, vt, sbuf, it % 2, 0, LSR, mma, A, B)
        o1 = _value_dot(o1, p16, vt, sbuf, it % 2, 1, LSR, mma, A, B)
        o2 = _value_dot(o2, p16, vt, sbuf, it % 2, 2, LSR, mma, A, B)
        o3 = _value_dot(o3, p16, vt, sbuf, it % 2, 3, LSR, mma, A, B)
    async_copy.wait_group(0)
    # undo the value codes' subnormal scale 2**(2p - 24), add p . min; the row sums are
    # mo's column 4
    o0 = o0 * 16777216.0 + gl.sum(gl.where(bcol[None, :] == 0, mo, 0.0), axis=1)[:, None]
    o1 = o1 * 4194304.0 + gl.sum(gl.where(bcol[None, :] == 1, mo, 0.0), axis=1)[:, None]
    o2 = o2 * 1048576.0 + gl.sum(gl.where(bcol[None, :] == 2, mo, 0.0), axis=1)[:, None]
    o3 = o3 * 262144.0 + gl.sum(gl.where(bcol[None, :] == 3, mo, 0.0), axis=1)[:, None]
    l_i = gl.sum(gl.where(bcol[None, :] == 4, mo, 0.0), axis=1)
    if TAIL:
        if split == S - 1:
            m_i, l_i, o0, o1, o2, o3 = _attend_tail(
                m_i, l_i, o0, o1, o2, o3, q0, q1, q2, q3, key, value, tail, tail_slots, req,
                kvh, ctx, tstart, pinned, sinks, stride_kt, stride_kh, stride_vt, stride_vh,
                stride_tail_kv, stride_tail_slot, stride_tail_pos, stride_tail_h, R, BLOCK_R,
                SELF, mma, A, B)

    # merge the 4 slot rows of each query head by log-sum-exp; write the split's output
    out = mid_o + req.to(gl.int64) * stride_ot + kvh * 4 * stride_oh + split * stride_os
    lse_out = mid_lse + req.to(gl.int64) * stride_lt + kvh * 4 * stride_lh + split
    lse_r = gl.where(l_i > 0.0, m_i + gl.log2(gl.maximum(l_i, 1e-30)), float("-inf"))
    _merge_by_slot_sum(out, lse_out, o0, o1, o2, o3, m_i, l_i, lse_r, stride_oh, stride_lh,
                       SINGLE, WRITE_LSE, mma)


def decode_pages(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 cache: torch.Tensor, tail: torch.Tensor, block_table: torch.Tensor,
                 seq_lens: torch.Tensor, tail_slots: torch.Tensor, valid_from: torch.Tensor,
                 mid_o: torch.Tensor, mid_lse: torch.Tensor, scale: float, splits: int,
                 sinks: int, residual: int, num_rows: int, constants: dict[str, int], *,
                 with_tail: bool, add_self: bool, single: bool, write_lse: bool) -> None:
    """Splits ``0 .. splits - 1`` of ``num_rows`` decode rows over their pages (``with_tail``:
    the last split also over the tail and, ``add_self``, the step's token) into ``mid_o`` /
    ``mid_lse`` as ``attention._kivi_attend_context`` writes them (``single``: the output
    and natural-log LSE); ``constants``: ``common.format_constants`` of the format."""
    _kivi_decode_pages[(num_rows, constants["HK"], splits)](
        query, key, value, cache, tail, block_table, seq_lens, tail_slots, valid_from, mid_o,
        mid_lse, scale, splits, sinks,
        *read_strides(query, key, value, block_table, tail, mid_o, mid_lse),
        R=residual, BLOCK_R=max(16, triton.next_power_of_2(residual)),
        TAIL=with_tail, SELF=add_self, SINGLE=single, WRITE_LSE=write_lse,
        **{k: constants[k] for k in _FORMAT_ARGS}, num_warps=1,
        **({"maxnreg": MAX_REGISTERS} if MAX_REGISTERS else {}),
    )


_FORMAT_ARGS = ("PAGE_BYTES", "OFF_KC", "OFF_VC", "OFF_KS", "OFF_KM", "OFF_VS", "OFF_VM", "G",
                "D")
