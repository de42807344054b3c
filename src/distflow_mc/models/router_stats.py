"""Router statistics of MoE models: how evenly each layer's router spreads tokens over its
experts, collected with forward hooks on megatron's routers (no change to the model)."""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.router import TopKRouter


class RouterStats:
    """Per training step: tokens routed to each expert, summed over a layer's forwards."""

    def __init__(self, chunks: list[torch.nn.Module]) -> None:
        self.counts: dict[int, torch.Tensor] = {}
        self.routers = [m for c in chunks for m in c.modules() if isinstance(m, TopKRouter)]
        for i, router in enumerate(self.routers):
            router.register_forward_hook(self._hook(i))

    def _hook(self, layer: int):
        def record(module: torch.nn.Module, args: tuple, output: tuple) -> None:
            routed = output[1].sum(0).detach()  # routing_map [tokens, experts]
            self.counts[layer] = self.counts.get(layer, 0) + routed

        return record

    def take(self) -> dict[str, float]:
        """Mean over layers of max/mean tokens per expert (1.0: perfectly even) and the
        fraction of experts that got no token; resets the counts."""
        if not self.counts:
            return {}
        loads = torch.stack([c.float() for c in self.counts.values()])
        self.counts = {}
        imbalance = loads.max(dim=1).values / loads.mean(dim=1).clamp(min=1e-9)
        return {
            "router_load_max_over_mean": float(imbalance.mean()),
            "router_idle_expert_frac": float((loads == 0).float().mean()),
        }
