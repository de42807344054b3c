"""Prompt loader on real files (pyarrow-written parquet with several row groups, jsonl):
shards, epochs, resume on another rank count, malformed and overlong rows, prefetch."""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from distflow_mc.config.schema import DataConfig, OnBadRow
from distflow_mc.data.dataset import MalformedRow
from distflow_mc.data.loader import LoaderState, PromptLoader
from distflow_mc.data.tiny import make_tokenizer


def row(i: int) -> dict:
    return {
        "prompt": [{"role": "user", "content": f"What is {i}+1?"}],
        "data_source": "toy",
        "reward_model": {"ground_truth": str(i + 1)},
        "extra_info": {"index": i},
        "difficulty": i % 3,
    }


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    make_tokenizer(path)
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture
def files(tmp_path: Path) -> list[str]:
    table = pa.Table.from_pylist([row(i) for i in range(40)])
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=10)  # 4 row groups
    with (tmp_path / "b.jsonl").open("w") as f:
        for i in range(40, 52):
            f.write(json.dumps({**row(i), "prompt": f"plain {i}"}) + "\n")
    return [str(tmp_path / "a.parquet"), str(tmp_path / "b.jsonl")]


def loader(files, tokenizer, rank=0, size=1, state=None, **cfg) -> PromptLoader:
    config = DataConfig(train_files=files, batch_size=cfg.pop("batch_size", 8), **cfg)
    return PromptLoader(config, tokenizer, rank, size, seed=7, state=state)


def global_steps(files, tokenizer, size, steps, state=None, **cfg) -> tuple[list, LoaderState]:
    """uids of each step, concatenated over the ranks (each rank's loader on its own)."""
    loaders = [loader(files, tokenizer, r, size, state, **cfg) for r in range(size)]
    out = []
    for _ in range(steps):
        out.append([u for ld in loaders for u in ld.next().batch.samples["uid"].tolist()])
    final = loaders[0].state
    for ld in loaders:
        assert ld.state == final
        ld.close()
    return out, final


def test_shards_are_disjoint_and_cover_the_epoch(files, tokenizer):
    size, steps = 4, 52 // 8  # 6 full steps, 4 rows dropped
    loaders = [loader(files, tokenizer, r, size) for r in range(size)]
    seen = []
    for _ in range(steps):
        shares = [set(ld.next().batch.samples["uid"].tolist()) for ld in loaders]
        assert all(len(s) == 2 for s in shares)
        assert len(set().union(*shares)) == 8  # disjoint
        seen += [u for s in shares for u in s]
    assert len(set(seen)) == 48 and all(u < 52 for u in seen)  # epoch 0 uids are row ids
    assert loaders[0].state == LoaderState(epoch=1, consumed=0)
    nxt = loaders[0].next().batch.samples["uid"].tolist()
    assert all(52 <= u < 104 for u in nxt)  # epoch 1: a new permutation, new uids


def test_resume_on_two_ranks_from_four(files, tokenizer):
    straight, _ = global_steps(files, tokenizer, 4, 9)
    first, state = global_steps(files, tokenizer, 4, 4)
    rest, _ = global_steps(files, tokenizer, 2, 5, state=state)
    assert first + rest == straight
    one_rank, _ = global_steps(files, tokenizer, 1, 9)
    assert one_rank == straight  # the order does not depend on the layout


def test_pending_prompts_come_first_then_the_order_goes_on(files, tokenizer):
    """A checkpoint taken with prompts handed out and not trained (rollout.stream) names
    them; a resumed loader hands them out again (shared over its ranks, whatever their
    number), then goes on where the order was."""
    straight, _ = global_steps(files, tokenizer, 2, 3)
    first, state = global_steps(files, tokenizer, 2, 2)
    pending = [first[1][1], first[1][5], 52 + 3]  # two of step 1, one of the next epoch
    state = LoaderState(state.epoch, state.consumed, pending)
    rest, final = global_steps(files, tokenizer, 2, 2, state=state)
    assert sorted(rest[0]) == sorted(pending) and rest[1] == straight[2]
    assert final.pending == [] and final.consumed == 24
    again = loader(files, tokenizer, shuffle=False, state=state).next().batch
    text = tokenizer.decode(again.token_slice("input_ids", 2))  # epoch 1's row 3, re-read
    assert again.samples["uid"].tolist() == pending and "What is 3+1?" in text


def test_prompts_are_tokenised_with_the_chat_template(files, tokenizer):
    batch = loader(files, tokenizer, shuffle=False).next().batch
    assert (
        tokenizer.decode(batch.token_slice("input_ids", 3)) == "<|user|>What is 3+1?\n<|assistant|>"
    )
    assert batch.objects["ground_truth"][3] == "4"
    assert batch.objects["extra"][3] == {"difficulty": 0}
    assert batch.objects["extra_info"][3] == {"index": 3}
    jsonl = loader(files, tokenizer, shuffle=False, batch_size=4).source.read([41])[0]
    assert jsonl["prompt"] == "plain 41"


@pytest.fixture
def reads(monkeypatch) -> list[int]:
    """The parquet row groups this thread reads (decoded) from now on, in order (a loader
    of an earlier test may still be prefetching in a thread of its own)."""
    seen: list[int] = []
    original = pq.ParquetFile.read_row_group
    mine = threading.get_ident()

    def spy(self, i, *args, **kwargs):
        if threading.get_ident() == mine:
            seen.append(i)
        return original(self, i, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    return seen


def test_reads_only_its_row_groups(files, tokenizer, reads):
    ld = loader(files, tokenizer, rank=1, size=4, shuffle=False, batch_size=40, prefetch=False)
    ld.next()  # rank 1 of 4 takes rows 10..19: row group 1 only
    assert reads == [1]


def test_one_big_row_group_is_read_once(tmp_path, files, tokenizer, reads, monkeypatch):
    """A file written as a single row group is decoded once and kept, not re-read every
    step; past the cache's budget the least recently used group goes first."""
    from distflow_mc.data import dataset

    pq.write_table(pa.Table.from_pylist([row(i) for i in range(40)]), tmp_path / "one.parquet")
    ld = loader([str(tmp_path / "one.parquet")], tokenizer, batch_size=8, prefetch=False)
    for _ in range(4):
        ld.next()
    assert reads == [0]
    for budget, expected in ((dataset.CACHE_BYTES, [0, 1]), (0, [0, 1, 0])):
        monkeypatch.setattr(dataset, "CACHE_BYTES", budget)  # 0: only the group in use
        reads.clear()
        source = dataset.RowSource(files)
        for rows in ([0], [15], [0]):  # row groups 0, 1, 0 of a.parquet
            source.read(rows)
        assert reads == expected


def write_bad(tmp_path: Path) -> list[str]:
    rows = [row(i) for i in range(8)]
    rows[2] = {**rows[2], "data_source": 5}
    rows[5] = {k: v for k, v in rows[5].items() if k != "reward_model"}
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    return [str(path)]


def test_malformed_rows_skip_with_count(tmp_path, tokenizer):
    got = loader(write_bad(tmp_path), tokenizer, shuffle=False, batch_size=9).next()
    assert got.malformed == 3 and len(got.batch) == 6


def test_malformed_rows_error_names_file_and_row(tmp_path, tokenizer):
    files = write_bad(tmp_path)
    ld = loader(files, tokenizer, shuffle=False, batch_size=9, on_malformed=OnBadRow.ERROR)
    with pytest.raises(MalformedRow, match=r"bad\.jsonl row 2: 'data_source' must be a string"):
        ld.next()


def test_overlong_prompts(files, tokenizer):
    # rows 0-9 render to 15 tokens ("<|user|>What is 3+1?\n<|assistant|>"), rows 10-15 to 16
    got = loader(files, tokenizer, shuffle=False, batch_size=16, max_prompt_length=15).next()
    assert (got.overlong, len(got.batch)) == (6, 10)
    strict = loader(
        files, tokenizer, shuffle=False, max_prompt_length=10, on_overlong=OnBadRow.ERROR
    )
    with pytest.raises(
        ValueError, match=r"a\.parquet row 0: prompt has \d+ tokens > data\.max_prompt_length=10"
    ):
        strict.next()


def test_prefetch_gives_the_same_batches(files, tokenizer):
    with_prefetch, _ = global_steps(files, tokenizer, 2, 8, prefetch=True)
    without, _ = global_steps(files, tokenizer, 2, 8, prefetch=False)
    assert with_prefetch == without


def test_locate_names_file_and_row(files, tokenizer):
    source = loader(files, tokenizer).source
    assert [(p.name, r) for p, r in map(source.locate, (0, 9, 10, 37, 40, 51))] == [
        ("a.parquet", 0),
        ("a.parquet", 9),
        ("a.parquet", 10),
        ("a.parquet", 37),
        ("b.jsonl", 0),
        ("b.jsonl", 11),
    ]


TOOLS_TEMPLATE = (
    "{% if tools %}<|system|>tools: {{ tools | map(attribute='function.name') | join(',') }}\n"
    "{% endif %}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_tools_column_offers_tools_and_bad_ones_are_malformed_rows(tmp_path):
    """Agent datasets: a row's `tools` (OpenAI function schemas, here as JSON text) are
    rendered into its prompt; a row without them offers every tool; a row naming a tool
    the run does not have, or with unreadable `tools`, is a malformed row (file and row)."""
    from distflow_mc.agent.tools import Calculator
    from distflow_mc.data.tiny import Lookup

    calc = json.dumps([{"type": "function", "function": {"name": "calculator"}}])
    rows = [
        {**row(0), "tools": calc},
        {**row(1), "tools": None},
        {**row(2), "tools": json.dumps([{"type": "function", "function": {"name": "web"}}])},
        {**row(3), "tools": "[{oops"},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    tokenizer = make_tokenizer(tmp_path / "tok")
    tokenizer.chat_template = TOOLS_TEMPLATE
    config = DataConfig(train_files=[str(tmp_path / "t.parquet")], batch_size=4, shuffle=False)
    tools = {"calculator": Calculator(), "lookup": Lookup()}
    got = PromptLoader(config, tokenizer, 0, 1, seed=0, tools=tools).next()
    assert got.malformed == 2
    prompts = [tokenizer.decode(got.batch.token_slice("input_ids", i)) for i in range(2)]
    assert prompts[0].startswith("<|system|>tools: calculator\n")
    assert prompts[1].startswith("<|system|>tools: calculator,lookup\n")
    with pytest.raises(MalformedRow, match=r"t\.parquet row 2: 'tools' offers \['web'\]"):
        PromptLoader(
            replace(config, on_malformed=OnBadRow.ERROR), tokenizer, 0, 1, seed=0, tools=tools
        ).next()
