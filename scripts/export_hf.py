"""Export a checkpoint's actor as a Hugging Face model directory (config, safetensors,
tokenizer) that transformers loads as it is.

    python scripts/export_hf.py outputs/<run id>/checkpoints OUT_DIR [--step N]

Runs in one process on CPU whatever layout saved the checkpoint (dist_checkpointing
reshards). The checkpoint's resolved config names the base model directory, which
supplies the architecture and tokenizer files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from omegaconf import OmegaConf

from distflow_mc import checkpoint
from distflow_mc.checkpoint.hf_export import save_hf
from distflow_mc.config.schema import Config, ModelConfig, ParallelConfig
from distflow_mc.models.factory import load_model
from distflow_mc.models.train import TrainableModel
from distflow_mc.parallel.dist import init_distributed
from distflow_mc.parallel.megatron_state import init_model_parallel


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoints", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--step", type=int, default=None, help="default: the latest complete")
    args = parser.parse_args()
    init_distributed(timeout_s=600)
    step = args.step or checkpoint.latest_intact_step(args.checkpoints)
    if step is None:
        raise SystemExit(f"no complete checkpoint in {args.checkpoints}")
    state = json.loads((args.checkpoints / f"step_{step:08d}" / "trainer_state.json").read_text())
    saved = state["config"]
    model = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), saved["model"]))
    trainer = OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(Config().trainer), saved["trainer"])
    )
    mp = init_model_parallel(ParallelConfig(), seed=0)
    # (the parameters that trained, a vision tower's when it did, as the optimizer saved them)
    arch, chunks = load_model(model.path, mp, torch.float32, freeze_vision=model.freeze_vision)
    actor = TrainableModel(chunks, trainer.actor_optim, max(trainer.total_steps, 1))
    checkpoint.load(args.checkpoints, step, {"actor": actor})
    print(f"wrote {save_hf(actor.modules, arch, mp, model.path, args.out)} (step {step})")


if __name__ == "__main__":
    main()
