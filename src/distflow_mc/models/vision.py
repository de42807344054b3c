"""Qwen2.5-VL on megatron (issue #27): the language model is the GPTModel of the text
config with multimodal RoPE, each token turning the head's frequency sections with its
time, height and width position (text tokens: the same position in all three); the vision
tower is transformers' own module, built from the checkpoint's vision config on the first
pipeline stage, and its merged patches replace the embeddings of the image tokens before
the first layer. A micro-batch carries its images as `pixel_values` (every image's
patches, in the order their tokens appear, row by row) and `image_grid_thw` (each image's
patch grid), and each token's three positions (`mrope_positions`, [b, s, 3]).
"""

from __future__ import annotations

import itertools
from functools import partial
from typing import TYPE_CHECKING

import torch

from distflow_mc.models.hf_config import Vision
from distflow_mc.rollout.engine import Images

if TYPE_CHECKING:  # (the engines use the positions without megatron)
    from megatron.core.models.gpt import GPTModel

# a micro-batch's, not per sample: its distinct images' patches and grids, then per sample
# with images (in row order) which of them, and each one's image tokens
IMAGES = ("pixel_values", "image_grid_thw", "image_order", "image_sizes")


def attach_vision(model: GPTModel, vision: Vision, dtype: torch.dtype, frozen: bool) -> None:
    """The vision tower on the first stage (`frozen`: it does not train, model.freeze_vision),
    and its embedding of the images (the stages after it read hidden states: they leave
    the images aside)."""
    model.register_forward_pre_hook(partial(_embed, vision.image_token_id), with_kwargs=True)
    if not model.pre_process:
        return
    from transformers import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
        Qwen2_5_VisionTransformerPretrainedModel,
    )

    config = Qwen2_5_VLVisionConfig(**vision.config)
    model.visual = Qwen2_5_VisionTransformerPretrainedModel._from_config(config, dtype=dtype)
    model.visual.requires_grad_(not frozen)


def _embed(image_token: int, model: GPTModel, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """GPTModel's input embeddings with each image token's replaced by the vision tower's
    output for it (as `decoder_input`): the tokens `image_mask` marks (a prompt's; an image
    token a model generates is text to it, as to the engine), else every image token."""
    pixels, grid, order, sizes, where = (kwargs.pop(k, None) for k in (*IMAGES, "image_mask"))
    if pixels is None or not model.pre_process:
        return args, kwargs
    ids = args[0] if args else kwargs["input_ids"]
    if where is None:  # (prompts only: every image token is an image's)
        where = ids == image_token
    embeddings = model.embedding(input_ids=ids, position_ids=None)  # [s, b, h]
    dtype, device = next(model.visual.parameters()).dtype, embeddings.device
    images = model.visual(pixels.to(device, dtype), grid_thw=grid.to(device)).pooler_output
    if order is not None:  # each sample's images, from its group's one encoding
        parts = images.split(sizes.tolist())
        images = torch.cat([parts[k] for k in order.tolist()])
    if int(where.sum()) != len(images):
        raise ValueError(
            f"a micro-batch has {int(where.sum())} image tokens and its images"
            f" {len(images)} embeddings (image_grid_thw {grid.tolist()})"
        )
    rows = embeddings.transpose(0, 1).masked_scatter(where[..., None], images.to(embeddings.dtype))
    kwargs["decoder_input"] = rows.transpose(0, 1).contiguous()
    return args, kwargs


def microbatch_images(
    images: list[Images | None], merge: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """A micro-batch's images as the model takes them, on `device` (the batch's), for its
    samples in the order its rows hold them (the order of their image tokens; none for
    text-only samples): each distinct images object once (a group's samples hold their
    prompt's: the vision tower encodes them once, not once per sample, the same math), and
    which one each sample's image tokens take."""
    given = [im for im in images if im is not None]
    if not given:
        return {}
    unique = list({id(im): im for im in given}.values())
    where = {id(im): k for k, im in enumerate(unique)}
    order = [where[id(im)] for im in given]
    sizes = [int(im.grid_thw.prod(-1).sum()) // merge**2 for im in unique]
    return {
        "pixel_values": torch.cat([im.pixel_values for im in unique]).to(device),
        "image_grid_thw": torch.cat([im.grid_thw for im in unique]).to(device),
        "image_order": torch.tensor(order, dtype=torch.int64, device=device),
        "image_sizes": torch.tensor(sizes, dtype=torch.int64, device=device),
    }


def sample_positions(
    ids: torch.Tensor, prompt: int, grids: torch.Tensor, image_token: int, merge: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A sample's three positions per token ([len, 3]) and which of its tokens are its
    images': the prompt's as `mrope_positions` gives them; the response counts on from one
    past the prompt's largest position, as generation does (an image token it holds is
    text)."""
    head = mrope_positions(ids[:prompt], grids, image_token, merge)
    start = int(head.max()) + 1 if prompt else 0
    tail = torch.arange(start, start + len(ids) - prompt, device=ids.device)
    mask = ids == image_token
    mask[prompt:] = False
    return torch.cat([head, tail[:, None].expand(-1, 3)]), mask


def row_positions(
    ids: torch.Tensor, grids: torch.Tensor, image_token: int, merge: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions ([len, 3]) and image tokens of a row whose images (`grids`) are its first
    runs of image tokens, as a prompt's are; a run after them is text (image tokens a model
    generated, in a later turn of its trajectory): `sample_positions` without knowing where
    the prompt ends."""
    runs = [
        (image, len(list(run))) for image, run in itertools.groupby((ids == image_token).tolist())
    ]
    images, end = len(grids), 0
    for image, n in runs:
        images -= image
        end += n
        if images == 0:
            break
    prompt = end if len(grids) else 0
    return sample_positions(ids, prompt, grids, image_token, merge)


def mrope_positions(
    ids: torch.Tensor, grids: torch.Tensor, image_token: int, merge: int
) -> torch.Tensor:
    """[len, 3]: each token's time, height and width positions for a sample's `ids`, as
    transformers' Qwen2.5-VL computes them: text tokens count on in all three; a run of
    image tokens is the next image of `grids` ([images, 3]: its patch grid t, h, w), whose
    tokens take its merged grid's frames, rows and columns from where the text stopped;
    the text after it goes on from one past the image's larger merged side."""
    parts, start, images, dev = [], 0, iter(grids.tolist()), ids.device
    for image, run in itertools.groupby((ids == image_token).tolist()):
        n = len(list(run))
        if not image:
            parts.append(torch.arange(start, start + n, device=dev).expand(3, n))
            start += n
            continue
        t, h, w = next(images)
        axes = [torch.arange(k, device=dev) for k in (t, h // merge, w // merge)]
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij")).reshape(3, -1)
        if grid.shape[1] != n:
            raise ValueError(f"an image of grid {[t, h, w]} has {n} image tokens")
        parts.append(grid + start)
        start += max(h, w) // merge
    out = torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.int64, device=dev)
    return out.T


def mrope_angles(
    freqs: torch.Tensor, positions: torch.Tensor, sections: tuple[int, ...]
) -> torch.Tensor:
    """Per-token rotary angles [s, b, 1, d] from megatron's per-position ones ([s, 1, 1, d]:
    position p's in row p, both halves equal) and each token's three positions ([3, b, s]):
    each frequency from the position of its section's axis."""
    table = freqs[:, 0]
    half = freqs.shape[-1] // 2
    axis = torch.repeat_interleave(
        torch.arange(len(sections), device=freqs.device),
        torch.tensor(sections, device=freqs.device),
        output_size=half,
    ).repeat(2)
    t, h, w = (table[p.T] for p in positions)  # [s, b, 1, d]
    return torch.where(axis == 0, t, torch.where(axis == 1, h, w))
