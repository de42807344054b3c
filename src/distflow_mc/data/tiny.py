"""A tiny character-level Hugging Face tokenizer with a chat template, made locally (no
hub): the tokenizer of the embedded CPU task, and of the tests."""

from __future__ import annotations

import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

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
