"""Draw a run's curves (reward, validation reward, entropy, KL, response length) to PNG.

python scripts/plot_metrics.py outputs/<run id>/metrics.jsonl [out.png]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

PANELS = [
    ("reward", ["reward/mean"], "val/"),
    ("entropy", ["actor/entropy"], None),
    ("KL to reference", ["actor/kl", "actor/kl_in_reward"], None),
    ("response length", ["response/length_mean"], None),
]


def plot(metrics: Path, out: Path) -> Path:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.5 * len(PANELS), 3.5))
    for ax, (title, keys, prefix) in zip(axes, PANELS, strict=True):
        names = keys + sorted({k for r in rows for k in r if prefix and k.startswith(prefix)})
        for key in names:
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                ax.plot(
                    *zip(*points, strict=True),
                    marker="." if key.startswith("val/") else None,
                    label=key,
                )
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


if __name__ == "__main__":
    source = Path(sys.argv[1])
    target = Path(sys.argv[2]) if len(sys.argv) > 2 else source.with_suffix(".png")
    print(f"wrote {plot(source, target)}")
