"""distflow_mc: fully distributed RL post-training for LLMs, after DistFlow (arXiv 2507.13833)."""

import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType

import torch

__version__ = "0.1.0"


class _UnfusedOnCpu(importlib.abc.MetaPathFinder):
    """megatron-core wraps its fusable kernels in torch.compile as it imports them, which
    sets up dynamo and inductor: about 2 s of every process start, for kernels that a CPU
    run never calls (every fusion is off in our configs). On CPU, megatron's own
    `disable_jit_fuser()` runs right after its `megatron.core.jit` module, before any
    kernel is decorated."""

    def find_spec(self, name: str, path: object = None, target: object = None):
        if name != "megatron.core.jit":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def load_unfused(module: ModuleType) -> None:
            load(module)
            module.disable_jit_fuser()

        spec.loader.exec_module = load_unfused
        return spec


if not torch.cuda.is_available():
    if "megatron.core.jit" not in sys.modules:
        sys.meta_path.insert(0, _UnfusedOnCpu())
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
