"""What we read from a Hugging Face model directory's config.json, checked against what we
can build (Llama 2/3.x, Qwen2/2.5 and Qwen3 dense: GQA, RoPE with Llama 3's scaling,
RMSNorm, SwiGLU, Qwen2's qkv bias, Qwen3's per-head q/k RMSNorm and explicit head_dim;
Qwen2.5-VL: the Qwen2 text model with multimodal RoPE, and its vision tower)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
}


@dataclass(frozen=True)
class Llama3Rope:
    """Llama 3.x RoPE scaling (rope_type 'llama3')."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class Moe:
    """Top-k routed experts in every layer (Qwen3-MoE): softmax router, SwiGLU experts."""

    num_experts: int
    top_k: int
    intermediate_size: int
    norm_topk_prob: bool  # renormalise the top-k probabilities to sum to 1


@dataclass(frozen=True)
class Vision:
    """Qwen2.5-VL's images (models/vision.py): the vision tower's HF config, the token its
    merged patches replace, the multimodal RoPE sections (how many of the head's
    frequencies turn with each token's time, height and width position), and how many
    patches a side one image token merges."""

    image_token_id: int
    mrope_section: tuple[int, ...]
    merge: int
    config: dict[str, Any] = field(compare=False, hash=False)


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
    qk_norm: bool = False  # Qwen3: RMSNorm over each head's q and k
    rope_scaling: Llama3Rope | None = None
    moe: Moe | None = None  # Qwen3-MoE: every layer's MLP is a mixture of experts
    vision: Vision | None = None  # Qwen2.5-VL: a vision tower and multimodal RoPE


def _rope_params(raw: dict[str, Any]) -> dict[str, Any]:
    """The RoPE settings: transformers 5 nests them in `rope_parameters`, 4.x wrote the
    scaling (and Qwen2.5-VL's mrope_section) in `rope_scaling`."""
    return {**(raw.get("rope_scaling") or {}), **(raw.get("rope_parameters") or {})}


def _rope(raw: dict[str, Any], where: str) -> tuple[float, Llama3Rope | None]:
    """(theta, Llama 3 scaling or None); 4.x wrote `rope_theta` at top level."""
    params = _rope_params(raw)
    rope_type = params.get("rope_type") or params.get("type") or "default"
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    if rope_type in ("default", "mrope"):  # (mrope: Qwen2.5-VL's, as transformers 4 wrote it)
        return theta, None
    if rope_type != "llama3":
        raise ValueError(
            f"{where}: RoPE scaling '{rope_type}' is not supported (supported: default, llama3)"
        )
    try:
        return theta, Llama3Rope(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    except KeyError as e:
        raise ValueError(f"{where}: llama3 RoPE scaling lacks {e.args[0]}") from e


def _moe(raw: dict[str, Any], where: str) -> Moe:
    if raw.get("decoder_sparse_step", 1) != 1 or raw.get("mlp_only_layers"):
        raise ValueError(
            f"{where}: decoder_sparse_step/mlp_only_layers mix dense and MoE layers, which is"
            " not supported (every layer must be MoE)"
        )
    return Moe(
        num_experts=int(raw.get("num_experts") or raw["num_local_experts"]),
        top_k=int(raw["num_experts_per_tok"]),
        intermediate_size=int(raw["moe_intermediate_size"]),
        norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
    )


def _vision(top: dict[str, Any], text: dict[str, Any]) -> Vision:
    config = top["vision_config"]
    return Vision(
        image_token_id=int(top["image_token_id"]),
        mrope_section=tuple(int(n) for n in _rope_params(text)["mrope_section"]),
        merge=int(config.get("spatial_merge_size", 2)),  # (transformers' default)
        config=config,
    )


def read_hf_config(model_dir: str | Path) -> HFArch:
    """Parse `<model_dir>/config.json`; ValueError names the file and the field."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ValueError(f"model.path: no config.json in '{model_dir}'")
    top = json.loads(path.read_text())
    archs = top.get("architectures") or []
    if len(archs) != 1 or archs[0] not in SUPPORTED:
        raise ValueError(
            f"{path}: architecture {archs} is not supported (supported: {', '.join(SUPPORTED)})"
        )
    family = SUPPORTED[archs[0]]
    # a vision-language model nests its language model's settings in text_config
    raw = {**top, **top.get("text_config", {})} if family == "qwen2_5_vl" else top
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
        theta, scaling = _rope(raw, str(path))
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
            rope_theta=theta,
            max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=family in ("qwen2", "qwen2_5_vl"),
            qk_norm=family in ("qwen3", "qwen3_moe"),
            rope_scaling=scaling,
            moe=_moe(raw, str(path)) if family == "qwen3_moe" else None,
            vision=_vision(top, raw) if family == "qwen2_5_vl" else None,
        )
    except KeyError as e:
        raise ValueError(f"{path}: missing field {e.args[0]}") from e


def has_vision(model_dir: str | Path) -> bool:
    """Whether `model_dir` holds a vision-language model (its batches carry images); False
    where it has no config.json (yet: the embedded task is made later)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return False
    archs = json.loads(path.read_text()).get("architectures") or []
    return len(archs) == 1 and SUPPORTED.get(archs[0]) == "qwen2_5_vl"
