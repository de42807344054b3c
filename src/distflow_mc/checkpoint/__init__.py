"""Checkpoints (megatron dist_checkpointing, atomic) and Hugging Face export."""
