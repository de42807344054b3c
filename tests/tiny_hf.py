"""Tiny random Hugging Face models written by transformers' own save_pretrained."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)

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
    """kind: 'llama' (untied, rope theta 5e5), 'llama3' (Llama 3.x RoPE scaling, with an
    original context short enough that all three frequency bands occur), 'qwen2' (tied
    embeddings, qkv bias) or 'qwen3' (q/k norms, head_dim != hidden / heads). llama3 and
    qwen3 have an odd vocabulary (127: padded under TP, untied and tied); 'qwen2_5_vl' a
    vision-language model (`vl_config`). With `max_shard_size`, transformers writes shards
    and a safetensors index."""
    torch.manual_seed(seed)
    if kind == "llama":
        config = LlamaConfig(**{**SIZES, "rope_theta": 500000.0, **overrides})
    elif kind == "llama3":
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        config = LlamaConfig(**{**SIZES, "rope_parameters": rope, "vocab_size": 127, **overrides})
    elif kind == "qwen3_moe":
        moe = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}
        config = Qwen3MoeConfig(
            **{**SIZES, "head_dim": 16, "norm_topk_prob": True, **moe, **overrides}
        )
    elif kind == "qwen3":
        odd = {"head_dim": 32, "tie_word_embeddings": True, "vocab_size": 127}
        config = Qwen3Config(**{**SIZES, **odd, **overrides})
    elif kind == "qwen2_5_vl":
        return _save(Qwen2_5_VLForConditionalGeneration(vl_config(**overrides)), path, None)
    else:
        config = Qwen2Config(**{**SIZES, "tie_word_embeddings": True, **overrides})
    return _save(AutoModelForCausalLM.from_config(config), path, max_shard_size)


IMAGE_TOKEN = 100  # the tiny vision-language model's image token


def vl_config(**overrides) -> Qwen2_5_VLConfig:
    """A tiny Qwen2.5-VL: the Qwen2 text sizes above (head_dim 16: multimodal RoPE sections
    2, 3, 3 of its 8 frequencies) and a 2-block vision tower (one windowed, one full
    attention block) of 14-pixel patches merged 2 x 2."""
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    vision = dict(
        depth=2,
        hidden_size=32,
        num_heads=2,
        intermediate_size=64,
        out_hidden_size=SIZES["hidden_size"],
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=56,
        fullatt_block_indexes=[1],
    )
    text = {**SIZES, "rope_parameters": rope, "bos_token_id": 1, "eos_token_id": 2}
    tokens = {
        "image_token_id": IMAGE_TOKEN,
        "video_token_id": IMAGE_TOKEN + 1,
        "vision_start_token_id": IMAGE_TOKEN + 2,
        "vision_end_token_id": IMAGE_TOKEN + 3,
    }
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        tie_word_embeddings=False,
        **{**tokens, **overrides},
    )


def _save(model: torch.nn.Module, path: Path, max_shard_size: str | None) -> Path:
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


class SwapAfter:
    """rollout.partial's interrupt: new weights are pending from the `after`-th token
    boundary on; applying them loads `weights` into the engine."""

    def __init__(self, engine, after: int, weights: dict) -> None:
        self.engine, self.after, self.weights = engine, after, weights
        self.boundaries, self.applied = 0, 0

    def pending(self) -> bool:
        self.boundaries += 1
        return self.boundaries >= self.after and not self.applied

    def apply(self) -> None:
        self.engine.update_weights([list(self.weights.items())])
        self.applied += 1


def engine_and_update(model_dir: Path, tok) -> tuple:
    """The embedded task's tiny model written to `model_dir`, a transformers engine holding
    its weights, those weights, and the weights moved a little (the next version)."""
    from distflow_mc.data.tiny import make_model
    from distflow_mc.rollout.hf_engine import HFEngine

    make_model(model_dir, tok, seed=3)
    old = load_tensors(model_dir)
    g = torch.Generator().manual_seed(0)
    new = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in old.items()}
    engine = HFEngine(model_dir, tok.pad_token_id, torch.device("cpu"))
    engine.update_weights([list(old.items())])
    return engine, old, new
