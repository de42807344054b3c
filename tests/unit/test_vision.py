"""Qwen2.5-VL's config and positions (models/hf_config.py, models/vision.py); the model
against transformers at TP=1, TP=2 and PP=2: tests/dist/test_models.py."""

from __future__ import annotations

import pytest
import torch

from distflow_mc.models.hf_config import read_hf_config
from distflow_mc.models.vision import mrope_positions, row_positions, sample_positions
from tests.tiny_hf import IMAGE_TOKEN, make_tiny_model


@pytest.fixture(scope="module")
def vl(tmp_path_factory):
    return make_tiny_model("qwen2_5_vl", tmp_path_factory.mktemp("vl") / "qwen2_5_vl")


def test_the_text_model_comes_from_text_config_and_the_images_from_the_rest(vl):
    arch = read_hf_config(vl)
    assert arch.architecture == "Qwen2_5_VLForConditionalGeneration"
    assert (arch.hidden_size, arch.num_layers, arch.num_kv_heads) == (64, 4, 2)
    assert arch.qkv_bias and not arch.tie_word_embeddings
    assert arch.vision.image_token_id == IMAGE_TOKEN and arch.vision.mrope_section == (2, 3, 3)
    assert arch.vision.config["depth"] == 2


def test_positions_of_text_and_images():
    """Text counts on in all three; a 1 x 4 x 6 patch grid merged 2 x 2 is 2 rows of 3
    columns from where the text stopped; the text after it goes on past its larger side."""
    ids = torch.tensor([5, 6, *[IMAGE_TOKEN] * 6, 7])
    got = mrope_positions(ids, torch.tensor([[1, 4, 6]]), IMAGE_TOKEN, 2)
    t, h, w = got.T.tolist()
    assert t == [0, 1, 2, 2, 2, 2, 2, 2, 5]
    assert h == [0, 1, 2, 2, 2, 3, 3, 3, 5]
    assert w == [0, 1, 2, 3, 4, 2, 3, 4, 5]
    with pytest.raises(ValueError, match=r"grid \[1, 4, 4\] has 6 image tokens"):
        mrope_positions(ids, torch.tensor([[1, 4, 4]]), IMAGE_TOKEN, 2)


def test_a_generated_image_token_is_text():
    """A response holding the image token (a random model draws it): it counts on as text
    from one past the prompt's largest position, as generation counts, and is not one of
    the prompt's images."""
    prompt = [5, *[IMAGE_TOKEN] * 6, 7]
    ids = torch.tensor([*prompt, 8, IMAGE_TOKEN, 9])
    got, mask = sample_positions(ids, len(prompt), torch.tensor([[1, 4, 6]]), IMAGE_TOKEN, 2)
    head = mrope_positions(ids[: len(prompt)], torch.tensor([[1, 4, 6]]), IMAGE_TOKEN, 2)
    assert torch.equal(got[: len(prompt)], head)
    start = int(head.max()) + 1
    assert got[len(prompt) :].tolist() == [[start + j] * 3 for j in range(3)]
    assert mask.tolist() == [False, *[True] * 6, False, False, False, False]
    # the engine, which sees a trajectory without its prompt's end, counts it alike
    row, row_mask = row_positions(ids, torch.tensor([[1, 4, 6]]), IMAGE_TOKEN, 2)
    assert torch.equal(row, got) and torch.equal(row_mask, mask)


def test_a_groups_images_are_encoded_once_per_microbatch():
    """Three samples of a group hold their prompt's images object, a fourth its own, one
    none: the micro-batch holds each object's patches once, and which one each sample's
    image tokens take."""
    from distflow_mc.models.vision import microbatch_images
    from distflow_mc.rollout.engine import Images

    shared = Images(torch.randn(16 + 8, 5), torch.tensor([[1, 4, 4], [1, 2, 4]]))
    own = Images(torch.randn(4, 5), torch.tensor([[1, 2, 2]]))
    got = microbatch_images(
        [shared, shared, None, own, shared], merge=2, device=torch.device("cpu")
    )
    assert torch.equal(got["pixel_values"], torch.cat([shared.pixel_values, own.pixel_values]))
    assert got["image_grid_thw"].tolist() == [[1, 4, 4], [1, 2, 4], [1, 2, 2]]
    assert got["image_order"].tolist() == [0, 0, 1, 0]
    assert got["image_sizes"].tolist() == [6, 1]  # (16 + 8) / 4 and 4 / 4 image tokens
    assert microbatch_images([None, None], merge=2, device=torch.device("cpu")) == {}
