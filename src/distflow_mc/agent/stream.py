"""rollout.stream: a rollout rank's groups, in flight across steps.

A step adds its prompts' groups and takes its share (`quota`) of finished groups as soon
as that many are finished, instead of waiting for the slowest tool call or the longest
response: while some trajectories wait for tools (the calls run on an event loop of the
stream's own), the others generate their next turn, batched in one engine call. With
`chunk` (rollout.stream_chunk) an engine call generates at most that many tokens: the
trajectories it cut go on in the next call, from their tokens so far, so a long response
no longer holds the groups that finished (single-turn tasks stream this way).
Groups still running when the share is full go on in the next step; there they are due
(one step more would take them past trainer.max_staleness) and go first: with `drop` false
the step waits for them, with `drop` true the ones still running then are dropped and
counted.

The weights may change between steps while a group runs (and, with rollout.partial, between
a step's engine calls), so each trajectory records which version drew each of its turns
and pieces (`Trajectory.versions`). Which groups finish first depends
on the tools' timing: a streamed run is not bit-reproducible, as no asynchronous system is.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, replace
from functools import partial

from distflow_mc.agent.loop import AgentLoop, Pending, Trajectory
from distflow_mc.agent.tools import Result, Tool
from distflow_mc.data.batch import Batch
from distflow_mc.observability.metrics import Metrics
from distflow_mc.rollout.engine import RolloutEngine, SamplingParams
from distflow_mc.rollout.hf_engine import Interrupt


@dataclass
class _Group:
    uid: int
    started: int  # the step it started in
    prompt: Batch  # its prompt (one row)
    trajectories: list[Trajectory]
    running: int  # trajectories not finished


class AgentStream:
    def __init__(
        self,
        loop: AgentLoop,
        engine: RolloutEngine,
        version: Callable[[], int],
        drop: bool,
        chunk: int = 0,
        interrupt: Interrupt | None = None,
    ) -> None:
        """`version`: the engine's weight version now; `drop`: trainer.on_stale=DROP;
        `chunk`: the most tokens an engine call generates (0: a whole turn); `interrupt`
        (rollout.partial): weights that arrive during a step go in between engine calls,
        the groups in flight going on with them."""
        self.loop, self.engine, self.version, self.drop = loop, engine, version, drop
        self.chunk, self.interrupt = chunk, interrupt
        self.groups: dict[int, _Group] = {}  # by uid, in the order they started
        self.fresh: list[_Group] = []  # not generated yet
        self.ready: list[Trajectory] = []  # tools answered or turn cut: the next call
        self.owner: dict[int, _Group] = {}  # id(trajectory) -> its group
        self.answers: queue.Queue[tuple[Pending, list[Result] | BaseException]] = queue.Queue()
        # the tool calls run on one event loop of their own thread (a plain tool in a
        # daemon thread per call, as in the loop's turns)
        self.events = asyncio.new_event_loop()
        threading.Thread(target=self.events.run_forever, daemon=True, name="tools").start()

    def close(self) -> None:
        """Stop the tool calls' event loop (calls still running are abandoned)."""
        self.events.call_soon_threadsafe(self.events.stop)

    def pending(self) -> list[int]:
        """The uids of the groups started and not taken: a checkpoint hands them out again."""
        return list(self.groups)

    def take(
        self,
        prompts: Batch,
        tools: list[dict[str, Tool]],
        params: SamplingParams,
        step: int,
        quota: int,
        m: Metrics,
    ) -> tuple[list[Trajectory], Batch]:
        """Start `prompts`' groups (`params.n` trajectories each, with `tools`), run until
        `quota` groups are finished (all there are, when fewer) and none that is due still
        runs (unless dropped), and take them: due groups first, then in the order they
        started. Returns their trajectories (prompt index: the group's row in the prompts
        returned) and prompts."""
        ids = [prompts.token_slice("input_ids", i).tolist() for i in range(len(prompts))]
        trajectories = self.loop.start(ids, tools, params)
        for i in range(len(prompts)):
            own = trajectories[i * params.n : (i + 1) * params.n]
            uid = int(prompts.samples["uid"][i])
            group = _Group(uid, step, prompts.select([i]), own, len(own))
            self.groups[uid] = group
            self.fresh.append(group)
            self.owner.update((id(t), group) for t in own)
        calls = 0
        while not self._full(step, quota):
            self._harvest(block=not (self.fresh or self.ready))
            if self.interrupt is not None and self.interrupt.pending():
                self.interrupt.apply()
            if self.fresh or self.ready:
                calls += self._generate(replace(params, seed=params.seed + 1_000_003 * calls))
        m.add_total("stream/engine_calls", calls)
        taken = self._select(step, quota, m)
        done = []
        for j, g in enumerate(taken):
            for t in g.trajectories:
                t.prompt = j
                done.append(t)
        return done, Batch.concat([g.prompt for g in taken]) if taken else prompts.select([])

    def _full(self, step: int, quota: int) -> bool:
        finished = sum(g.running == 0 for g in self.groups.values())
        due = any(g.running and g.started < step for g in self.groups.values())
        return finished >= min(quota, len(self.groups)) and (self.drop or not due)

    def _harvest(self, block: bool) -> None:
        """The answers the call threads have put (waiting for one when `block`)."""
        while True:
            try:
                p, results = self.answers.get(block=block)
            except queue.Empty:
                return
            block = False
            if isinstance(results, BaseException):
                raise RuntimeError(f"a tool call thread failed: {results}") from results
            group = self.owner.get(id(p.trajectory))
            if group is None:  # its group was dropped
                continue
            if self.loop.append(p, results):
                self.ready.append(p.trajectory)
            else:
                group.running -= 1

    def _generate(self, params: SamplingParams) -> int:
        """One engine call: the fresh groups' first turns (each prompt's rows encoded once by
        the engine) with the trajectories whose tools answered or whose turn goes on; their
        tool calls go to the event loop. Returns the engine calls made."""
        active = [t for g in self.fresh for t in g.trajectories] + self.ready
        self.fresh, self.ready = [], []
        version = self.version()
        for t in active:
            t.versions.append((len(t.ids), version))
        pending = self.loop.turn(self.engine, active, params, chunk=self.chunk)
        going = {id(p.trajectory) for p in pending}
        for t in active:
            if id(t) not in going:
                self.owner[id(t)].running -= 1
        for p in pending:
            if p.more:  # cut at the piece's end: goes on in the next call
                self.ready.append(p.trajectory)
            elif p.calls:
                future = asyncio.run_coroutine_threadsafe(self.loop.call([p]), self.events)
                future.add_done_callback(partial(self._answered, p))
            else:  # only unparsable calls: answered at once
                self.answers.put((p, []))
        return 1

    def _answered(self, p: Pending, future: Future) -> None:
        error = future.exception()
        self.answers.put((p, future.result() if error is None else error))

    def _select(self, step: int, quota: int, m: Metrics) -> list[_Group]:
        """The groups this step takes, out of the stream; the due ones still running
        dropped (only with `drop`: otherwise the step waited for them)."""
        groups = list(self.groups.values())
        due = [g for g in groups if g.started < step]
        dropped = [g for g in due if g.running]
        finished = [g for g in due if not g.running]
        finished += [g for g in groups if g.started >= step and not g.running]
        taken = finished[:quota]
        for g in dropped + taken:
            del self.groups[g.uid]
            for t in g.trajectories:
                self.owner.pop(id(t), None)
        if dropped:
            gone = {id(t) for g in dropped for t in g.trajectories}
            self.ready = [t for t in self.ready if id(t) not in gone]
        m.add_total("stream/dropped_groups", len(dropped))
        m.add_total("stream/deferred_groups", sum(g.started == step for g in self.groups.values()))
        m.add_total("stream/due_groups", len(due) - len(dropped))
        return taken
