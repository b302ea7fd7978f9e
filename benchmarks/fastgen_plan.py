"""Host cost of the GPU FastGen worker's per-step decode plan (CPU only, no GPU needed).

Builds ``--rows`` profiled requests of a ``--layers`` x ``--heads`` model with random
policies (frequent / local / full) and stream lengths, then times
``DeviceFastGen._plan_decode`` (window progress, admissions, page completions, the launch
arrays) over ``--steps`` decode steps. Prints a table and writes JSON.

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

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kivi_vllm.config import KiviConfig  # noqa: E402
from kivi_vllm.fastgen import device as fg  # noqa: E402
from kivi_vllm.fastgen.policy import Policy, TokenClasses  # noqa: E402


def plan_ms(rows: int, layers: int, heads: int, prompt: int, steps: int) -> float:
    """Mean milliseconds of one step's decode plan for ``rows`` requests."""
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
    total = 0.0
    for _ in range(steps):
        for seq in worker.rows:  # the step's token (plain)
            seq.classes = np.concatenate([seq.classes, np.zeros(1, np.int8)])
        start = time.perf_counter()
        worker._plan_decode()
        total += time.perf_counter() - start
    return 1e3 * total / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="64,256")
    p.add_argument("--shapes", default="30x3,32x8", help="layers x KV heads, comma-separated")
    p.add_argument("--prompt", type=int, default=2048)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    records = []
    print(f"{'layers x heads':>15} {'rows':>6} {'plan ms/step':>13}")
    for shape in args.shapes.split(","):
        layers, heads = (int(x) for x in shape.split("x"))
        for rows in (int(r) for r in args.rows.split(",")):
            ms = plan_ms(rows, layers, heads, args.prompt, args.steps)
            print(f"{shape:>15} {rows:>6} {ms:>13.2f}")
            records.append({"layers": layers, "kv_heads": heads, "rows": rows,
                            "prompt": args.prompt, "plan_ms": round(ms, 3),
                            "machine": platform.processor() or platform.machine(),
                            "cpus": os.cpu_count(), "date": str(datetime.date.today())})
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
