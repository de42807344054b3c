"""megatron-core on a CPU-only torch: redirect the CUDA-only calls it makes.

Applied once, only when `torch.cuda.is_available()` is false; on a GPU nothing is touched.
Each redirect was needed by a real megatron-core 0.16 code path on gloo (see
shared/notes/megatron-cpu.md) and has a test in tests/unit/test_cpu_compat.py:

1. `torch.cuda.current_device()` is passed as `device=` (~100 places) -> "cpu".
2. `torch.cuda.synchronize()` (parallel_state, p2p, DDP, checkpointing) -> no-op.
3. The CUDA RNG tracker forks the CUDA generator -> a tracker that forks the CPU generator,
   and the module's get/set-state helpers (activation recompute) use the CPU generator.
4. Tensor factories called with device="cuda" (schedules, optimizer, DDP) -> CPU.
5. `Tensor.cuda()` (optimizer reload, tied embeddings under PP) -> identity.
6. `Tensor.type()` with no argument is compared with 'torch.cuda.FloatTensor' by
   clip_grads and the optimizers -> answers with the cuda spelling.
7. CUDA streams and events around DDP overlap and checkpoint loading -> inert stand-ins.
8. The MoE token dispatcher moves its split sizes "to the CPU" (as numpy) only when they
   are CUDA tensors; on CPU they stay tensors, which `all_to_all_single` refuses as sizes
   -> the same conversion for CPU tensors.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.utils._device  # not always loaded by `import torch`

FACTORIES = (
    "empty",
    "zeros",
    "ones",
    "full",
    "arange",
    "tensor",
    "as_tensor",
    "rand",
    "randn",
    "randint",
    "empty_like",
    "zeros_like",
    "ones_like",
    "full_like",
    "rand_like",
    "randn_like",
)

_applied: list[bool] = []


def cpu_device(device: Any) -> Any:
    """'cuda', 'cuda:1', torch.device('cuda') or a bare GPU index -> 'cpu'; else unchanged."""
    if isinstance(device, int) and not isinstance(device, bool):
        return "cpu"
    if isinstance(device, str | torch.device) and torch.device(device).type == "cuda":
        return "cpu"
    return device


def _on_cpu(factory: Callable) -> Callable:
    @functools.wraps(factory)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if "device" in kwargs:
            kwargs["device"] = cpu_device(kwargs["device"])
        return factory(*args, **kwargs)

    return wrapper


class InertStream:
    """Stands in for torch.cuda.Stream: CPU work is already ordered."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> InertEvent:
        return event or InertEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class InertEvent:
    """Stands in for torch.cuda.Event."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: Any) -> float:
        return 0.0


@contextlib.contextmanager
def _inert_stream_context(stream: Any = None) -> Iterator[None]:
    yield


def _cuda_spelled_type(original: Callable) -> Callable:
    @functools.wraps(original)
    def type_(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kw: Any) -> Any:
        if dtype is None and not kw:
            name = original(self)
            if self.device.type == "cpu" and name.startswith("torch.") and ".cuda." not in name:
                return "torch.cuda." + name.removeprefix("torch.")
            return name
        return original(self, dtype, non_blocking, **kw)

    return type_


def _cpu_rng_tracker_class() -> type:
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """megatron's tracker interface over the CPU generator."""

        def add(self, name: str, seed: int) -> None:
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.states_[name] = torch.get_rng_state()

        @contextlib.contextmanager
        def fork(self, name: str = mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer)

    return CpuRNGStatesTracker


def apply_cpu_compat() -> bool:
    """Install the redirects when CUDA is absent. Idempotent; True when they are active."""
    if torch.cuda.is_available():
        return False
    if _applied:
        return True
    from megatron.core.tensor_parallel import random as mrandom

    cuda = torch.cuda
    cuda.current_device = lambda: "cpu"
    cuda.synchronize = lambda device=None: None
    cuda.Stream, cuda.Event = InertStream, InertEvent
    cuda.current_stream = cuda.default_stream = lambda device=None: InertStream()
    cuda.stream = _inert_stream_context
    # torch's device contexts (`with torch.device("meta")`, used by transformers' loader)
    # recognise factories through a set cached on first use: cache it with the builtins
    # before they are wrapped, or those contexts silently stop applying.
    torch.utils._device._device_constructors()
    for name in FACTORIES:
        setattr(torch, name, _on_cpu(getattr(torch, name)))
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.Tensor.type = _cuda_spelled_type(torch.Tensor.type)
    mrandom.CudaRNGStatesTracker = _cpu_rng_tracker_class()
    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    _move_split_sizes_on_cpu()
    _applied.append(True)
    return True


def _move_split_sizes_on_cpu() -> None:
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    original = moe_utils.maybe_move_tensor_to_cpu

    @functools.wraps(original)
    def move(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
        if as_numpy and torch.is_tensor(tensor) and tensor.device.type == "cpu":
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = token_dispatcher.maybe_move_tensor_to_cpu = move
