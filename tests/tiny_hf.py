"""Tiny random Hugging Face models written by transformers' own save_pretrained."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

SIZES = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def make_tiny_model(
    kind: str, path: Path, seed: int = 0, max_shard_size: str | None = None, **overrides
) -> Path:
    """kind: 'llama' (untied, rope theta 5e5) or 'qwen2' (tied embeddings, qkv bias).
    With `max_shard_size`, transformers writes shards and a safetensors index."""
    torch.manual_seed(seed)
    if kind == "llama":
        config = LlamaConfig(**{**SIZES, "rope_theta": 500000.0, **overrides})
    else:
        config = Qwen2Config(**{**SIZES, "tie_word_embeddings": True, **overrides})
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # HF zero-inits some tensors; make every weight informative
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return path


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a HF directory, single file or shards."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def load_hf(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
