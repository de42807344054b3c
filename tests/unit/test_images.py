"""Vision-language rows (data/images.py) through the prompt loader, from real parquet and
jsonl files: images as bytes, paths and plain paths, placeholders in the text or chat
content parts of type image; placeholders written out as the model's image tokens;
pixels equal to the image processor's own; each bad row named."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor

from distflow_mc.config.schema import DataConfig, OnBadRow
from distflow_mc.data.dataset import MalformedRow
from distflow_mc.data.images import ImageInputs
from distflow_mc.data.loader import PromptLoader
from distflow_mc.data.tiny import make_tokenizer
from tests.tiny_hf import make_tiny_model

VL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
MAX_PIXELS = 5000


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    path = tmp_path_factory.mktemp("vl")
    tok = make_tokenizer(path, VL_TOKENS)
    start, end, image, video = tok.convert_tokens_to_ids(list(VL_TOKENS))
    ids = dict(vision_start_token_id=start, vision_end_token_id=end, image_token_id=image)
    make_tiny_model("qwen2_5_vl", path, video_token_id=video, **ids)
    Qwen2VLImageProcessorPil(
        min_pixels=28 * 28, max_pixels=56 * 56, patch_size=14, merge_size=2
    ).save_pretrained(path)
    return path, tok, ids


def png(color: tuple[int, int, int], size: tuple[int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


def row(content: str | list[dict], images) -> dict:
    return {
        "prompt": [{"role": "user", "content": content}],
        "data_source": "tiny_copy",
        "reward_model": {"ground_truth": "1"},
        "images": images,
    }


def test_images_become_the_models_tokens_and_pixels_and_bad_rows_are_named(model, tmp_path):
    path, tok, ids = model
    blue = tmp_path / "blue.png"
    blue.write_bytes(png((0, 0, 255), (28, 84)))
    red = png((255, 0, 0), (56, 56))
    rows = [
        row(
            "<image> and <image>: red?",
            [{"bytes": red, "path": None}, {"bytes": None, "path": str(blue)}],
        ),
        row("no image", []),
        row("<image>", [{"bytes": b"not an image", "path": None}]),
        row("<image>", [{"bytes": red, "path": None}, {"bytes": red, "path": None}]),
        row("<image>", [{"bytes": png((0, 0, 0), (100, 100)), "path": None}]),
        row("<image>", [{"bytes": None, "path": str(tmp_path / "missing.png")}]),
    ]
    parquet = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    jsonl = tmp_path / "rows.jsonl"
    parts = [{"type": "image"}, {"type": "text", "text": " plain path, content parts"}]
    jsonl.write_text(json.dumps(row(parts, [str(blue)])) + "\n")
    config = DataConfig(
        train_files=[str(parquet), str(jsonl)],
        batch_size=7,
        shuffle=False,
        prefetch=False,
        max_image_pixels=MAX_PIXELS,
    )
    inputs = ImageInputs.of(path, tok, config.max_image_pixels)
    got = PromptLoader(config, tok, 0, 1, seed=0, images=inputs).next()
    assert got.malformed == 4
    batch = got.batch
    assert batch.samples["uid"].tolist() == [0, 1, 6]
    processor = AutoImageProcessor.from_pretrained(path)
    red_img, blue_img = (
        Image.open(io.BytesIO(red)).convert("RGB"),
        Image.open(blue).convert("RGB"),
    )
    want = processor(images=[red_img, blue_img], return_tensors="pt")
    first, text, plain = batch.objects["images"]
    assert torch.equal(first.pixel_values, want["pixel_values"])
    assert torch.equal(first.grid_thw, want["image_grid_thw"])
    assert text is None and plain.grid_thw.tolist() == want["image_grid_thw"][1:].tolist()
    # each placeholder: vision start, one image token per 2 x 2 merged patches, vision end
    tokens = batch.token_slice("input_ids", 0).tolist()
    counts = (want["image_grid_thw"].prod(-1) // 4).tolist()
    start, image, end = (
        ids["vision_start_token_id"],
        ids["image_token_id"],
        ids["vision_end_token_id"],
    )
    assert tokens.count(image) == sum(counts) and tokens.count(start) == tokens.count(end) == 2
    at = tokens.index(start)
    assert tokens[at + 1 : at + 2 + counts[0]] == [image] * counts[0] + [end]
    assert "images" not in batch.objects["extra"][0]  # read, not carried as a column
    third = batch.token_slice("input_ids", 2).tolist()  # the content parts' row
    assert third.count(image) == counts[1] and tok.decode(third).endswith(
        " plain path, content parts\n<|assistant|>"
    )
    strict = PromptLoader(
        DataConfig(train_files=[str(parquet)], batch_size=1, on_malformed=OnBadRow.ERROR),
        tok,
        0,
        1,
        seed=0,
        images=inputs,
    )
    source = strict.source.read(list(range(6)))
    for index, message in (
        (2, r"row 2: image 0 cannot be read"),
        (3, r"row 3: the prompt has 1 '<image>' placeholders and the row 2 images"),
        (4, rf"row 4: image 0 has 100 x 100 pixels, more than data.max_image_pixels={MAX_PIXELS}"),
        (5, r"row 5: image 0 cannot be read \(FileNotFoundError"),
    ):
        with pytest.raises(MalformedRow, match=rf"rows\.parquet {message}"):
            strict._encode(index, source[index], warn=False)


def test_a_model_without_its_image_processor_is_named(model, tmp_path):
    path, tok, _ = model
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(ValueError, match=r"model\.path=.*preprocessor_config\.json"):
        ImageInputs.of(bare, tok, MAX_PIXELS)
