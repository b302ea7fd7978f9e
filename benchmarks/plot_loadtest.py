"""Compare load-test runs (JSON of ``benchmarks/loadtest.py``): a PNG and a markdown table.

    python benchmarks/plot_loadtest.py bf16.json fp8.json kivi4.json kivi2.json \
        --png serving.png --table serving.md

One line per JSON file (its ``label``), x = concurrency (or request rate): output
tokens/s, requests/s, TTFT p50/p99, TPOT p50, ITL p99.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

PANELS = (
    ("output_throughput", "output tokens/s"),
    ("request_throughput", "requests/s"),
    ("p50_ttft_ms", "TTFT p50 (ms)"),
    ("p99_ttft_ms", "TTFT p99 (ms)"),
    ("p50_tpot_ms", "TPOT p50 (ms)"),
    ("p99_itl_ms", "ITL p99 (ms)"),
)
TABLE_FIELDS = (
    ("completed", "done", "{:d}"),
    ("failed", "failed", "{:d}"),
    ("request_throughput", "req/s", "{:.2f}"),
    ("output_throughput", "output tok/s", "{:.1f}"),
    ("p50_ttft_ms", "TTFT p50 ms", "{:.0f}"),
    ("p99_ttft_ms", "TTFT p99 ms", "{:.0f}"),
    ("p50_tpot_ms", "TPOT p50 ms", "{:.1f}"),
    ("p99_tpot_ms", "TPOT p99 ms", "{:.1f}"),
    ("p50_itl_ms", "ITL p50 ms", "{:.1f}"),
    ("p99_itl_ms", "ITL p99 ms", "{:.1f}"),
)


def load(paths: list[str]) -> list[dict[str, Any]]:
    records = []
    for path in paths:
        with open(path) as f:
            rec = json.load(f)
        if not rec.get("runs"):
            raise SystemExit(f"{path}: no runs (not a loadtest.py JSON, or the run was cut off)")
        rec.setdefault("label", "")
        rec["label"] = rec["label"] or os.path.splitext(os.path.basename(path))[0]
        records.append(rec)
    return records


def x_axis(records: list[dict[str, Any]]) -> tuple[str, str]:
    rate = any(run.get("request_rate") for rec in records for run in rec["runs"])
    return ("request_rate", "request rate (req/s)") if rate else ("concurrency", "concurrency")


def plot(records: list[dict[str, Any]], png: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    xkey, xlabel = x_axis(records)
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    for ax, (key, ylabel) in zip(axes.flat, PANELS, strict=True):
        for rec in records:
            pts = [(r[xkey], r[key]) for r in rec["runs"] if r.get(key) is not None]
            if pts:
                xs, ys = zip(*sorted(pts), strict=True)
                ax.plot(xs, ys, marker="o", label=rec["label"])
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    axes.flat[0].legend()
    fig.suptitle(title or "load test")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def table(records: list[dict[str, Any]]) -> str:
    """Markdown: one row per (setting, level); output tok/s also relative to the first file."""
    xkey, xlabel = x_axis(records)
    base = {r[xkey]: r["output_throughput"] for r in records[0]["runs"]}
    head = ["setting", xlabel] + [h for _, h, _ in TABLE_FIELDS] + [f"vs {records[0]['label']}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rec in records:
        for run in sorted(rec["runs"], key=lambda r: r[xkey] or 0):
            cells = [rec["label"], str(run[xkey])]
            for key, _, fmt in TABLE_FIELDS:
                value = run.get(key)
                cells.append("-" if value is None else fmt.format(value))
            ref = base.get(run[xkey])
            cells.append(f"{run['output_throughput'] / ref:.2f}" if ref else "-")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="loadtest.py JSON files (first = reference)")
    p.add_argument("--png", default=None)
    p.add_argument("--table", default=None, help="markdown file (also printed)")
    p.add_argument("--title", default="")
    args = p.parse_args(argv)
    records = load(args.runs)
    if args.png:
        plot(records, args.png, args.title)
        print(f"wrote {args.png}")
    md = table(records)
    print(md)
    if args.table:
        with open(args.table, "w") as f:
            f.write(md + "\n")


if __name__ == "__main__":
    main()
