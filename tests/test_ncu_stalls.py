"""benchmarks/ncu_stalls.py on a small CSV in the layout of an ncu SASS export."""

from __future__ import annotations

import csv
from pathlib import Path

from benchmarks.ncu_stalls import summarise

HEADER = ["Address", "Source", "# Samples", "Instructions Executed", "stall_wait",
          "stall_selected", "stall_wait (Not Issued)"]
ROWS = [["0x0", "      HADD2 R1, R2, R3", "6", "30", "4", "2", "4"],
        ["0x10", "  @P0 PRMT R4, R5, 0x7654, R6", "2", "10", "0", "2", "0"],
        ["0x20", "", "", "", "", "", ""]]


def test_summarise_counts_stall_reasons_and_opcodes(tmp_path: Path) -> None:
    path = tmp_path / "sass.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Kernel Name", "_kivi_attend_context"])
        writer.writerow(HEADER)
        writer.writerows(ROWS)
    lines = summarise(str(path)).splitlines()
    assert lines[0].endswith(": 8 warp samples")  # the "(Not Issued)" column is left out
    assert lines[1].split() == ["stall_wait", "4", "50.0%"]
    assert lines[2].split() == ["stall_selected", "4", "50.0%"]
    ops = {line.split()[0]: line.split()[1:] for line in lines[4:]}
    assert ops == {"HADD2": ["75.0%", "75.0%"], "PRMT": ["25.0%", "25.0%"]}
