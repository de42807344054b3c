"""The embedded CPU task, made locally and deterministically (no hub): a character-level
Hugging Face tokenizer with a chat template, a tiny random Llama-style model saved with
safetensors, and a parquet dataset whose reward a random model learns within a few
hundred GRPO steps on CPU: repeat the digit that ends the prompt."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import string
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL = ["<pad>", "<bos>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>"]
CHARS = list(string.digits + string.ascii_letters + " +-*/=?.,:;!()[]{}<>'\"\\_#%&|^~@$\n")
VOCAB_SIZE = 128  # padded with unused tokens: divisible by any TP size up to 128
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Write the tokenizer to `path` (save_pretrained) and return it."""
    tokens = SPECIAL + CHARS
    tokens += [f"<unused{i}>" for i in range(VOCAB_SIZE - len(tokens))]
    core = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="?"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        additional_special_tokens=SPECIAL[3:],
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
    """Make the task under `root` unless it is there. Built aside and renamed into place,
    so concurrent callers and interrupted runs never leave a half-made task behind."""
    root = Path(root)
    parts = ("tiny_llama", "tiny_task")
    if all((root / p).is_dir() for p in parts):
        return root
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=root))  # same filesystem: rename
    make_task(staging)
    for p in parts:
        with contextlib.suppress(OSError):  # another process got there first
            os.rename(staging / p, root / p)
    shutil.rmtree(staging, ignore_errors=True)
    return root


def make_task(root: str | Path, seed: int = 0) -> Path:
    """`root`/tiny_llama (model + tokenizer) and `root`/tiny_task/{train,val}.parquet."""
    root = Path(root)
    model_dir, task_dir = root / "tiny_llama", root / "tiny_task"
    task_dir.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(model_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(model_dir)
    make_dataset(task_dir / "train.parquet", 4096, seed)
    make_dataset(task_dir / "val.parquet", 128, seed + 1)
    return root
