"""Host cost of the GPU FastGen worker's decode steps (CPU only, no GPU needed).

Builds ``--rows`` profiled requests of a ``--layers`` x ``--heads`` model with random
policies (frequent / local / full) and stream lengths, then times over ``--steps`` decode
steps ``DeviceFastGen._plan_decode`` (window progress, admissions, page completions, the
launch arrays), and the whole host side of a step: ``begin_step``, ``forward`` of every
layer with the kernel launches themselves (Triton's and vLLM's merge) replaced by no-ops
(what is left are the Python wrappers and the torch calls around them; on a GPU each such
call is a launch too) after the plan's commit (the metadata builder's call in the engine),
and ``end_step``. It also counts, per layer, the torch calls that
are not views and the kernel launches. Prints a table and writes JSON.

    .venv/bin/python benchmarks/fastgen_plan.py --out benchmarks/results/fastgen-plan-cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from triton.runtime.jit import JITFunction

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kivi_vllm.config import KiviConfig  # noqa: E402
from kivi_vllm.fastgen import device as fg  # noqa: E402
from kivi_vllm.fastgen.policy import Policy, TokenClasses  # noqa: E402


def build(rows: int, layers: int, heads: int, prompt: int, steps: int) -> fg.DeviceFastGen:
    """A worker with ``rows`` profiled requests (random policies and stream lengths)."""
    cfg = KiviConfig(bits=2, group_size=32, residual=32, fastgen={"recovery": 0.95})
    worker = fg.DeviceFastGen()
    worker.enable(cfg, TokenClasses(frozenset({0}), frozenset({1})), layers, heads, 64,
                  rows, prompt + steps + 64, torch.device("cpu"))
    rng = np.random.default_rng(0)
    window = int(0.3 * prompt)
    worker.rows = []
    blocks = np.arange(10**6)
    for slot in range(rows):
        seq = fg.DeviceSeq(slot, layers, heads, worker.max_pages, group=32)
        seq.policy[:] = rng.choice([Policy.FREQUENT, Policy.LOCAL, Policy.FULL],
                                   size=(layers, heads))
        seq.n, seq.window, seq.cut = prompt, window, prompt - window
        seq.local_prompt = np.zeros((window - 1, layers, heads), bool)
        seq.classes = np.zeros(prompt, np.int8)
        seq.length[:] = rng.integers(100, prompt, size=(layers, heads, 2))
        seq.held, seq.block_ids = 10**9, blocks
        worker.rows.append(seq)
        worker.seqs[str(slot)] = seq
    return worker


def plan_ms(rows: int, layers: int, heads: int, prompt: int, steps: int) -> float:
    """Mean milliseconds of one step's decode plan for ``rows`` requests."""
    worker = build(rows, layers, heads, prompt, steps)
    total = 0.0
    for _ in range(steps):
        for seq in worker.rows:  # the step's token (plain)
            seq.classes = np.concatenate([seq.classes, np.zeros(1, np.int8)])
        start = time.perf_counter()
        worker._plan_decode()
        total += time.perf_counter() - start
    return 1e3 * total / steps


class _Calls(TorchDispatchMode):
    """Counts the torch calls that are not views (each a kernel launch on a GPU)."""

    VIEWS = frozenset({"view", "_unsafe_view", "slice", "select", "unsqueeze", "squeeze",
                       "expand", "t", "transpose", "permute", "as_strided", "alias",
                       "detach", "reshape", "_reshape_alias", "unbind", "split"})

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in self.VIEWS:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def step_ms(rows: int, layers: int, heads: int, prompt: int, steps: int) -> dict:
    """Mean host milliseconds of begin_step, forward (all layers, kernels stubbed) and
    end_step of a decode step of ``rows`` requests; torch calls and launches per layer."""
    worker = build(rows, layers, heads, prompt, steps)
    ids = [str(i) for i in range(rows)]
    launches = [0]

    def launch(*args, **kwargs) -> None:
        launches[0] += 1

    JITFunction.__getitem__ = lambda self, grid: launch  # every Triton launch
    wrappers = fg._kernels(False)[:2]  # the read and store wrappers run, not their kernels
    fg._kernels = lambda cuda: (*wrappers, launch)  # and vLLM's merge
    qpk, d, width = 4, 64, prompt + steps + 64
    token_ids = np.zeros((rows, width), np.int64)
    held = np.full(rows, 10**9)
    block_rows = np.broadcast_to(np.arange(10**6, dtype=np.int32), (rows, 10**6))
    q = torch.randn(rows, heads * qpk, d)
    k, v = torch.randn(rows, heads, d), torch.randn(rows, heads, d)
    out = torch.empty_like(q)
    cache = torch.zeros(1, worker.fmt.page_bytes, dtype=torch.uint8)
    tail = torch.zeros(1).expand(2, (rows + 1) * heads * 2, 32, 1, d)  # never read
    table = SimpleNamespace(num_blocks_per_row=np.zeros(rows, np.int32))
    index = {r: i for i, r in enumerate(ids)}
    md = SimpleNamespace(num_actual_tokens=rows, num_decode_tokens=rows, num_decodes=rows,
                         num_reqs=rows)
    times = np.zeros(3)
    for step in range(steps + 1):  # step 0: counting and warm-up, not timed
        computed = np.array([seq.classes.size for seq in worker.rows])
        t0 = time.perf_counter()
        worker.begin_step(set(), ids, computed, dict.fromkeys(ids, 1), np.arange(rows),
                          token_ids, held, block_rows)
        t1 = time.perf_counter()
        worker.commit(rows)
        if step == 0:  # count one step's calls (the mode's own cost is not timed)
            with _Calls() as mode:
                for layer in range(layers):
                    worker.forward(layer, q, k, v, cache, tail, md, 0.125, out)
            calls, kernels = mode.calls / layers, launches[0] / layers
        for layer in range(layers):
            worker.forward(layer, q, k, v, cache, tail, md, 0.125, out)
        t2 = time.perf_counter()
        worker.end_step(table, index)
        worker.take_reports()
        if step:
            times += [t1 - t0, t2 - t1, time.perf_counter() - t2]
    begin, forward, end = 1e3 * times / steps
    return {"begin_ms": round(begin, 3), "forward_ms": round(forward, 3),
            "end_ms": round(end, 3), "torch_calls_per_layer": round(calls, 2),
            "launches_per_layer": round(kernels, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="64,256")
    p.add_argument("--shapes", default="30x3,32x8", help="layers x KV heads, comma-separated")
    p.add_argument("--prompt", type=int, default=2048)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    records = []
    print(f"{'layers x heads':>15} {'rows':>6} {'plan ms':>8} {'begin ms':>9} "
          f"{'forward ms':>11} {'end ms':>7} {'torch calls/layer':>18} {'launches/layer':>15}")
    for shape in args.shapes.split(","):
        layers, heads = (int(x) for x in shape.split("x"))
        for rows in (int(r) for r in args.rows.split(",")):
            ms = plan_ms(rows, layers, heads, args.prompt, args.steps)
            whole = step_ms(rows, layers, heads, args.prompt, args.steps)
            print(f"{shape:>15} {rows:>6} {ms:>8.2f} {whole['begin_ms']:>9.2f} "
                  f"{whole['forward_ms']:>11.2f} {whole['end_ms']:>7.2f} "
                  f"{whole['torch_calls_per_layer']:>18.2f} {whole['launches_per_layer']:>15.2f}",
                  flush=True)
            records.append({"layers": layers, "kv_heads": heads, "rows": rows,
                            "prompt": args.prompt, "plan_ms": round(ms, 3), **whole,
                            "machine": platform.processor() or platform.machine(),
                            "cpus": os.cpu_count(), "date": str(datetime.date.today())})
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
