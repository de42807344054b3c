"""Checkpoints (megatron dist_checkpointing, atomic) and Hugging Face export."""

from distflow_mc.checkpoint.manager import latest_step, load, save

__all__ = ["latest_step", "load", "save"]
