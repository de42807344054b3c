"""distflow_mc: fully distributed RL post-training for LLMs, after DistFlow (arXiv 2507.13833)."""

import warnings

import torch

__version__ = "0.1.0"

if not torch.cuda.is_available():
    # On a CPU run megatron-core announces, at import, that the GPU-only TransformerEngine and
    # Apex are absent, and advises a CUDA setting during TP forwards: expected here, not news.
    for message in (
        r"(Transformer Engine and )?Apex (is|are) not installed",
        r"When using async grad allreduce it is recommended to set the environment variable"
        r" CUDA_DEVICE_MAX_CONNECTIONS",
    ):
        warnings.filterwarnings("ignore", message=message, category=UserWarning)

# megatron-core 0.16 still calls the collectives torch 2.13 renamed (all_gather_single,
# reduce_scatter_single); the old names work and warn on every call from its MoE dispatch.
warnings.filterwarnings(
    "ignore",
    message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
    category=FutureWarning,
)
