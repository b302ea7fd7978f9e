"""Decode v7 (``kivi_vllm/kernels/decode_gluon.py``) compiled for sm_90 without a GPU.

Gluon does not run under ``TRITON_INTERPRET``, so on the CPU the kernel is compiled (the
Triton wheel's own ptxas) and its page loop checked for what the design promises: the
tensor-core work of four pages per iteration, and no operand moved between lanes (a layout
mismatch in a ``convert_layout`` to a dot operand compiles to ``SHFL.IDX``). Its numbers are
tested against the reference on the GPU (``tests/test_kernels.py``).
"""

from __future__ import annotations

import pytest

from benchmarks.kernel_sass import compile_gluon_decode, sass_loops

pytestmark = pytest.mark.triton


@pytest.fixture(scope="module")
def page_loop():
    usage, loops = sass_loops(compile_gluon_decode(kv_heads=8, residual=32).asm["cubin"])
    assert loops, usage
    return max(loops, key=lambda loop: sum(loop[2].values()))[2]


def test_four_pages_of_tensor_core_work_per_iteration(page_loop):
    # scores: 16 n8 tiles x 2 k16 x 4 planes; values: 4 n8 tiles x 8 k16 x 4 planes;
    # key-min bias: 2 k16 x 4 planes
    assert page_loop["HMMA.16816.F32"] == 128 + 128 + 8


def test_operands_stay_in_their_lanes(page_loop):
    assert page_loop["SHFL.IDX"] == 0
    assert page_loop["LDSM.16.M88.4"] == 16  # the code tiles, read back by ldmatrix
    assert page_loop["LDGSTS.E"] == 64  # the next iteration's code words, by cp.async
    assert sum(page_loop.values()) < 3000  # 2,828 when written; the Triton loop takes 3,468
