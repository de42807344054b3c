"""Checkpoints (megatron dist_checkpointing, atomic) and Hugging Face export."""

from distflow_mc.checkpoint.manager import (
    check_resumable,
    complete_steps,
    latest_intact_step,
    load,
    save,
    trainer_state,
)

__all__ = [
    "check_resumable",
    "complete_steps",
    "latest_intact_step",
    "load",
    "save",
    "trainer_state",
]
