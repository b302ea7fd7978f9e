"""Decode v7 (``kivi_vllm/kernels/decode_gluon.py``) compiled for sm_90 without a GPU.

Gluon does not run under ``TRITON_INTERPRET``, so on the CPU the kernel is compiled (the
Triton wheel's own ptxas) and its page loop checked for what the design promises: the
tensor-core work of four pages per iteration, and no operand moved between lanes (a layout
mismatch in a ``convert_layout`` to a dot operand compiles to ``SHFL.IDX``). Its numbers are
tested against the reference on the GPU (``tests/test_kernels.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.triton


@pytest.fixture(scope="module")
def page_loop() -> dict[str, int]:
    """Opcode counts of one iteration of v7's page loop (``kernel_sass.py --gluon``)."""
    # a process of its own: once the Triton interpreter has run a kernel here
    # (tests/test_kernels.py on the CPU), compiling in this process fails
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "kernel_sass.py"),
                          "--gluon", "--json"], capture_output=True, text=True, env=env,
                         check=True)
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["loops"], report["usage"]
    return max(report["loops"], key=lambda loop: sum(loop.values()))


def test_four_pages_of_tensor_core_work_per_iteration(page_loop):
    # scores: 16 n8 tiles x 2 k16 x 4 planes; values: 4 n8 tiles x 8 k16 x 4 planes;
    # key-min bias: 2 k16 x 4 planes; value mins and row sums: 8 k16
    assert page_loop["HMMA.16816.F32"] == 128 + 128 + 8 + 8


def test_operands_stay_in_their_lanes(page_loop):
    assert page_loop.get("SHFL.IDX", 0) == 0
    assert page_loop["LDSM.16.M88.4"] == 16  # the code tiles, read back by ldmatrix
    # the next iteration's code words (4 bytes); value scales and mins, key scales and mins
    # (8 bytes), by cp.async
    assert page_loop["LDGSTS.E"] == 64 and page_loop["LDGSTS.E.64"] == 8 + 8
    # value scales as score columns, value mins as B columns, key scales and mins as A
    # rows and B columns
    assert page_loop["LDS.64"] == 32 + 8 + 16
    assert page_loop.get("LDL", 0) == 0  # no spill reloads
    assert sum(page_loop.values()) < 2100  # 2,015 when written; the Triton loop takes 3,468


def test_only_the_block_ids_ahead_are_global_loads_in_the_loop(page_loop):
    """Every page byte comes through the cp.async stages; the loop's only global loads are
    the four block ids of the stage after next (loaded an iteration ahead)."""
    assert page_loop.get("LDG.E", 0) == 4
    assert not [op for op in page_loop if op.startswith("LDG.") and op != "LDG.E"]
