"""The embedded CPU task, made locally and deterministically (no hub): a character-level
Hugging Face tokenizer with a chat template, a tiny random Llama-style model saved with
safetensors, and a parquet dataset whose reward a random model learns within a few
hundred GRPO steps on CPU: repeat the digit that ends the prompt. The agent task beside it
(its own tokenizer and model) needs a tool call: answer a key's secret digit, which only
the `lookup` tool knows; the vision-language task (a tiny Qwen2.5-VL) an image: answer the
digit of its colour."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import shutil
import string
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from distflow_mc.agent.tools import arguments_schema

SPECIAL = ["<pad>", "<bos>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>"]
CHARS = list(string.digits + string.ascii_letters + " +-*/=?.,:;!()[]{}<>'\"\\_#%&|^~@$\n")
VOCAB_SIZE = 128  # padded with unused tokens: divisible by any TP size up to 128
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer(path: str | Path, extra: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """Write the tokenizer to `path` (save_pretrained) and return it; `extra` tokens are
    single tokens too."""
    tokens = SPECIAL + list(extra) + CHARS
    tokens += [f"<unused{i}>" for i in range(VOCAB_SIZE - len(tokens))]
    core = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="?"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        additional_special_tokens=SPECIAL[3:] + list(extra),
        chat_template=CHAT_TEMPLATE,
    )
    tok.save_pretrained(path)
    return tok


WORDS = ["copy", "say", "repeat", "echo", "write", "give"]


def make_dataset(path: str | Path, rows: int, seed: int) -> None:
    """Prompts like 'echo: 7' (chat messages), data_source tiny_copy, ground truth '7'."""
    rng = random.Random(seed)
    table = []
    for i in range(rows):
        digit = str(rng.randrange(10))
        text = f"{rng.choice(WORDS)}: {digit}"
        table.append(
            {
                "prompt": [{"role": "user", "content": text}],
                "data_source": "tiny_copy",
                "reward_model": {"ground_truth": digit},
                "extra_info": {"index": i},
            }
        )
    pq.write_table(pa.Table.from_pylist(table), path, row_group_size=256)


def ensure_task(root: str | Path) -> Path:
    """Make the task under `root` unless it is there. Every rank calls this before any
    collective: the first to take the file lock makes it, the others then find it. Built
    aside and renamed into place, so an interrupted run (or ranks on other nodes of a
    shared filesystem, where the lock may not hold) never leaves a half-made task behind."""
    root = Path(root)
    parts = (
        "tiny_llama",
        "tiny_task",
        "tiny_agent_llama",
        "tiny_agent_task",
        "tiny_vl",
        "tiny_vl_task",
    )
    if all((root / p).is_dir() for p in parts):
        return root
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if all((root / p).is_dir() for p in parts):
            return root
        staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=root))  # same filesystem: rename
        make_task(staging)
        for p in parts:
            with contextlib.suppress(OSError):  # another process got there first
                os.rename(staging / p, root / p)
        shutil.rmtree(staging, ignore_errors=True)
    return root


def make_task(root: str | Path, seed: int = 0) -> Path:
    """`root`/tiny_llama (model + tokenizer) and `root`/tiny_task/{train,val}.parquet; the
    agent task's `root`/tiny_agent_llama and `root`/tiny_agent_task, and the
    vision-language task's `root`/tiny_vl and `root`/tiny_vl_task, likewise."""
    root = Path(root)
    make_model(root / "tiny_llama", make_tokenizer(root / "tiny_llama"), seed)
    (root / "tiny_task").mkdir(parents=True, exist_ok=True)
    make_dataset(root / "tiny_task" / "train.parquet", 4096, seed)
    make_dataset(root / "tiny_task" / "val.parquet", 128, seed + 1)
    agent_tok = make_tokenizer(root / "tiny_agent_llama", AGENT_TOKENS)
    make_model(root / "tiny_agent_llama", agent_tok, seed)
    (root / "tiny_agent_task").mkdir(parents=True, exist_ok=True)
    make_agent_dataset(root / "tiny_agent_task" / "train.parquet", 4096, seed)
    make_agent_dataset(root / "tiny_agent_task" / "val.parquet", 128, seed + 1)
    make_vl_model(root / "tiny_vl", seed)
    (root / "tiny_vl_task").mkdir(parents=True, exist_ok=True)
    make_vl_dataset(root / "tiny_vl_task" / "train.parquet", 2048, seed)
    make_vl_dataset(root / "tiny_vl_task" / "val.parquet", 128, seed + 1)
    return root


def _text_sizes(tok: PreTrainedTokenizerFast) -> dict[str, int]:
    """Every embedded task's language model: its sizes and the tokenizer's special ids."""
    return dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,  # room for the HF engine config's 256 new tokens
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def make_model(model_dir: Path, tok: PreTrainedTokenizerFast, seed: int) -> None:
    torch.manual_seed(seed)
    config = LlamaConfig(**_text_sizes(tok), tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(model_dir)


# The vision-language task: an image of one of ten colours, and the answer is the digit of
# its colour, which only the image says. A Qwen2.5-VL-architecture model (its vision tower
# merging 2 x 2 patches of 14 pixels) with the character tokenizer and Qwen's image tokens.
VL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
COLORS = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (128, 128, 128), (0, 0, 0),
)  # fmt: skip


def make_vl_model(model_dir: Path, seed: int) -> None:
    """Tokenizer, image processor (PIL backend) and a tiny random Qwen2.5-VL."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    tok = make_tokenizer(model_dir, VL_TOKENS)
    start, end, image, video = tok.convert_tokens_to_ids(list(VL_TOKENS))
    Qwen2VLImageProcessorPil(
        min_pixels=28 * 28, max_pixels=56 * 56, patch_size=14, merge_size=2
    ).save_pretrained(model_dir)
    torch.manual_seed(seed)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    text = {**_text_sizes(tok), "rope_parameters": rope}
    vision = dict(
        depth=1,
        hidden_size=32,
        num_heads=2,
        intermediate_size=64,
        out_hidden_size=64,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=56,
        fullatt_block_indexes=[0],
    )
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=image,
        video_token_id=video,
        vision_start_token_id=start,
        vision_end_token_id=end,
        tie_word_embeddings=False,
    )
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(model_dir)


def make_vl_dataset(path: str | Path, rows: int, seed: int) -> None:
    """'<image> digit?' (chat messages) with a 28 x 56 image of the digit's colour,
    data_source tiny_copy, ground truth the digit."""
    import io

    from PIL import Image

    rng = random.Random(seed)
    table = []
    for i in range(rows):
        digit = rng.randrange(10)
        png = io.BytesIO()
        Image.new("RGB", (56, 28), COLORS[digit]).save(png, format="PNG")
        table.append(
            {
                "prompt": [{"role": "user", "content": "<image> digit?"}],
                "images": [{"bytes": png.getvalue(), "path": None}],
                "data_source": "tiny_copy",
                "reward_model": {"ground_truth": str(digit)},
                "extra_info": {"index": i},
            }
        )
    pq.write_table(pa.Table.from_pylist(table), path, row_group_size=256)


# The agent task: the answer to "key: 3" is a secret only the `lookup` tool knows. The
# tokenizer has each key's whole call as one token (as a BPE trained on tool-call data
# would merge such frequent text), so a tiny random model can find the call; the turn ends
# at it (rollout.agent.stop: </tool_call>), and the Hermes parser reads it from the text
# like any Qwen model's.
CALLS = tuple(
    f'<tool_call>{{"name": "lookup", "arguments": {{"key": "{k}"}}}}</tool_call>'
    for k in string.digits
)
AGENT_TOKENS = ("<|tool|>", *CALLS)


def secret(key: str) -> str:
    """The lookup table: a digit for a digit, not guessable from the key."""
    return str((7 * int(key) + 3) % 10)


class Lookup:
    """The agent task's tool."""

    name = "lookup"
    description = "The secret digit for a key."
    parameters: ClassVar[dict[str, Any]] = arguments_schema(
        key={"type": "string", "pattern": "^[0-9]$"}
    )

    def __call__(self, arguments: dict[str, Any], budget_s: float) -> str:
        return secret(arguments["key"])


class SlowLookup(Lookup):
    """The same tool behind a slow service: each answer takes 50-200 ms (by key), the case
    where rollout and training on separate ranks pay off (scripts/bench_async.py)."""

    def __call__(self, arguments: dict[str, Any], budget_s: float) -> str:
        time.sleep(0.05 + 0.15 * (int(arguments["key"]) * 7 % 10) / 9)
        return super().__call__(arguments, budget_s)


def make_agent_dataset(path: str | Path, rows: int, seed: int) -> None:
    """Prompts 'key: 3' offering the lookup tool (a `tools` column, as agent datasets
    carry), data_source tiny_lookup, ground truth the secret."""
    rng = random.Random(seed)
    tools = json.dumps([{"type": "function", "function": {"name": "lookup"}}])
    table = []
    for i in range(rows):
        key = str(rng.randrange(10))
        table.append(
            {
                "prompt": [{"role": "user", "content": f"key: {key}"}],
                "data_source": "tiny_lookup",
                "reward_model": {"ground_truth": secret(key)},
                "extra_info": {"index": i, "key": key},
                "tools": tools,
            }
        )
    pq.write_table(pa.Table.from_pylist(table), path, row_group_size=256)
