"""Images of multimodal rows (issue #27), in the format verl and siiRL read: an `images`
column (a list of {"bytes": ...} or {"path": ...}, or plain paths) and one `<image>`
placeholder per image in the prompt's text, in order. The model's own image processor (its
directory's preprocessor_config.json) turns them into patches and each image's patch grid;
each placeholder becomes the model's vision start token, one image token per merged patch
and the vision end token, as the model's processor writes them. An image that cannot be
read, a count of placeholders that does not match the images, or an image of more than
data.max_image_pixels pixels makes the row malformed (file and row named).

(transformers' Qwen2.5-VL processor also builds a video processor, which needs torchvision,
not installable beside a CPU-only torch; the image processor and the tokenizer do what
the processor's call does for images.)
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoImageProcessor, PreTrainedTokenizerBase

from distflow_mc.data.dataset import PLACEHOLDER, MalformedRow, PromptRow
from distflow_mc.rollout.engine import Images


class _PilBackend(logging.Filter):
    """transformers announces that it falls back to the PIL image processor without
    torchvision (not installable beside a CPU-only torch): expected here, not news."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_PilBackend())


@dataclass(frozen=True)
class ImageInputs:
    """What turns a row's images into a prompt's: the model's image processor, its tokens
    for an image, and how many patches one image token merges."""

    processor: Any  # a transformers image processor
    start: str  # the tokens' text: vision start, image, vision end
    image: str
    end: str
    merge: int  # image tokens per image: patches // merge
    max_pixels: int  # data.max_image_pixels

    @classmethod
    def of(cls, model_dir: str | Path, tokenizer: PreTrainedTokenizerBase, max_pixels: int):
        """From a vision-language model's directory; ValueError names what is missing."""
        model_dir = Path(model_dir)
        if not (model_dir / "preprocessor_config.json").is_file():
            raise ValueError(
                f"model.path={model_dir}: a vision-language model needs its image processor"
                " (preprocessor_config.json) beside config.json"
            )
        config = json.loads((model_dir / "config.json").read_text())
        processor = AutoImageProcessor.from_pretrained(model_dir)
        names = tokenizer.convert_ids_to_tokens(
            [config[k] for k in ("vision_start_token_id", "image_token_id", "vision_end_token_id")]
        )
        return cls(processor, *names, processor.merge_size**2, max_pixels)

    def take(self, row: PromptRow, where: str) -> tuple[PromptRow, Images | None]:
        """The row with each placeholder written out, and its images; MalformedRow says
        what is wrong. A row without images is text only."""
        column = row.extra.get("images")
        texts = _texts(row.prompt)
        placeholders = sum(t.count(PLACEHOLDER) for t in texts)
        pictures = [self._decode(x, i, where) for i, x in enumerate(_listed(column, where))]
        if placeholders != len(pictures):
            raise MalformedRow(
                f"{where}: the prompt has {placeholders} '{PLACEHOLDER}' placeholders and the"
                f" row {len(pictures)} images"
            )
        extra = {k: v for k, v in row.extra.items() if k != "images"}
        if not pictures:
            return replace(row, extra=extra), None
        out = self.processor(images=pictures, return_tensors="pt")
        grid = out["image_grid_thw"].to(torch.int64)
        counts = iter((grid.prod(-1) // self.merge).tolist())

        def written(text: str) -> str:
            parts = text.split(PLACEHOLDER)
            tokens = [self.start + self.image * next(counts) + self.end for _ in parts[1:]]
            return parts[0] + "".join(t + p for t, p in zip(tokens, parts[1:], strict=True))

        prompt = (
            written(row.prompt)
            if isinstance(row.prompt, str)
            else [{**m, "content": written(m["content"])} for m in row.prompt]
        )
        return replace(row, prompt=prompt, extra=extra), Images(out["pixel_values"], grid)

    def _decode(self, item: Any, i: int, where: str) -> Image.Image:
        what = f"{where}: image {i}"
        if isinstance(item, dict) and item.get("bytes") is not None:
            source: Any = io.BytesIO(item["bytes"])
        elif isinstance(item, dict) and isinstance(item.get("path"), str):
            source = item["path"]
        elif isinstance(item, str):
            source = item
        else:
            raise MalformedRow(f"{what} is not {{bytes}}, {{path}} or a path")
        try:
            with Image.open(source) as image:
                if image.width * image.height > self.max_pixels:
                    raise MalformedRow(
                        f"{what} has {image.width} x {image.height} pixels, more than"
                        f" data.max_image_pixels={self.max_pixels}"
                    )
                return image.convert("RGB")
        except MalformedRow:
            raise
        except Exception as e:  # PIL raises many kinds: the row names it
            raise MalformedRow(f"{what} cannot be read ({type(e).__name__}: {e})") from e


def _texts(prompt: str | list[dict[str, str]]) -> list[str]:
    return [prompt] if isinstance(prompt, str) else [m["content"] for m in prompt]


def _listed(column: Any, where: str) -> list[Any]:
    if column is None:
        return []
    if not isinstance(column, list):
        raise MalformedRow(f"{where}: 'images' must be a list, got {type(column).__name__}")
    return column
