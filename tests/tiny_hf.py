"""Tiny random Hugging Face models written by transformers' own save_pretrained."""

from __future__ import annotations

from pathlib import Path

import torch
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


def make_tiny_model(kind: str, path: Path, seed: int = 0, **overrides) -> Path:
    """kind: 'llama' (untied, rope theta 5e5) or 'qwen2' (tied embeddings, qkv bias)."""
    torch.manual_seed(seed)
    if kind == "llama":
        config = LlamaConfig(**{**SIZES, "rope_theta": 500000.0, **overrides})
    else:
        config = Qwen2Config(**{**SIZES, "tie_word_embeddings": True, **overrides})
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # HF zero-inits some tensors; make every weight informative
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    model.save_pretrained(path)
    return path


def load_hf(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
