"""A model of the per-step data and control path from 8 to 1,024 GPUs, calibrated on the
counts scripts/bench_scale.py measures at 2-32 ranks, next to a single-controller design.

    python scripts/scale_model.py                       # the measured counts below, H100 links
    python scripts/scale_model.py --measured bench_scale.csv --plot scale_model.png

Measured (bench_scale.py, weak scaling: every rank the same samples): what each rank
receives per step in each phase, as a function of the rank count N. Fitted per phase:
bytes received per rank = a + b x (N - 1), per sample (the metadata all-gather) or per step
(metrics); the batch's own fields (the all-to-all, the TP broadcast) per token, bounded
(their most per token at 2-32 ranks); calls per step likewise.
Modelled: each collective's time from a link model (latency + bytes / bandwidth; NVLink
within a node of `--gpus-per-node`, the inter-node fabric beyond; ring all-gather,
pairwise all-to-all, pipelined broadcast), for 7B-, 32B- and 72B-like settings (the
DistFlow paper's: 8 GPUs per node, global batch proportional to nodes, long responses),
against the compute of a step (training and two forward passes at a stated MFU). The
single controller moves the whole batch into one process and out again through that
process's network share and makes a few calls per worker per step (the inputs say how
fast). Prints, per setting and N: our data+control ms per step and its share of the step,
the single controller's, the scaling efficiency (compute / (compute + data path)), and
the phase whose per-rank time grows first with N; plots both.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

# the fields a GRPO step moves per token (ids int64, response mask and engine log-probs
# float32): what a single controller takes in and hands out
BYTES_PER_TOKEN = 16

# bench_scale.py's rows on this machine (2-32 gloo ranks): the defaults
MEASURED = """\
ranks,phase,collective,calls,received_max,tokens_per_rank,samples_per_rank
2,agreement,all_gather_single,1.0,32,21298,32
2,metrics,all_gather,2.0,2365,21298,32
2,redistribute,all_gather_single,1.0,760,21298,32
2,redistribute,all_to_all_single,1.0,367704,21298,32
2,weights,broadcast,14.0,16777500,21298,32
4,agreement,all_gather_single,1.0,96,16298,32
4,metrics,all_gather,2.0,7095,16298,32
4,redistribute,all_gather_single,1.0,2280,16298,32
4,redistribute,all_to_all_single,1.0,442744,16298,32
4,redistribute,broadcast,1.0,522832,16298,32
4,weights,broadcast,14.0,16777500,16298,32
8,agreement,all_gather_single,1.0,224,18590,32
8,metrics,all_gather,2.0,16555,18590,32
8,redistribute,all_gather_single,1.0,5320,18590,32
8,redistribute,all_to_all_single,1.0,596136,18590,32
8,redistribute,broadcast,1.0,596616,18590,32
8,weights,broadcast,14.0,16777500,18590,32
16,agreement,all_gather_single,1.0,480,19780,32
16,metrics,all_gather,2.0,35475,19780,32
16,redistribute,all_gather_single,1.0,11400,19780,32
16,redistribute,all_to_all_single,1.0,633912,19780,32
16,redistribute,broadcast,1.0,635312,19780,32
16,weights,broadcast,14.0,16777500,19780,32
32,agreement,all_gather_single,1.0,992,18432,32
32,metrics,all_gather,2.0,73315,18432,32
32,redistribute,all_gather_single,1.0,23560,18432,32
32,redistribute,all_to_all_single,1.0,592784,18432,32
32,redistribute,broadcast,1.0,592784,18432,32
32,weights,broadcast,14.0,16777500,18432,32
"""


@dataclass(frozen=True)
class Links:
    gpus_per_node: int = 8
    intra_latency_s: float = 3e-6  # NVLink 4 (H100/H200), per message
    intra_bw: float = 360e9  # B/s, NCCL bus bandwidth within a node
    inter_latency_s: float = 8e-6  # InfiniBand NDR, per message
    inter_bw: float = 45e9  # B/s per GPU (8 x 400 Gb/s per node, NCCL bus bandwidth)
    driver_bw: float = 25e9  # B/s into and out of one controller process
    driver_call_s: float = 1e-4  # one remote call from the controller to a worker
    calls_per_worker: int = 5  # per step (generate, score, passes, train, sync)


@dataclass(frozen=True)
class Setting:
    name: str
    params: float
    prompt: int  # tokens
    response: int  # tokens
    samples_per_gpu: int
    mfu: float = 0.4
    peak_flops: float = 989e12  # H100 bf16 dense

    @property
    def tokens_per_gpu(self) -> int:
        return self.samples_per_gpu * (self.prompt + self.response)

    def compute_s(self) -> float:
        """Training (6 P T) and the reference and old log-prob passes (2 P T each); the
        generation, longer still, is left out: the shares below are upper bounds."""
        return 10 * self.params * self.tokens_per_gpu / (self.mfu * self.peak_flops)


SETTINGS = (
    Setting("7B", 7.6e9, 1024, 4096, 16),
    Setting("32B", 32.8e9, 1024, 8192, 8),
    Setting("72B", 72.7e9, 1024, 16384, 4),
)


@dataclass(frozen=True)
class Fit:
    """received bytes per rank per step = (a + b (N - 1)) x unit, calls = c + d (N - 1)."""

    a: float
    b: float
    c: float
    d: float

    def bytes(self, n: int, unit: float) -> float:
        return (self.a + self.b * (n - 1)) * unit

    def calls(self, n: int) -> float:
        return self.c + self.d * (n - 1)


def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least squares y = a + b (N - 1) over (N, y)."""
    xs = [n - 1 for n, _ in points]
    ys = [y for _, y in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0
    return my - b * mx, b


# phase -> (bench_scale.csv phase, collective, what its bytes scale with); the phases in
# FLAT move a rank's own share, bounded whatever N (weak scaling): modelled at the most
# measured per unit, not extrapolated from the load balance's noise at 2-32 ranks
FLAT = ("exchange", "tp_broadcast")
PARTS = {
    "meta": ("redistribute", "all_gather_single", "samples_per_rank"),
    "exchange": ("redistribute", "all_to_all_single", "tokens_per_rank"),
    "tp_broadcast": ("redistribute", "broadcast", "tokens_per_rank"),
    "metrics": ("metrics", "all_gather", None),
}


def read_rows(path: str) -> list[dict[str, str]]:
    """bench_scale.csv's rows; the ones measured here (MEASURED) when there is no file."""
    if not Path(path).is_file():
        return list(csv.DictReader(io.StringIO(MEASURED)))
    with open(path) as f:
        return list(csv.DictReader(f))


def points(rows: list[dict[str, str]], name: str) -> list[tuple[int, float, float, float]]:
    """(ranks, received bytes, calls, unit) of phase `name` per measured rank count."""
    phase, collective, unit = PARTS[name]
    return [
        (int(r["ranks"]), float(r["received_max"]), float(r["calls"]), float(r.get(unit, 1)))
        for r in rows
        if r["phase"] == phase and r["collective"] == collective
    ]


def load(rows: list[dict[str, str]]) -> dict[str, Fit]:
    """Per phase, the fitted bytes per unit (meta: per sample; exchange: per token; the
    rest: per step) and calls."""
    fits = {}
    for name in PARTS:
        got = points(rows, name)
        if not got:  # not in this run (the redistribution chose a pattern without it)
            fits[name] = Fit(0.0, 0.0, 0.0, 0.0)
            continue
        per_unit = [(n, received / unit) for n, received, _, unit in got]
        calls = fit([(n, c) for n, _, c, _ in got])
        if name in FLAT:
            fits[name] = Fit(max(y for _, y in per_unit), 0.0, *calls)
        else:
            fits[name] = Fit(*fit(per_unit), *calls)
    return fits


def collective_s(kind: str, n: int, received: float, calls: float, links: Links) -> float:
    """Time of `calls` collectives of `kind` over n ranks delivering `received` bytes to
    each rank: latency per step of the algorithm, bytes over the slowest link crossed."""
    g = links.gpus_per_node
    inter = n > g
    lat = links.inter_latency_s if inter else links.intra_latency_s
    if kind == "all_gather":  # ring: n - 1 steps, each rank receives `received`
        bw = links.inter_bw if inter else links.intra_bw
        return calls * (n - 1) * lat + received / bw
    if kind == "tp_broadcast":  # within a node: a replica's batch to its TP peers
        return calls * links.intra_latency_s + received / links.intra_bw
    if kind == "all_to_all":  # pairwise: n - 1 exchanges; off-node bytes over the fabric
        off = max(0.0, 1 - g / n) if inter else 0.0
        return calls * (n - 1) * lat + received * (
            off / links.inter_bw + (1 - off) / links.intra_bw
        )
    raise ValueError(kind)


def ours(s: Setting, n: int, fits: dict[str, Fit], links: Links) -> dict[str, float]:
    """Seconds per step of each phase of our data and control path at n GPUs."""
    meta, exchange, metrics = fits["meta"], fits["exchange"], fits["metrics"]
    tp = fits["tp_broadcast"]
    return {
        "meta": collective_s(
            "all_gather", n, meta.bytes(n, s.samples_per_gpu), meta.calls(n), links
        ),
        "exchange": collective_s(
            "all_to_all", n, exchange.bytes(n, s.tokens_per_gpu), exchange.calls(n), links
        ),
        "tp_broadcast": collective_s(
            "tp_broadcast", n, tp.bytes(n, s.tokens_per_gpu), tp.calls(n), links
        ),
        "metrics": collective_s("all_gather", n, metrics.bytes(n, 1), metrics.calls(n), links),
    }


def weights_s(s: Setting, n: int, links: Links) -> float:
    """A version of the actor (bf16) from one train rank to the engines of a rollout group
    of a quarter of the GPUs (TP=8 engines), pipelined broadcast; overlapped with
    generation by the receiver thread, so reported apart."""
    engines = max(1, n // 4 // links.gpus_per_node)
    lat = links.inter_latency_s
    return math.ceil(math.log2(engines + 1)) * lat + 2 * s.params / links.inter_bw


def single(s: Setting, n: int, fits: dict[str, Fit], links: Links) -> float:
    """The batch's fields into one controller and out to the workers, plus its calls."""
    moved = 2 * n * s.tokens_per_gpu * BYTES_PER_TOKEN
    return moved / links.driver_bw + n * links.calls_per_worker * links.driver_call_s


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--measured", default="bench_scale.csv")
    parser.add_argument("--plot", default="scale_model.png")
    parser.add_argument("--gpus", type=int, nargs="*", default=[8 * 2**k for k in range(8)])
    args = parser.parse_args()
    links = Links()
    rows = read_rows(args.measured)
    fits = load(rows)
    for name, f in fits.items():
        print(
            f"fit {name}: bytes per unit {f.a:.3g} + {f.b:.3g} (N - 1),"
            f" calls {f.c:.3g} + {f.d:.3g} (N - 1)"
        )
    print("bytes received per rank per step, measured -> fitted:")
    for name in PARTS:
        pairs = [
            f"{n}: {received:.0f} -> {fits[name].bytes(n, unit):.0f}"
            for n, received, _, unit in points(rows, name)
        ]
        print(f"  {name:>12}  " + ", ".join(pairs))
    table = []
    for s in SETTINGS:
        compute = s.compute_s()
        for n in args.gpus:
            phases = ours(s, n, fits, links)
            t, c = sum(phases.values()), single(s, n, fits, links)
            table.append(
                {
                    "setting": s.name,
                    "gpus": n,
                    "compute_s": f"{compute:.1f}",
                    "ours_ms": f"{1e3 * t:.2f}",
                    "ours_share": f"{t / (compute + t):.2%}",
                    "largest": max(phases, key=phases.get),
                    "weights_s": f"{weights_s(s, n, links):.2f}",
                    "single_ms": f"{1e3 * c:.0f}",
                    "single_share": f"{c / (compute + c):.1%}",
                    "efficiency": f"{compute / (compute + t):.3f}",
                }
            )
    keys = list(table[0])
    print(" | ".join(f"{k:>12}" for k in keys))
    for row in table:
        print(" | ".join(f"{row[k]!s:>12}" for k in keys))
    growth = {k: fits[k].b / max(fits[k].a, 1e-12) for k in fits}
    print("per-rank bytes grow with N fastest in:", max(growth, key=growth.get))
    if args.plot:
        plot(rows, fits, links, args.gpus, args.plot)


def plot(rows: list, fits: dict[str, Fit], links: Links, gpus: list[int], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in PARTS:
        got = points(rows, name)
        if not got:
            continue
        left.scatter([p[0] for p in got], [p[1] for p in got], label=f"{name} (measured)")
        ns, unit = [2, *gpus], got[-1][3]
        left.plot(ns, [fits[name].bytes(n, unit) for n in ns], "--", label=f"{name} (model)")
    left.set(xscale="log", yscale="log", xlabel="ranks", ylabel="bytes received per rank per step")
    left.set_title("measured at 2-32 ranks, fitted")
    left.legend(fontsize=7)
    for s in SETTINGS:
        right.plot(
            gpus,
            [1e3 * sum(ours(s, n, fits, links).values()) for n in gpus],
            label=f"ours {s.name}",
        )
        right.plot(
            gpus,
            [1e3 * single(s, n, fits, links) for n in gpus],
            ":",
            label=f"single controller {s.name}",
        )
    right.set(xscale="log", yscale="log", xlabel="GPUs", ylabel="data + control ms per step")
    right.set_title("modelled (H100/H200 links)")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print("wrote", path)


if __name__ == "__main__":
    main()
