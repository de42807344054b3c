"""Hugging Face <-> Megatron weights, both ways, streaming.

Loading reads, for each Megatron parameter of this rank, only its TP shard of the HF tensors
(safetensors slices of a memory-mapped file). Export gathers each parameter over TP, turns it
back into HF names and layout, and yields buckets of bounded size: the same iterator feeds
rollout weight sync and HF checkpoint export.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core.transformer.module import MegatronModule
from safetensors import safe_open

from distflow_mc.models.gpt import ValueHead
from distflow_mc.models.hf_config import HFArch
from distflow_mc.parallel.megatron_state import ModelParallel

Bucket = list[tuple[str, torch.Tensor]]


class HFCheckpoint:
    """Tensors of a HF model directory: one `model.safetensors` or shards with an index."""

    def __init__(self, model_dir: str | Path) -> None:
        self.dir = Path(model_dir)
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        if index.is_file():
            self.files = {
                k: self.dir / v for k, v in json.loads(index.read_text())["weight_map"].items()
            }
        elif single.is_file():
            with safe_open(single, framework="pt") as f:
                self.files = dict.fromkeys(f.keys(), single)
        else:
            raise ValueError(f"model.path: no model.safetensors(.index.json) in '{model_dir}'")
        self._open: dict[Path, object] = {}

    def _slice(self, name: str):  # safetensors PySafeSlice: no public type to annotate
        if name not in self.files:
            raise ValueError(f"{self.dir}: tensor '{name}' is missing from the checkpoint")
        path = self.files[name]
        if path not in self._open:
            self._open[path] = safe_open(path, framework="pt")
        return self._open[path].get_slice(name)

    def read(
        self,
        name: str,
        shape: tuple[int, ...],
        rows: slice = slice(None),
        cols: slice | None = None,
    ) -> torch.Tensor:
        """Rows (and columns) of `name`, after checking its full shape is `shape`."""
        sl = self._slice(name)
        actual = tuple(sl.get_shape())
        if actual != shape:
            raise ValueError(f"{self.dir}: tensor '{name}' has shape {actual}, expected {shape}")
        return sl[rows] if cols is None else sl[rows, cols]


@dataclass(frozen=True)
class Rule:
    """How one Megatron parameter is made of HF tensors.

    kind: "rep" replicated; "row" split over TP along dim 0; "vocab" like "row", over the
    vocabulary padded to a multiple of TP (padding rows are zero, dropped on export); "col"
    split along dim 1;
    "qkv" q/k/v interleaved per query group, groups split over TP; "gate_up" [gate; up],
    each split along dim 0.
    """

    kind: str
    hf: tuple[str, ...]
    expert: int | None = None  # a MoE layer's local expert: `hf` names hold "{e}"

    def for_expert(self, e: int) -> Rule:
        """The rule with the global expert number filled in."""
        return Rule(self.kind, tuple(h.format(e=e) for h in self.hf))


_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")
_EXPERT = re.compile(r"mlp\.experts\.local_experts\.(\d+)\.(linear_fc1|linear_fc2)\.weight")


def rule_for(name: str, layer_numbers: list[int], arch: HFArch) -> Rule | None:
    """Rule for a parameter of a model chunk; None for parameters HF does not have."""
    if name == "embedding.word_embeddings.weight":
        return Rule("vocab", ("model.embed_tokens.weight",))
    if name == "output_layer.weight":
        return Rule("vocab", ("lm_head.weight",))
    if name == "decoder.final_layernorm.weight":
        return Rule("rep", ("model.norm.weight",))
    if arch.vision is not None and name.startswith("visual."):  # transformers' own module
        return Rule("rep", (name,))
    match = _LAYER.fullmatch(name)
    if not match:
        return None
    hf = f"model.layers.{layer_numbers[int(match.group(1))] - 1}"
    attn, mlp = f"{hf}.self_attn", f"{hf}.mlp"
    rules = {
        "input_layernorm.weight": Rule("rep", (f"{hf}.input_layernorm.weight",)),
        "self_attention.linear_qkv.layer_norm_weight": Rule(
            "rep", (f"{hf}.input_layernorm.weight",)
        ),
        "pre_mlp_layernorm.weight": Rule("rep", (f"{hf}.post_attention_layernorm.weight",)),
        "mlp.linear_fc1.layer_norm_weight": Rule("rep", (f"{hf}.post_attention_layernorm.weight",)),
        "self_attention.linear_qkv.weight": Rule(
            "qkv", (f"{attn}.q_proj.weight", f"{attn}.k_proj.weight", f"{attn}.v_proj.weight")
        ),
        "self_attention.linear_qkv.bias": Rule(
            "qkv", (f"{attn}.q_proj.bias", f"{attn}.k_proj.bias", f"{attn}.v_proj.bias")
        ),
        "self_attention.linear_proj.weight": Rule("col", (f"{attn}.o_proj.weight",)),
        "self_attention.q_layernorm.weight": Rule("rep", (f"{attn}.q_norm.weight",)),
        "self_attention.k_layernorm.weight": Rule("rep", (f"{attn}.k_norm.weight",)),
        "mlp.linear_fc1.weight": Rule(
            "gate_up", (f"{mlp}.gate_proj.weight", f"{mlp}.up_proj.weight")
        ),
        "mlp.linear_fc2.weight": Rule("col", (f"{mlp}.down_proj.weight",)),
        "mlp.router.weight": Rule("rep", (f"{mlp}.gate.weight",)),
    }
    expert = _EXPERT.fullmatch(match.group(2))
    if expert:
        k, fc = int(expert.group(1)), expert.group(2)
        names = f"{mlp}.experts.{{e}}"
        if fc == "linear_fc1":
            return Rule("gate_up", (f"{names}.gate_proj.weight", f"{names}.up_proj.weight"), k)
        return Rule("col", (f"{names}.down_proj.weight",), k)
    return rules.get(match.group(2))


def _hf_shapes(rule: Rule, arch: HFArch, local: torch.Size, tp: int) -> list[tuple[int, ...]]:
    """Full HF shapes of the tensors behind a rule, from the local shard's shape."""
    if rule.kind == "rep":
        return [tuple(local)]
    if rule.kind == "row":
        return [(local[0] * tp, *local[1:])]
    if rule.kind == "vocab":
        return [(arch.vocab_size, *local[1:])]
    if rule.kind == "col":
        return [(local[0], local[1] * tp)]
    if rule.kind == "gate_up":
        return [(local[0] * tp // 2, local[1])] * 2
    d, tail = arch.head_dim, tuple(local[1:])
    return [
        (arch.num_heads * d, *tail),
        (arch.num_kv_heads * d, *tail),
        (arch.num_kv_heads * d, *tail),
    ]


def _load_shard(
    ckpt: HFCheckpoint, rule: Rule, arch: HFArch, local: torch.Size, mp: ModelParallel
) -> torch.Tensor:
    shapes = _hf_shapes(rule, arch, local, mp.tp)
    r, tp = mp.tp_rank, mp.tp
    if rule.kind == "rep":
        return ckpt.read(rule.hf[0], shapes[0])
    if rule.kind == "row":
        n = local[0]
        return ckpt.read(rule.hf[0], shapes[0], slice(r * n, (r + 1) * n))
    if rule.kind == "vocab":
        n, vocab = local[0], arch.vocab_size
        rows = ckpt.read(rule.hf[0], shapes[0], slice(min(r * n, vocab), min((r + 1) * n, vocab)))
        return torch.cat([rows, rows.new_zeros(n - len(rows), *rows.shape[1:])])
    if rule.kind == "col":
        n = local[1]
        return ckpt.read(rule.hf[0], shapes[0], slice(None), slice(r * n, (r + 1) * n))
    if rule.kind == "gate_up":
        n = local[0] // 2
        return torch.cat(
            [
                ckpt.read(h, s, slice(r * n, (r + 1) * n))
                for h, s in zip(rule.hf, shapes, strict=True)
            ]
        )
    groups = arch.num_kv_heads // tp
    q_rows = groups * (arch.num_heads // arch.num_kv_heads) * arch.head_dim
    kv_rows = groups * arch.head_dim
    q = ckpt.read(rule.hf[0], shapes[0], slice(r * q_rows, (r + 1) * q_rows))
    k = ckpt.read(rule.hf[1], shapes[1], slice(r * kv_rows, (r + 1) * kv_rows))
    v = ckpt.read(rule.hf[2], shapes[2], slice(r * kv_rows, (r + 1) * kv_rows))
    per_group = [t.reshape(groups, -1, *t.shape[1:]) for t in (q, k, v)]
    return torch.cat(per_group, dim=1).reshape(-1, *q.shape[1:])


def _params(
    chunks: list[MegatronModule], arch: HFArch
) -> Iterator[tuple[str, torch.Tensor, Rule | None]]:
    for chunk in chunks:
        layer_numbers = [layer.layer_number for layer in chunk.decoder.layers]
        for name, param in chunk.named_parameters():
            if name == "output_layer.weight" and isinstance(chunk.output_layer, ValueHead):
                yield name, param, None
            elif name == "output_layer.weight" and arch.tie_word_embeddings:
                yield name, param, Rule("vocab", ("model.embed_tokens.weight",))
            else:
                yield name, param, rule_for(name, layer_numbers, arch)


@torch.no_grad()
def load_hf_weights(
    chunks: list[MegatronModule], model_dir: str | Path, arch: HFArch, mp: ModelParallel
) -> None:
    """Fill this rank's chunks from a HF checkpoint; every parameter must be covered."""
    ckpt = HFCheckpoint(model_dir)
    for name, param, rule in _params(chunks, arch):
        if rule is None:
            if name == "output_layer.weight":
                continue  # a critic's value head starts fresh
            raise ValueError(f"no HF tensor maps to Megatron parameter '{name}'")
        if rule.expert is not None:
            rule = rule.for_expert(mp.ep_rank * _local_experts(arch, mp) + rule.expert)
        shard = _load_shard(ckpt, rule, arch, param.shape, mp)
        param.copy_(shard.to(param.dtype))


def _local_experts(arch: HFArch, mp: ModelParallel) -> int:
    assert arch.moe is not None
    return arch.moe.num_experts // mp.ep


def _gather_ep(t: torch.Tensor, mp: ModelParallel) -> list[torch.Tensor]:
    if mp.ep == 1:
        return [t]
    parts = [torch.empty_like(t) for _ in range(mp.ep)]
    dist.all_gather(parts, t.contiguous(), group=mp.ep_group)
    return parts


def _gather_tp(t: torch.Tensor, mp: ModelParallel) -> list[torch.Tensor]:
    if mp.tp == 1:
        return [t]
    parts = [torch.empty_like(t) for _ in range(mp.tp)]
    dist.all_gather(parts, t.contiguous(), group=mp.tp_group)
    return parts


def _cat(parts: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """The TP shards joined; the one shard itself (a view, no copy) without TP."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def _to_hf(rule: Rule, parts: list[torch.Tensor], arch: HFArch) -> list[tuple[str, torch.Tensor]]:
    """HF tensors from the TP shards of one parameter: views of it where the layouts agree
    (without TP), so an engine that adopts them reads the actor's own weights."""
    if rule.kind == "rep":
        return [(rule.hf[0], parts[0])]
    if rule.kind == "row":
        return [(rule.hf[0], _cat(parts))]
    if rule.kind == "vocab":
        return [(rule.hf[0], _cat(parts)[: arch.vocab_size])]
    if rule.kind == "col":
        return [(rule.hf[0], _cat(parts, dim=1))]
    if rule.kind == "gate_up":
        halves = [p.chunk(2) for p in parts]
        return [
            (rule.hf[0], _cat([h[0] for h in halves])),
            (rule.hf[1], _cat([h[1] for h in halves])),
        ]
    full = _cat(parts)
    hpg = arch.num_heads // arch.num_kv_heads
    grouped = full.reshape(arch.num_kv_heads, hpg + 2, arch.head_dim, *full.shape[1:])
    q, k, v = grouped.split([hpg, 1, 1], dim=1)
    return [(h, t.reshape(-1, *full.shape[1:])) for h, t in zip(rule.hf, (q, k, v), strict=True)]


def _stage_tensors(
    chunks: list[MegatronModule], arch: HFArch, mp: ModelParallel, trained_only: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """HF tensors of this PP stage, gathered over TP (every TP rank gets them); with
    `trained_only`, only those of parameters that train (a frozen vision tower's never
    change)."""
    for name, param, rule in _params(chunks, arch):
        if rule is None or (trained_only and not param.requires_grad):
            continue
        if name == "output_layer.weight" and arch.tie_word_embeddings:
            continue  # tied: HF stores only the embedding
        if rule.expert is None:
            yield from _to_hf(rule, _gather_tp(param.detach(), mp), arch)
            continue
        for ep_rank, shard in enumerate(_gather_ep(param.detach(), mp)):
            e = ep_rank * _local_experts(arch, mp) + rule.expert
            yield from _to_hf(rule.for_expert(e), _gather_tp(shard, mp), arch)


def _buckets(tensors: Iterator[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[Bucket]:
    bucket: Bucket = []
    size = 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


@torch.no_grad()
def export_hf(
    chunks: list[MegatronModule],
    arch: HFArch,
    mp: ModelParallel,
    bucket_bytes: int = 256 << 20,
    trained_only: bool = False,
) -> Iterator[Bucket]:
    """Yield the whole model as HF-named buckets of at most `bucket_bytes` (a larger
    tensor gets a bucket of its own), on every rank; with `trained_only`, only the
    parameters that train. Stages take turns: each broadcasts its buckets over the PP
    group, so memory stays bounded by one bucket beyond the model."""
    pp_ranks = dist.get_process_group_ranks(mp.pp_group)
    for stage, src in enumerate(pp_ranks):
        own = (
            _buckets(_stage_tensors(chunks, arch, mp, trained_only), bucket_bytes)
            if stage == mp.pp_rank
            else None
        )
        while True:
            bucket = next(own, None) if own is not None else None
            if mp.pp == 1:
                if bucket is None:
                    break
                yield bucket
                continue
            meta = [[(n, t.shape, t.dtype) for n, t in bucket] if bucket is not None else None]
            dist.broadcast_object_list(meta, src=src, group=mp.pp_group)
            if meta[0] is None:
                break
            if bucket is None:
                device = next(chunks[0].parameters()).device
                bucket = [(n, torch.empty(s, dtype=d, device=device)) for n, s, d in meta[0]]
            for _, tensor in bucket:
                dist.broadcast(tensor, src=src, group=mp.pp_group)
            yield bucket
