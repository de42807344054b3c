"""What every benchmark does last: write its rows to CSV, then print them as a table."""

from __future__ import annotations

import csv
from pathlib import Path


def report(rows: list[dict], csv_path: str | Path, width: int = 16) -> None:
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    if len(rows[0]) > 12:  # wide: one line per column
        name = max(len(k) for k in rows[0])
        for k in rows[0]:
            print(f"{k:>{name}} | " + " | ".join(f"{row[k]!s:>{width}}" for row in rows))
        return
    print(" | ".join(f"{k:>{width}}" for k in rows[0]))
    for row in rows:
        print(" | ".join(f"{v!s:>{width}}" for v in row.values()))
