"""torch.distributed setup and the cross-rank agreement check. No rank is special."""

from __future__ import annotations

import atexit
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device
    timeout: timedelta  # parallel.timeout_s: every process group made later gets it too


def rank_from_env() -> int:
    """This process's global rank as torchrun announces it (0 for a plain `python -m`)."""
    return int(os.environ.get("RANK", "0"))


def world_size_from_env() -> int:
    """The world size torchrun announces (1 for a plain `python -m`), known before init."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def ranks_per_node_from_env() -> int:
    """Ranks on this node (torchrun's LOCAL_WORLD_SIZE), known before init."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size_from_env()))


def init_distributed(timeout_s: float) -> DistContext:
    """Initialise the default process group once per process; later calls reuse it.

    NCCL for CUDA tensors when a GPU is present, with gloo beside it for CPU tensors; gloo
    alone on CPU. `timeout_s` bounds every collective, so a dead peer is an error, not a hang.
    Without torchrun (no MASTER_ADDR) a single-rank group on an in-memory store is made, so
    the rest of the code never needs a separate single-process path.

    The group outlives a job because Hydra multirun runs several jobs in one process, and a
    group re-created on torchrun's store would read the previous group's stale gloo
    addresses: every job of a sweep shares the first job's `parallel.timeout_s`.
    """
    rank = rank_from_env()
    world_size = world_size_from_env()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        backend, device = "cpu:gloo,cuda:nccl", torch.device("cuda", local_rank)
    else:
        backend, device = "gloo", torch.device("cpu")
    timeout = timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(
                backend,
                store=_attempt_store(rank, world_size, timeout),
                rank=rank,
                world_size=world_size,
                timeout=timeout,
            )
        elif world_size == 1:
            dist.init_process_group(
                backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
            )
        else:
            raise ValueError(
                f"WORLD_SIZE={world_size} but MASTER_ADDR is not set: launch with torchrun"
            )
        atexit.register(dist.destroy_process_group)
    return DistContext(rank, world_size, local_rank, backend, device, timeout)


def _attempt_store(rank: int, world_size: int, timeout: timedelta) -> dist.Store:
    """The rendezvous store, namespaced by torchrun's restart count. After a restart the
    store still holds the failed attempt's keys; megatron's groups get the same names
    again and would read the dead processes' addresses."""
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # torchrun hosts it
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=rank == 0 and not agent,
        timeout=timeout,
    )
    return dist.PrefixStore(
        f"distflow/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store
    )


class AgreementError(ValueError):
    """Ranks computed different plans or configs; raised on every rank."""


def _flatten(value: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(value, Mapping):
        out: dict[str, str] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: json.dumps(value, sort_keys=True, default=str)}


def _describe_difference(payloads: list[dict[str, str]], limit: int = 10) -> list[str]:
    keys = sorted(set().union(*payloads))
    lines = []
    for key in keys:
        values = [p.get(key, "<absent>") for p in payloads]
        if len(set(values)) > 1:
            per_rank = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            lines.append(f"{key} ({per_rank})")
    if len(lines) > limit:
        lines = [*lines[:limit], f"... and {len(lines) - limit} more"]
    return lines


def check_agreement(fingerprint: str, payload: Mapping[str, Any], ctx: DistContext) -> None:
    """All-gather every rank's fingerprint; on mismatch gather the payloads (plan and
    resolved config) to name the settings that differ, and raise on every rank."""
    if ctx.world_size == 1:
        return
    digest = torch.tensor(list(bytes.fromhex(fingerprint)), dtype=torch.uint8, device=ctx.device)
    gathered = torch.empty(ctx.world_size * digest.numel(), dtype=torch.uint8, device=ctx.device)
    dist.all_gather_single(gathered, digest)
    prints = [bytes(row.tolist()).hex() for row in gathered.view(ctx.world_size, -1).cpu()]
    if len(set(prints)) == 1:
        return
    payloads: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(payloads, _flatten(payload))
    groups: dict[str, list[int]] = {}
    for r, fp in enumerate(prints):
        groups.setdefault(fp, []).append(r)
    who = "; ".join(f"ranks {ranks} have {fp[:12]}" for fp, ranks in groups.items())
    diffs = "\n".join(f"  - {d}" for d in _describe_difference(payloads))
    # Nobody leaves before everyone knows: torchrun kills the survivors of the first exit.
    dist.barrier()
    raise AgreementError(
        f"ranks disagree on the plan/config fingerprint: {who}. Differences:\n{diffs}\n"
        "Every rank must get the same config, overrides and environment-derived values."
    )
