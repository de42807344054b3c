"""The embedded task is made deterministically, once, and atomically."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow.parquet as pq
from transformers import AutoTokenizer

from distflow_mc.data.tiny import ensure_task, make_task
from distflow_mc.models.hf_config import read_hf_config


def digest(root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(root.rglob("*")):
        if f.is_file():
            h.update(f.relative_to(root).as_posix().encode() + f.read_bytes())
    return h.hexdigest()


def test_task_is_deterministic(tmp_path):
    assert digest(make_task(tmp_path / "a")) == digest(make_task(tmp_path / "b"))


def test_ensure_task_makes_once(tmp_path):
    root = ensure_task(tmp_path / "data")
    stamp = (root / "tiny_llama" / "model.safetensors").stat().st_mtime_ns
    assert ensure_task(root) == root
    assert (root / "tiny_llama" / "model.safetensors").stat().st_mtime_ns == stamp
    made = [
        "tiny_agent_llama",
        "tiny_agent_task",
        "tiny_llama",
        "tiny_task",
        "tiny_vl",
        "tiny_vl_task",
    ]
    left = sorted(p.name for p in root.iterdir() if p.name != ".lock")
    assert left == made  # no staging left


def test_task_contents(tmp_path):
    root = make_task(tmp_path)
    arch = read_hf_config(root / "tiny_llama")
    tok = AutoTokenizer.from_pretrained(root / "tiny_llama")
    assert arch.vocab_size == len(tok) == 128
    rows = pq.read_table(root / "tiny_task" / "train.parquet").to_pylist()
    assert len(rows) == 4096 and rows[0]["data_source"] == "tiny_copy"
    assert rows[0]["prompt"][0]["content"].endswith(rows[0]["reward_model"]["ground_truth"])


def test_agent_task_contents(tmp_path):
    """Each key's call is one token that the Hermes parser reads as a lookup of that key,
    and the secret is the tool's answer."""
    from distflow_mc.agent.parser import hermes
    from distflow_mc.data.tiny import CALLS, Lookup

    root = make_task(tmp_path)
    tok = AutoTokenizer.from_pretrained(root / "tiny_agent_llama")
    assert len(tok) == 128
    rows = pq.read_table(root / "tiny_agent_task" / "train.parquet").to_pylist()
    assert rows[0]["data_source"] == "tiny_lookup" and "lookup" in rows[0]["tools"]
    for key, call in enumerate(CALLS):
        (ids,) = [tok.encode(call, add_special_tokens=False)]
        assert len(ids) == 1
        (parsed,), errors = hermes(tok.decode(ids))
        assert errors == [] and parsed.arguments == {"key": str(key)}
    key = rows[0]["extra_info"]["key"]
    assert Lookup()({"key": key}, 1.0) == rows[0]["reward_model"]["ground_truth"]
