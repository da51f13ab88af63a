"""Render the continuity suite's rows (JSON lines, $KPR_CONTINUITY_REPORT) as the
table of docs/reliability.md: ``python -m tests.continuity.report ROWS.jsonl``."""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def table(lines: list[str]) -> str:
    cells: dict[str, dict[str, tuple[int, int, int]]] = defaultdict(dict)
    order: list[str] = []
    modes: list[str] = []
    for line in lines:
        r = json.loads(line)
        if r["event"] not in cells:
            order.append(r["event"])
        if r["datapath"] not in modes:
            modes.append(r["datapath"])
        b, ok, failed = cells[r["event"]].get(r["datapath"], (0, 0, 0))
        cells[r["event"]][r["datapath"]] = (b + r["broken"], ok + r["new_ok"],
                                            failed + r["new_failed"])
    out = ["| event | " + " | ".join(modes) + " |", "|---" * (len(modes) + 1) + "|"]
    for ev in order:
        row = []
        for m in modes:
            c = cells[ev].get(m)
            row.append("—" if c is None else f"{c[0]} broken, {c[2]} of {c[1] + c[2]} new failed")
        out.append(f"| {ev} | " + " | ".join(row) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    print(table(open(sys.argv[1]).read().splitlines()))
