"""Prompt datasets in the format the RL ecosystem uses (verl/siiRL style), from parquet or
jsonl: `prompt` (chat messages or a string), `data_source`, `reward_model.ground_truth`,
optional `extra_info`, and any other columns, carried through.

Rows are addressed by a global index over all files; reading a set of rows touches only
the parquet row groups (or jsonl lines) that hold them. Decoded row groups are kept (least
recently used first out, up to CACHE_BYTES), so a file written as one big row group is
read once, not on every step.
"""

from __future__ import annotations

import bisect
import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

CACHE_BYTES = 512 << 20  # decoded parquet row groups kept per source
PLACEHOLDER = "<image>"  # where a vision-language row's next image goes (data/images.py)


class MalformedRow(ValueError):
    """A row that does not have the expected columns or types; names file and row."""


@dataclass(frozen=True)
class _Part:
    """A contiguous range of global rows: one parquet row group or one jsonl file."""

    path: Path
    start: int  # first global row
    file_row: int  # first row within its file
    rows: int
    row_group: int | None  # None: jsonl


class RowSource:
    """Random access to rows by global index across parquet and jsonl files."""

    def __init__(self, files: Sequence[str | Path]) -> None:
        if not files:
            raise ValueError("data.train_files is empty")
        self.parts: list[_Part] = []
        self._line_offsets: dict[Path, list[int]] = {}
        total = 0
        for f in map(Path, files):
            if not f.is_file():
                raise ValueError(f"data file not found: {f}")
            if f.suffix == ".parquet":
                meta = pq.ParquetFile(f).metadata
                in_file = 0
                for rg in range(meta.num_row_groups):
                    rows = meta.row_group(rg).num_rows
                    self.parts.append(_Part(f, total, in_file, rows, rg))
                    total += rows
                    in_file += rows
            elif f.suffix in (".jsonl", ".json"):
                offsets = self._index_lines(f)
                self._line_offsets[f] = offsets
                self.parts.append(_Part(f, total, 0, len(offsets), None))
                total += len(offsets)
            else:
                raise ValueError(f"data file {f}: expected .parquet or .jsonl")
        self._starts = [p.start for p in self.parts]
        self.num_rows = total
        self._groups: OrderedDict[int, pa.Table] = OrderedDict()
        self._lock = threading.Lock()  # the prefetch thread reads too

    @staticmethod
    def _index_lines(path: Path) -> list[int]:
        offsets, pos = [], 0
        with path.open("rb") as fh:
            for line in fh:
                if line.strip():
                    offsets.append(pos)
                pos += len(line)
        return offsets

    def __len__(self) -> int:
        return self.num_rows

    def data_sources(self) -> set[str]:
        """Every (string) `data_source` in the files: one column of each parquet file, one
        pass over each jsonl file. Rows without one are malformed, handled when read."""
        found: set[str] = set()
        for path in dict.fromkeys(part.path for part in self.parts):
            if path.suffix == ".parquet":
                if "data_source" in pq.ParquetFile(path).schema_arrow.names:
                    found.update(pq.read_table(path, columns=["data_source"]).column(0).to_pylist())
            else:
                with path.open("rb") as fh:
                    for i, line in enumerate(fh):
                        row = self._parse_line(line, path, i) if line.strip() else {}
                        found.add(row.get("data_source"))
        return {s for s in found if isinstance(s, str)}

    def files(self) -> dict[Path, range]:
        """Each file's global rows."""
        out: dict[Path, range] = {}
        for part in self.parts:
            first = out[part.path].start if part.path in out else part.start
            out[part.path] = range(first, part.start + part.rows)
        return out

    def locate(self, index: int) -> tuple[Path, int]:
        """(file, row number within the file) of a global row, for messages."""
        part = self.parts[bisect.bisect_right(self._starts, index) - 1]
        return part.path, part.file_row + index - part.start

    def read(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """Rows at `indices`, in that order; each row group or file is opened once."""
        wanted: dict[int, list[int]] = {}
        for index in indices:
            if not 0 <= index < self.num_rows:
                raise IndexError(index)
            wanted.setdefault(bisect.bisect_right(self._starts, index) - 1, []).append(index)
        rows: dict[int, dict[str, Any]] = {}
        for part_id, part_rows in wanted.items():
            part = self.parts[part_id]
            if part.row_group is not None:
                table = self._row_group(part_id)
                local = table.take([i - part.start for i in part_rows]).to_pylist()
                rows.update(zip(part_rows, local, strict=True))
            else:
                offsets = self._line_offsets[part.path]
                with part.path.open("rb") as fh:
                    for i in part_rows:
                        fh.seek(offsets[i - part.start])
                        rows[i] = self._parse_line(fh.readline(), part.path, i - part.start)
        return [rows[i] for i in indices]

    def _row_group(self, part_id: int) -> pa.Table:
        with self._lock:
            if part_id in self._groups:
                self._groups.move_to_end(part_id)
                return self._groups[part_id]
            part = self.parts[part_id]
            table = pq.ParquetFile(part.path).read_row_group(part.row_group)
            self._groups[part_id] = table
            while (
                len(self._groups) > 1 and sum(t.nbytes for t in self._groups.values()) > CACHE_BYTES
            ):
                self._groups.popitem(last=False)
            return table

    @staticmethod
    def _parse_line(line: bytes, path: Path, row: int) -> dict[str, Any]:
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            return {"__error__": f"{path} row {row}: not valid JSON ({e.msg})"}
        return (
            value if isinstance(value, dict) else {"__error__": f"{path} row {row}: not an object"}
        )


@dataclass
class PromptRow:
    prompt: str | list[dict[str, str]]
    data_source: str
    ground_truth: Any
    extra_info: dict[str, Any]
    extra: dict[str, Any]  # other columns, carried through


def _content(content: Any) -> Any:
    """A message's content as text: a list of chat content parts ({"type": "text", "text":
    ...} and {"type": "image"}, as chat templates take them) joined, each image part the
    `<image>` placeholder the row's `images` fill in order; anything else as it is."""
    if not isinstance(content, list):
        return content
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image":
            texts.append(PLACEHOLDER)
        else:
            return content  # not parts this reads: the row is malformed
    return "".join(texts)


def validate_row(raw: dict[str, Any], where: str) -> PromptRow:
    """Check one row's columns and types; MalformedRow says which and where."""
    if "__error__" in raw:
        raise MalformedRow(raw["__error__"])
    prompt = raw.get("prompt")
    if isinstance(prompt, list):  # content parts (text, image) become text with <image>
        prompt = [
            {**m, "content": _content(m.get("content"))} if isinstance(m, dict) else m
            for m in prompt
        ]
    messages_ok = (
        isinstance(prompt, list)
        and prompt
        and all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in prompt
        )
    )
    if not (isinstance(prompt, str) or messages_ok):
        raise MalformedRow(
            f"{where}: 'prompt' must be a string or a list of {{role, content}} messages"
            " (content: a string, or parts of type text and image)"
        )
    if not isinstance(raw.get("data_source"), str):
        raise MalformedRow(f"{where}: 'data_source' must be a string")
    reward_model = raw.get("reward_model")
    if not isinstance(reward_model, dict) or "ground_truth" not in reward_model:
        raise MalformedRow(f"{where}: 'reward_model.ground_truth' is missing")
    extra_info = raw.get("extra_info") or {}
    if not isinstance(extra_info, dict):
        raise MalformedRow(f"{where}: 'extra_info' must be a mapping")
    extra = {
        k: v
        for k, v in raw.items()
        if k not in ("prompt", "data_source", "reward_model", "extra_info")
    }
    return PromptRow(prompt, raw["data_source"], reward_model["ground_truth"], extra_info, extra)
