"""The placement rule as a check: a torch function mode that records every tensor factory
called from distflow_mc without an explicit device (file:line). On a GPU such a call makes
a CPU tensor beside CUDA ones. Used by the placement and redistribution workers."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

ROOT = Path(__file__).resolve().parents[2]
SRC = str(ROOT / "src" / "distflow_mc")
# torch itself, and the CPU redirect layer that megatron-core's own factory calls pass through
PASS_THROUGH = (str(Path(torch.__file__).parent), f"{SRC}/parallel/cpu_compat.py")
FACTORIES = {
    torch.tensor,
    torch.as_tensor,
    torch.zeros,
    torch.ones,
    torch.empty,
    torch.full,
    torch.arange,
    torch.linspace,
    torch.eye,
    torch.rand,
    torch.randn,
    torch.randint,
}


class FactoryDevices(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.missing: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and "device" not in kwargs:
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.startswith(PASS_THROUGH):
                frame = frame.f_back
            if frame is not None and frame.f_code.co_filename.startswith(SRC):
                where = frame.f_code.co_filename.removeprefix(SRC + "/")
                self.missing.add(f"{where}:{frame.f_lineno} torch.{func.__name__}")
        return func(*args, **kwargs)
