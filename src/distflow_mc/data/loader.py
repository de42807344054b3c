"""Per-rank prompt loader: each rollout data-parallel rank reads only its share.

The global order of an epoch is a seeded permutation every rank computes alike; step s
of an epoch covers positions [s*B, (s+1)*B) of it, and rank r of D takes its contiguous
B/D slice. The state (epoch, prompts consumed) is layout-free, so a run resumes on any
number of ranks without repeating or skipping a prompt. The next batch is read and
tokenised in a background thread while the current step runs.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from distflow_mc.agent.loop import row_tools
from distflow_mc.agent.tools import Tool, schema
from distflow_mc.config.schema import DataConfig, OnBadRow
from distflow_mc.data.batch import Batch
from distflow_mc.data.dataset import MalformedRow, PromptRow, RowSource, validate_row
from distflow_mc.data.images import ImageInputs
from distflow_mc.rollout.engine import Images

log = logging.getLogger(__name__)


@dataclass
class LoaderState:
    epoch: int = 0
    consumed: int = 0  # prompts of this epoch handed out, over all ranks
    # prompts (uids) handed out but not trained when the state was saved (rollout.stream
    # defers groups): the next batch is these, shared by the ranks, then the order goes on
    pending: list[int] = field(default_factory=list)


@dataclass
class PromptBatch:
    batch: Batch  # input_ids per prompt; uid = group = epoch * rows + row
    malformed: int  # rows skipped by this rank for this batch
    overlong: int


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str | list[dict[str, str]],
    tools: list[dict[str, Any]] | None = None,
) -> list[int]:
    """Chat template for messages (with the generation prompt and the offered tools'
    schemas), plain text otherwise. Rendering to text first works alike on transformers
    4.x and 5.x."""
    if isinstance(prompt, list):
        prompt = tokenizer.apply_chat_template(
            prompt, tools=tools, tokenize=False, add_generation_prompt=True
        )
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


class PromptLoader:
    def __init__(
        self,
        config: DataConfig,
        tokenizer: PreTrainedTokenizerBase,
        dp_rank: int,
        dp_size: int,
        seed: int,
        state: LoaderState | None = None,
        tools: dict[str, Tool] | None = None,
        images: ImageInputs | None = None,
    ) -> None:
        """`tools`: agent rollouts' tools; a row's `tools` column may offer some of them
        (all when it has none), and the prompt renders their schemas. `images`: a
        vision-language model's; each prompt then has its images (data/images.py), or
        None."""
        self.config, self.tokenizer, self.seed = config, tokenizer, seed
        self.tools, self.images = tools, images
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.source = RowSource(config.train_files)
        if config.batch_size % dp_size:
            raise ValueError(f"data.batch_size={config.batch_size} is not divisible by {dp_size}")
        if len(self.source) < config.batch_size:
            raise ValueError(
                f"data.batch_size={config.batch_size} is larger than the dataset"
                f" ({len(self.source)} rows in data.train_files)"
            )
        self.state = state or LoaderState()
        self._pool = (
            ThreadPoolExecutor(1, thread_name_prefix="prefetch") if config.prefetch else None
        )
        self._ahead: tuple[LoaderState, Future] | None = None

    def order(self, epoch: int) -> np.ndarray:
        n = len(self.source)
        if not self.config.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def _advance(self, state: LoaderState) -> LoaderState:
        if state.pending:
            return replace(state, pending=[])
        consumed = state.consumed + self.config.batch_size
        if consumed + self.config.batch_size > len(self.source):
            return LoaderState(state.epoch + 1, 0)
        return LoaderState(state.epoch, consumed)

    def uids_for(self, state: LoaderState) -> list[int]:
        """The prompts (uid = epoch * rows + row) this rank reads for the step at `state`."""
        if state.pending:
            return state.pending[self.dp_rank :: self.dp_size]
        share = self.config.batch_size // self.dp_size
        start = state.consumed + self.dp_rank * share
        rows = self.order(state.epoch)[start : start + share].tolist()
        return [state.epoch * len(self.source) + row for row in rows]

    def batch_at(self, state: LoaderState) -> PromptBatch:
        """This rank's prompts of the step at `state` (the state does not move)."""
        uids = self.uids_for(state)
        rows = [uid % len(self.source) for uid in uids]
        ids, kept, pictures, skipped = [], [], [], {"malformed": 0, "overlong": 0}
        for uid, index, raw in zip(uids, rows, self.source.read(rows), strict=True):
            got = self._encode(index, raw, warn=True)
            if isinstance(got, str):
                skipped[got] += 1
                continue
            ids.append(torch.tensor(got[0], dtype=torch.int64, device="cpu"))
            kept.append((uid, got[1]))
            pictures.append(got[2])
        batch = self._to_batch(ids, kept)
        if self.images is not None:
            batch.objects["images"] = pictures
        return PromptBatch(batch, skipped["malformed"], skipped["overlong"])

    def _encode(
        self, index: int, raw: dict[str, Any], warn: bool
    ) -> tuple[list[int], PromptRow, Images | None] | str:
        """A row's prompt tokens, fields and images, or why it is skipped ("malformed",
        "overlong"); raises where data.on_malformed / data.on_overlong say ERROR."""
        path, row = self.source.locate(index)
        where = f"{path} row {row}"
        pictures = None
        try:
            parsed = validate_row(raw, where)
            schemas = self._schemas(parsed, where)
            if self.images is not None:
                parsed, pictures = self.images.take(parsed, where)
        except MalformedRow as e:
            if self.config.on_malformed is OnBadRow.ERROR:
                raise
            if warn:
                log.warning("skipping malformed row (data.on_malformed=SKIP): %s", e)
            return "malformed"
        tokens = encode_prompt(self.tokenizer, parsed.prompt, schemas)
        if len(tokens) > self.config.max_prompt_length:
            if self.config.on_overlong is OnBadRow.ERROR:
                raise ValueError(
                    f"{where}: prompt has {len(tokens)} tokens > data.max_prompt_length="
                    f"{self.config.max_prompt_length}"
                )
            return "overlong"
        return tokens, parsed, pictures

    def check_usable(self, key: str, probe: int = 32) -> None:
        """At start-up, on every rank alike: each file has a usable row among `probe` rows
        spread evenly over it, else ValueError naming the file, what was wrong with the
        rows and the setting to change (`key`: where the files are set)."""
        for path, rows in self.source.files().items():
            n = len(rows)
            picked = sorted({rows[k * n // min(probe, n)] for k in range(min(probe, n))})
            raws = self.source.read(picked)
            why = [self._encode(i, raw, warn=False) for i, raw in zip(picked, raws, strict=True)]
            if all(isinstance(w, str) for w in why):
                overlong, malformed = why.count("overlong"), why.count("malformed")
                raise ValueError(
                    f"{key}: {path} has no usable row among {len(picked)} spread over its {n}"
                    f" rows: {overlong} longer than data.max_prompt_length="
                    f"{self.config.max_prompt_length} tokens, {malformed} malformed"
                    " (data.on_malformed=ERROR names the first); raise data.max_prompt_length"
                    " or fix the file"
                )

    def _schemas(self, row: PromptRow, where: str) -> list[dict[str, Any]] | None:
        """The tool schemas the row's prompt renders: its `tools` column, else every tool."""
        if self.tools is None:
            return None
        try:
            offered = row_tools(row.extra)
        except ValueError as e:
            raise MalformedRow(f"{where}: {e}") from e
        if offered is None:
            return [schema(t) for t in self.tools.values()]
        unknown = sorted({s["function"]["name"] for s in offered} - set(self.tools))
        if unknown:
            raise MalformedRow(
                f"{where}: 'tools' offers {unknown}, not in rollout.agent.tools"
                f" ({', '.join(self.tools)})"
            )
        return offered

    @staticmethod
    def _to_batch(ids: list[torch.Tensor], kept: list[tuple[int, PromptRow]]) -> Batch:
        """Prompts stay on the host: they go to the engine as token lists."""
        rows = [r for _, r in kept]
        objects = {
            "data_source": [r.data_source for r in rows],
            "ground_truth": [r.ground_truth for r in rows],
            "extra_info": [r.extra_info for r in rows],
            "extra": [r.extra for r in rows],
        }
        if not kept:  # every row of this rank's share was skipped
            return Batch.empty({"input_ids": torch.int64}, list(objects), torch.device("cpu"))
        uid = torch.tensor([u for u, _ in kept], dtype=torch.int64, device="cpu")
        return Batch.from_sequences({"input_ids": ids}, {"uid": uid, "group": uid.clone()}, objects)

    def next(self) -> PromptBatch:
        """The batch at the current state; the state then moves one step on."""
        state = self.state
        if self._ahead is not None and self._ahead[0] == state:
            result = self._ahead[1].result()
        else:
            result = self.batch_at(state)
        self.state = self._advance(state)
        if self._pool is not None:
            upcoming = self.state
            self._ahead = (upcoming, self._pool.submit(self.batch_at, upcoming))
        return result

    def state_dict(self) -> dict[str, Any]:
        return asdict(self.state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = LoaderState(**state)
        self._ahead = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
