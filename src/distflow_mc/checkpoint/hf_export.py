"""Write the actor as a Hugging Face checkpoint (config, safetensors shards with an index,
tokenizer) that transformers loads as it is."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch.distributed as dist
from megatron.core.transformer.module import MegatronModule
from safetensors.torch import save_file

from distflow_mc.models.convert import export_hf
from distflow_mc.models.hf_config import HFArch
from distflow_mc.parallel.megatron_state import ModelParallel

# Files of the source directory that describe the model rather than its weights.
CARRIED = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "preprocessor_config.json",  # a vision-language model's image processor
    "processor_config.json",
)


def save_hf(
    chunks: list[MegatronModule],
    arch: HFArch,
    mp: ModelParallel,
    source_dir: str | Path,
    out_dir: str | Path,
    shard_bytes: int = 2 << 30,
) -> Path:
    """Collective (every rank joins the export); rank 0 writes. The directory appears
    complete or not at all: it is written aside and renamed into place."""
    out = Path(out_dir)
    partial = out.with_name(out.name + ".partial")
    writer = dist.get_rank() == 0
    if writer:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    weight_map: dict[str, str] = {}
    for i, bucket in enumerate(export_hf(chunks, arch, mp, shard_bytes)):
        if writer:
            name = f"model-{i + 1:05d}.safetensors"
            save_file(  # copies: the bucket may hold views of the model's own weights
                {n: t.to("cpu", copy=True).contiguous() for n, t in bucket},
                partial / name,
                metadata={"format": "pt"},
            )
            weight_map.update(dict.fromkeys((n for n, _ in bucket), name))
    if writer:
        index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
        (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        for name in CARRIED:
            if (Path(source_dir) / name).is_file():
                shutil.copy(Path(source_dir) / name, partial / name)
        shutil.rmtree(out, ignore_errors=True)
        partial.rename(out)
    dist.barrier()
    return out
