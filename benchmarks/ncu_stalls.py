"""Summarise an ``ncu --page source --csv --print-source sass`` export of one kernel:
warp-stall samples by reason, and each opcode's share of executed instructions and of
samples. Written by ``scripts/gpu_run.sh ncu:KV``; also runs on a copied CSV::

    python benchmarks/ncu_stalls.py ncu-kivi2-sass.csv
"""

from __future__ import annotations

import argparse
import collections
import csv


def summarise(path: str, top: int = 18) -> str:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header, data = rows[1], rows[2:]  # rows[0] names the kernel
    col = {name: i for i, name in enumerate(header)}
    reasons = [h for h in header if h.startswith("stall_") and not h.endswith("(Not Issued)")]

    def num(row: list[str], name: str) -> int:
        cell = row[col[name]]
        return int(cell) if cell.isdigit() else 0

    stalls: collections.Counter[str] = collections.Counter()
    executed: collections.Counter[str] = collections.Counter()
    sampled: collections.Counter[str] = collections.Counter()
    for row in data:
        for reason in reasons:
            stalls[reason] += num(row, reason)
        words = row[col["Source"]].split()
        if not words:
            continue
        opcode = (words[1] if words[0].startswith("@") else words[0]).split(".")[0]
        executed[opcode] += num(row, "Instructions Executed")
        sampled[opcode] += num(row, "# Samples")
    n_stall, n_exec, n_samp = (max(1, sum(c.values())) for c in (stalls, executed, sampled))
    lines = [f"{path}: {n_stall} warp samples"]
    lines += [f"  {r:24s} {v:8d} {v / n_stall:6.1%}" for r, v in stalls.most_common(12)]
    lines.append("  opcode     executed  samples")
    lines += [f"  {op:10s} {v / n_exec:8.1%} {sampled[op] / n_samp:8.1%}"
              for op, v in executed.most_common(top)]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("csv", nargs="+")
    for path in parser.parse_args().csv:
        print(summarise(path))
