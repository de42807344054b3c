"""Rank layouts of the two phases (rollout, train) and which roles run in which.

Pure arithmetic, computed alike on every rank before any process group exists, so a bad
layout is an error on every rank before anything can hang.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from distflow_mc.config.schema import Config, Engine, OnStale, Placement
from distflow_mc.dag import Plan, Role


@dataclass(frozen=True)
class Layout:
    """DP x TP x PP x CP over `world_size` ranks, in megatron-core's default order
    (tp-cp-dp-pp: TP varies fastest, PP slowest), and which ranks of a replica hold the
    batch in this phase: all of them (`replicated`: every rank of a model replica feeds it
    the same inputs) or only the replica's emitter (a rollout engine's host). The name is
    for display only: two layouts are equal when ranks and holders are."""

    name: str = field(compare=False)
    dp: int
    tp: int = 1
    pp: int = 1
    cp: int = 1
    replicated: bool = False
    first: int = 0  # its ranks are first .. first + world_size - 1 of the world

    @property
    def world_size(self) -> int:
        """The ranks of this layout (all of the world's, unless it covers a group of it)."""
        return self.dp * self.tp * self.pp * self.cp

    @property
    def ranks(self) -> range:
        return range(self.first, self.first + self.world_size)

    def coords(self, rank: int) -> dict[str, int]:
        assert rank in self.ranks, (rank, self)
        local = rank - self.first
        tp, rest = local % self.tp, local // self.tp
        cp, rest = rest % self.cp, rest // self.cp
        dp, pp = rest % self.dp, rest // self.dp
        return {"dp": dp, "tp": tp, "pp": pp, "cp": cp}

    def emitters(self) -> list[int]:
        """One rank per DP replica sends data: TP rank 0, CP rank 0 of the last PP stage."""
        return [
            r
            for r in self.ranks
            if (c := self.coords(r))["tp"] == 0 and c["cp"] == 0 and c["pp"] == self.pp - 1
        ]

    def replicas(self) -> list[list[int]]:
        """Ranks of each data-parallel replica (one model copy), by DP index."""
        out: list[list[int]] = [[] for _ in range(self.dp)]
        for r in self.ranks:
            out[self.coords(r)["dp"]].append(r)
        return out

    def holders(self) -> set[int]:
        """The ranks that hold the batch in this phase."""
        return set(self.ranks) if self.replicated else set(self.emitters())

    def describe(self) -> str:
        parts = [f"DP={self.dp}", f"TP={self.tp}"]
        if self.pp > 1 or self.name == "train":
            parts.append(f"PP={self.pp}")
        if self.cp > 1:
            parts.append(f"CP={self.cp}")
        return " x ".join(parts)


class Move(Enum):
    """What it takes to hand a batch from one phase's layout to the next."""

    NONE = "none"  # every rank that needs the batch already holds it
    BROADCAST = "broadcast"  # same replicas: each replica's copy reaches its other ranks
    EXCHANGE = "all-to-all"  # samples change replicas


def movement(src: Layout, dst: Layout) -> Move:
    """Decided from the full layouts (rank -> replica maps and who holds the batch), the
    same on every rank."""
    if src.replicas() != dst.replicas():
        return Move.EXCHANGE
    return Move.NONE if dst.holders() <= src.holders() else Move.BROADCAST


@dataclass(frozen=True)
class Layouts:
    rollout: Layout
    train: Layout

    def for_role(self, role: Role | None) -> Layout:
        """Rollouts and their rule rewards stay where they were generated; everything else
        (model passes, advantages, training) runs in the train layout."""
        return self.rollout if role in (Role.ROLLOUT, Role.REWARD) else self.train


def build_layouts(config: Config, world_size: int, ranks_per_node: int | None = None) -> Layouts:
    """Derive both layouts; ValueError names the settings when a group does not divide or
    a rollout TP group would span nodes (`ranks_per_node`: torchrun's LOCAL_WORLD_SIZE).
    COLOCATED: both cover the world. SEPARATE: the train layout covers the first ranks (rank
    0 trains: it writes the metrics and checkpoints), the rollout layout the last
    `rollout.ranks`."""
    p, r = config.parallel, config.rollout
    separate = r.placement is Placement.SEPARATE
    rollout_n = r.ranks if separate else world_size
    train_n = world_size - r.ranks if separate else world_size
    if train_n < 1:
        raise ValueError(
            f"rollout.ranks={r.ranks} leaves no rank to train in a world of {world_size}: lower"
            " it or add ranks"
        )
    trains = f"the {train_n} train ranks (world {world_size} - rollout.ranks {r.ranks})"
    rolls = f"the {rollout_n} rollout ranks (rollout.ranks)"
    trains, rolls = (trains, rolls) if separate else (f"world size {world_size}",) * 2
    model_parallel = p.tp * p.pp * p.cp
    if train_n % model_parallel:
        raise ValueError(
            f"{trains} is not divisible by parallel.tp x parallel.pp x parallel.cp"
            f" = {p.tp} x {p.pp} x {p.cp} = {model_parallel}: change those settings or the number"
            " of ranks (--nnodes x --nproc-per-node)"
        )
    if rollout_n % r.tp:
        raise ValueError(
            f"{rolls} is not divisible by rollout.tp = {r.tp}: change rollout.tp"
            " or the number of ranks"
        )
    first = train_n if separate else 0
    per_node = ranks_per_node or world_size
    spans = any(g // per_node != (g + r.tp - 1) // per_node for g in range(first, world_size, r.tp))
    if r.engine is Engine.SGLANG and spans:
        raise ValueError(
            f"rollout.tp={r.tp} would make a rollout TP group span nodes ({per_node} ranks per"
            " node): an SGLang engine serves the GPUs of one node here (weights reach it as"
            " tensor handles, which cannot cross nodes); use rollout.tp <= ranks per node,"
            " dividing it" + (" and rollout.ranks" if separate else "")
        )
    rollout_dp = rollout_n // r.tp
    if config.data.batch_size % rollout_dp:
        raise ValueError(
            f"data.batch_size = {config.data.batch_size} prompts must split evenly over the"
            f" {rollout_dp} rollout data-parallel ranks ({rolls} / rollout.tp {r.tp})"
        )
    train_dp = train_n // model_parallel
    if train_dp % p.ep:
        raise ValueError(
            f"parallel.ep={p.ep} must divide the train data-parallel size {train_dp} ({trains}"
            f" / parallel.tp x pp x cp {model_parallel}): experts are split over data-parallel"
            " replicas"
        )
    if config.data.batch_size < train_dp and not config.algo.dynamic_sampling:
        raise ValueError(
            f"data.batch_size = {config.data.batch_size} prompts (groups) cannot give each of the"
            f" {train_dp} training data-parallel replicas ({trains} / parallel.tp x"
            f" pp x cp {model_parallel}) a group: raise data.batch_size or the model-parallel"
            " sizes"
        )
    return Layouts(
        rollout=Layout("rollout", dp=rollout_dp, tp=r.tp, first=first),
        train=Layout("train", dp=train_dp, tp=p.tp, pp=p.pp, cp=p.cp, replicated=True),
    )


def describe_plan(
    plan: Plan,
    layouts: Layouts,
    keep: list[frozenset[str] | None] | None = None,
    early: list[frozenset[str] | None] | None = None,
    stage_reads: tuple[frozenset[str] | None, ...] | None = None,
) -> list[str]:
    """Human-readable plan: stages, nodes, the layout each node runs in, how the batch
    reaches a node whose layout differs from the one before it (as the step runs them) and,
    given `keep`/`early` (per node, from stages.fields.carried), which fields that move
    carries and which leave early; then the nodes liveness dropped, with the reason, and
    what each pipeline stage of the train layout receives (`stage_reads`)."""
    keep = keep or [None] * len(plan.nodes)
    early = early or [None] * len(plan.nodes)
    lines, before, index = [], layouts.rollout, {n.id: i for i, n in enumerate(plan.nodes)}
    for i, stage in enumerate(plan.stages):
        lines.append(f"stage {i}:")
        for node in stage:
            role = node.role.name if node.role else "-"
            layout = layouts.for_role(node.role)
            move = movement(before, layout) if layout != before else Move.NONE
            moves = f" ({move.value} in)" if move is not Move.NONE else ""
            carries, sends = keep[index[node.id]], early[index[node.id]]
            if moves and carries is not None:
                moves = f" ({move.value} in: {', '.join(sorted(carries))})"
            if sends:
                moves += f" (then starts sending {', '.join(sorted(sends))})"
            before = layout
            deps = ", ".join(node.deps) or "-"
            fn = f" fn={node.fn}" if node.fn else ""
            lines.append(
                f"  {node.id:<16} {role:<9} {node.type.name:<15} layout={layout.name}"
                f" deps=[{deps}]{fn}{moves}"
            )
    lines += [f"dropped {node_id}: {reason}" for node_id, reason in plan.dropped]
    for pp, reads in enumerate(stage_reads or ()):
        got = "all it carries" if reads is None else ", ".join(sorted(reads)) or "no fields"
        lines.append(f"train pipeline stage {pp} receives {got} (and the lengths, uid, group)")
    separate = layouts.rollout.ranks != layouts.train.ranks
    for layout in (layouts.rollout, layouts.train):
        roles = sorted(
            {
                n.role.name if n.role else "COMPUTE"
                for n in plan.nodes
                if layouts.for_role(n.role) is layout
            }
        )
        where = f" (ranks {layout.ranks[0]}-{layout.ranks[-1]})" if separate else ""
        lines.append(
            f"layout {layout.name}: {layout.describe()} over {layout.world_size} rank(s){where};"
            f" roles {', '.join(roles) or '-'}; data emitted by ranks {layout.emitters()}"
        )
    return lines


def describe_placement(config: Config, layouts: Layouts) -> list[str]:
    """rollout.placement=SEPARATE: who sends what to whom, when, and the staleness bound."""
    if config.rollout.placement is Placement.COLOCATED:
        return []
    k, r, t = config.trainer.max_staleness, layouts.rollout, layouts.train
    n, stream = config.trainer.weight_sync_every, config.rollout.stream
    engines = [g[0] for g in r.replicas()]
    a = k - stream  # how far the rollout runs ahead
    version = f"max(0, t - {a})" if n == 1 else f"max(0, (t - {a}) // {n} x {n})"
    started = "the groups started for batch t are" if stream else "batch t is"
    lines = [
        f"placement SEPARATE: ranks {t.ranks[0]}-{t.ranks[-1]} train while ranks"
        f" {r.ranks[0]}-{r.ranks[-1]} generate; {started} generated by the actor after"
        f" {version} optimizer steps (trainer.max_staleness={k}, at most {k + n - 1} behind)",
        f"  data: each scored batch, rollout emitters {r.emitters()} -> train ranks"
        f" {t.ranks[0]}-{t.ranks[-1]} by all-to-all on its own group (a thread each side: one"
        " batch waits to leave while the next generates)",
        f"  weights: after each {'' if n == 1 else f'{n}th '}optimizer step a batch still"
        f" needs, rank {t.ranks[0]} -> engines"
        f" on ranks {engines} by broadcast in buckets of {config.rollout.weight_sync_bucket_mb}"
        " MB on its own group (received while generating)",
    ]
    if stream:
        then = "waits for it" if config.trainer.on_stale is OnStale.WAIT else "drops it"
        c = config.rollout.stream_chunk
        pieces = f"; engine calls of at most {c} tokens (rollout.stream_chunk)" if c else ""
        lines.append(
            "  stream: a step takes its share of finished groups; one still running goes on"
            f" into the next step, which {then} if it still runs then (trainer.on_stale)" + pieces
        )
    return lines
