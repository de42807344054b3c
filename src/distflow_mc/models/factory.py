"""Actor, critic and reference models from a Hugging Face directory."""

from __future__ import annotations

from pathlib import Path

import torch
from megatron.core.transformer.module import MegatronModule

from distflow_mc.models.convert import load_hf_weights
from distflow_mc.models.gpt import build_gpt
from distflow_mc.models.hf_config import HFArch, read_hf_config
from distflow_mc.parallel.megatron_state import ModelParallel


def load_model(
    model_dir: str | Path,
    mp: ModelParallel,
    dtype: torch.dtype,
    value_head: bool = False,
    router_aux_loss_coef: float = 0.0,
    recompute: str | None = None,
    freeze_vision: bool = True,
    layer_spec: str = "AUTO",
) -> tuple[HFArch, list[MegatronModule]]:
    """This rank's chunks with HF weights; a critic's value head is freshly initialised."""
    arch = read_hf_config(model_dir)
    chunks = build_gpt(
        arch, mp, dtype, value_head, router_aux_loss_coef, recompute, freeze_vision, layer_spec
    )
    load_hf_weights(chunks, model_dir, arch, mp)
    return arch, chunks


def load_reference(
    model_dir: str | Path, mp: ModelParallel, dtype: torch.dtype, layer_spec: str = "AUTO"
) -> tuple[HFArch, list[MegatronModule]]:
    """The initial actor, frozen: the KL anchor never trains."""
    arch, chunks = load_model(model_dir, mp, dtype, layer_spec=layer_spec)
    for chunk in chunks:
        chunk.requires_grad_(False)
        chunk.eval()
    return arch, chunks
