"""What we read from a Hugging Face model directory's config.json, checked against what we
can build (Llama and Qwen2 families: GQA, RoPE, RMSNorm, SwiGLU, optional qkv bias)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
}


@dataclass(frozen=True)
class HFArch:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool


def _rope_theta(raw: dict[str, Any], where: str) -> float:
    """transformers 5 nests it in `rope_parameters`; 4.x wrote `rope_theta` at top level."""
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
    if rope_type not in (None, "default"):
        raise ValueError(f"{where}: RoPE scaling '{rope_type}' is not supported yet")
    return float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))


def read_hf_config(model_dir: str | Path) -> HFArch:
    """Parse `<model_dir>/config.json`; ValueError names the file and the field."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ValueError(f"model.path: no config.json in '{model_dir}'")
    raw = json.loads(path.read_text())
    archs = raw.get("architectures") or []
    if len(archs) != 1 or archs[0] not in SUPPORTED:
        raise ValueError(
            f"{path}: architecture {archs} is not supported (supported: {', '.join(SUPPORTED)})"
        )
    if raw.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{path}: hidden_act '{raw['hidden_act']}' is not supported (silu)")
    if raw.get("attention_bias") or raw.get("mlp_bias"):
        # Megatron has a qkv-only bias switch and an all-linear one; HF Llama's attention_bias
        # also covers o_proj, and mlp_bias only the MLP: neither maps exactly.
        raise ValueError(f"{path}: attention_bias/mlp_bias=true is not supported")
    if raw.get("use_sliding_window"):
        raise ValueError(f"{path}: use_sliding_window=true is not supported")
    try:
        heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        return HFArch(
            architecture=archs[0],
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=_rope_theta(raw, str(path)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=SUPPORTED[archs[0]] == "qwen2",
        )
    except KeyError as e:
        raise ValueError(f"{path}: missing field {e.args[0]}") from e
