"""The transformers rollout engine against transformers itself: batched left-padded
generation equals one-prompt-at-a-time `generate`, log-probs equal a forward pass,
seeded sampling is reproducible, stop tokens end responses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distflow_mc.rollout.engine import SamplingParams
from distflow_mc.rollout.hf_engine import HFEngine
from tests.tiny_hf import SwapAfter, load_hf, load_tensors, make_tiny_model

PROMPTS = [[5, 17, 33, 2], [9], [40, 41, 42, 43, 44, 45, 46]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model("qwen2", tmp_path_factory.mktemp("m") / "qwen2")


@pytest.fixture(scope="module")
def engine(model_dir) -> HFEngine:
    engine = HFEngine(model_dir, pad_token_id=0, device=torch.device("cpu"))
    engine.update_weights([list(load_tensors(model_dir).items())])
    return engine


def greedy_one_at_a_time(model_dir: Path, max_new_tokens: int) -> list[list[int]]:
    """transformers' own greedy `generate`, one prompt at a time (no padding involved)."""
    hf = load_hf(model_dir)
    out = []
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        ref = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
        out.append(ref[0, len(prompt) :].tolist())
    return out


def test_greedy_equals_transformers_generate_one_prompt_at_a_time(engine, model_dir):
    got = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=8))
    assert [r.tolist() for r in got.response_ids] == greedy_one_at_a_time(model_dir, 8)
    assert got.finish_reasons == ["length"] * len(PROMPTS)


def test_logprobs_equal_a_forward_pass(engine, model_dir):
    hf = load_hf(model_dir)
    params = SamplingParams(n=3, temperature=0.7, top_k=20, top_p=0.9, max_new_tokens=6, seed=4)
    got = engine.generate(PROMPTS, params)
    assert got.prompt_index == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for i, (resp, logp) in enumerate(zip(got.response_ids, got.logprobs, strict=True)):
        prompt = PROMPTS[got.prompt_index[i]]
        full = torch.tensor([prompt + resp.tolist()])
        with torch.no_grad():
            logits = hf(full).logits[0, len(prompt) - 1 : -1]
        ref = torch.log_softmax(logits / 0.7, -1).gather(-1, resp[:, None]).squeeze(-1)
        torch.testing.assert_close(logp, ref, atol=2e-5, rtol=1e-5)


def test_seeded_sampling_is_reproducible(engine):
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=10, seed=11)
    a = engine.generate(PROMPTS, params)
    b = engine.generate(PROMPTS, params)
    c = engine.generate(PROMPTS, SamplingParams(n=4, temperature=1.0, max_new_tokens=10, seed=12))
    assert [r.tolist() for r in a.response_ids] == [r.tolist() for r in b.response_ids]
    assert [r.tolist() for r in a.response_ids] != [r.tolist() for r in c.response_ids]
    assert len({tuple(r.tolist()) for r in a.response_ids[:4]}) > 1  # n samples differ


def test_each_prompt_is_prefilled_once_with_the_samples_of_generate(engine, model_dir):
    """The engine encodes each prompt once and repeats its keys and values for the n
    samples; transformers' own `generate` over the n copies of each (left-padded) prompt,
    with the same seed, draws the same samples."""
    params = SamplingParams(n=4, temperature=1.0, top_p=0.9, max_new_tokens=6, seed=21)
    shapes = []

    def record(module, args, kwargs):
        shapes.append(tuple(kwargs["input_ids"].shape))

    hook = engine.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        got = engine.generate(PROMPTS, params)
    finally:
        hook.remove()
    longest = max(map(len, PROMPTS))
    # the prompts once (but their last token), then one token per row per step
    assert shapes == [(3, longest - 1)] + [(3 * params.n, 1)] * params.max_new_tokens
    rows = [[0] * (longest - len(p)) + p for p in PROMPTS for _ in range(params.n)]
    ids = torch.tensor(rows)
    mask = (
        torch.arange(longest)
        >= longest - torch.tensor([len(r) - r.count(0) for r in rows])[:, None]
    ).long()
    torch.manual_seed(params.seed)
    ref = load_hf(model_dir).generate(
        ids,
        attention_mask=mask,
        max_new_tokens=params.max_new_tokens,
        do_sample=True,
        temperature=1.0,
        top_p=0.9,
        top_k=0,
        pad_token_id=0,
    )[:, longest:]
    assert [r.tolist() for r in got.response_ids] == ref.tolist()


def test_a_generation_crossing_a_weight_update_keeps_each_tokens_behaviour(model_dir):
    """Weights change after the 3rd token: every unfinished sample goes on with the new
    weights from its tokens so far; segments count the tokens under each version, and each
    token's log-prob is that of a forward of the weights that drew it."""
    old = load_tensors(model_dir)
    g = torch.Generator().manual_seed(0)
    new = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in old.items()}
    engine = HFEngine(model_dir, pad_token_id=0, device=torch.device("cpu"))
    engine.update_weights([list(old.items())])
    swap = SwapAfter(engine, 3, new)
    params = SamplingParams(n=2, temperature=0.8, max_new_tokens=7, seed=3)
    got = engine.generate(PROMPTS, params, interrupt=swap)
    assert swap.applied == 1
    assert [len(r) for r in got.response_ids] == [7] * 6  # no stop token: every row goes on
    assert got.segments == [[3, 4]] * 6
    models = {0: load_hf(model_dir), 1: load_hf(model_dir)}
    models[1].load_state_dict(new, strict=False)
    for i, (resp, logp) in enumerate(zip(got.response_ids, got.logprobs, strict=True)):
        prompt = PROMPTS[got.prompt_index[i]]
        full = torch.tensor([prompt + resp.tolist()])
        for version, span in ((0, slice(0, 3)), (1, slice(3, 7))):
            with torch.no_grad():
                logits = models[version](full).logits[0, len(prompt) - 1 : -1]
            ref = torch.log_softmax(logits / 0.8, -1).gather(-1, resp[:, None]).squeeze(-1)
            torch.testing.assert_close(logp[span], ref[span], atol=2e-5, rtol=1e-5)
    # without an update pending, the same call is the plain one
    plain = engine.generate(PROMPTS, params, interrupt=SwapAfter(engine, 99, new))
    assert plain.segments == [] and all(len(r) == 7 for r in plain.response_ids)


def test_stop_tokens_end_responses(engine):
    free = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=8))
    stop = int(free.response_ids[0][2])  # the third greedy token of prompt 0
    got = engine.generate(
        PROMPTS, SamplingParams(temperature=0, max_new_tokens=8, stop_token_ids=(stop,))
    )
    first = free.response_ids[0].tolist().index(stop)
    assert got.response_ids[0].tolist() == free.response_ids[0].tolist()[: first + 1]
    assert got.finish_reasons[0] == "stop"
    assert len(got.logprobs[0]) == first + 1


def test_update_weights_rejects_unknown_and_incomplete(model_dir):
    engine = HFEngine(model_dir, pad_token_id=0, device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"no parameter 'model\.bogus'"):
        engine.update_weights([[("model.bogus", torch.zeros(1))]])
    fresh = HFEngine(model_dir, pad_token_id=0, device=torch.device("cpu"))
    tensors = load_tensors(model_dir)
    tensors.pop("model.norm.weight")
    with pytest.raises(ValueError, match="left parameters unset"):
        fresh.update_weights([list(tensors.items())])


@pytest.mark.parametrize("kind", ["qwen3_moe", "qwen3", "llama3"])
def test_weight_sync_in_checkpoint_names_for_every_family(tmp_path, kind):
    """The engine takes the checkpoint's tensors (per-expert names for MoE, which
    transformers keeps fused in memory) and then generates what transformers' own
    from_pretrained model generates."""
    model_dir = make_tiny_model(kind, tmp_path / kind)
    engine = HFEngine(model_dir, pad_token_id=0, device=torch.device("cpu"))
    engine.update_weights([list(load_tensors(model_dir).items())])
    got = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=6))
    assert [r.tolist() for r in got.response_ids] == greedy_one_at_a_time(model_dir, 6), kind


def test_sampling_is_from_the_configured_distribution(engine):
    """Top-k and top-p apply only when set: transformers' own default (top_k=50) must not
    narrow the sampling behind the log-probs' back. A hot temperature makes the first
    token nearly uniform over the vocabulary, so hundreds of draws show the support."""
    vocab = engine.model.config.vocab_size
    assert vocab > 60

    def support(**kw) -> int:
        params = SamplingParams(n=400, temperature=20.0, max_new_tokens=1, seed=3, **kw)
        return len({int(r[0]) for r in engine.generate(PROMPTS[:1], params).response_ids})

    assert support() > 55  # no hidden top-k=50
    assert support(top_k=20) <= 20


def test_update_weights_adopts_whole_tensors_and_copies_the_rest(model_dir):
    """A tensor of the parameter's shape, dtype and device becomes the parameter (the
    engine reads the actor's weights without a copy); another dtype is copied in, never
    into a tensor the engine was given before."""
    tensors = load_tensors(model_dir)
    given = {n: t.clone() for n, t in tensors.items()}
    engine = HFEngine(model_dir, pad_token_id=0, device=torch.device("cpu"))
    engine.update_weights([list(tensors.items())])
    params = dict(engine.model.named_parameters())
    shared = [n for n in params if n in tensors]
    assert shared and all(params[n].data_ptr() == tensors[n].data_ptr() for n in shared)
    doubled = {n: t.double() * 2 for n, t in tensors.items()}
    engine.update_weights([list(doubled.items())])
    for n in shared:
        assert params[n].dtype == torch.float32
        assert params[n].data_ptr() != doubled[n].data_ptr()
        torch.testing.assert_close(params[n], (given[n] * 2).float())
        assert torch.equal(tensors[n], given[n])


def test_kept_rows_go_on_from_their_cache_beside_new_prompts(model_dir):
    """rollout.stream_chunk's pieces: greedy pieces of 3 tokens, each call with the rows the
    call before cut (`keep`) beside a new prompt's two rows, equal transformers' own
    generation of the whole response; the kept rows are not encoded again (only the new
    prompt is, once for both of its rows), and new weights drop the kept cache."""
    engine = HFEngine(model_dir, pad_token_id=0, device=torch.device("cpu"))
    engine.update_weights([list(load_tensors(model_dir).items())])
    whole = greedy_one_at_a_time(model_dir, 9)
    piece = SamplingParams(temperature=0, max_new_tokens=3)
    shapes = []
    hook = engine.model.register_forward_pre_hook(
        lambda m, a, kw: shapes.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    rows = [list(PROMPTS[0])]
    for new in PROMPTS[1:]:  # each call: the rows going on, then a new prompt twice
        shapes.clear()
        # the rows not kept, each distinct one once, but their last token
        fresh = {tuple(r) for r in [*rows, new, new] if tuple(r) not in engine.kept}
        gen = engine.generate([*rows, new, new], piece, keep=True)
        heads = [r for r in fresh if len(r) > 1]
        assert shapes[0] == (len(heads), max(map(len, heads)) - 1)
        rows = [r + g.tolist() for r, g in zip([*rows, new, new], gen.response_ids, strict=True)]
        assert len(engine.kept) == len({tuple(r) for r in rows})  # all ran to the limit
    hook.remove()
    gen = engine.generate(rows, piece, keep=True)
    done = [r + g.tolist() for r, g in zip(rows, gen.response_ids, strict=True)]
    # PROMPTS[0] and PROMPTS[1] (twice): 3 pieces; PROMPTS[2] (twice): 2
    expect = [
        PROMPTS[0] + whole[0],
        *[PROMPTS[1] + whole[1]] * 2,
        *[PROMPTS[2] + whole[2][:6]] * 2,
    ]
    assert done == expect
    engine.update_weights([list(load_tensors(model_dir).items())])
    assert engine.kept == {}


def test_images_generate_as_transformers_does(tmp_path):
    """A tiny Qwen2.5-VL: weights synced in checkpoint names (the vision tower's too), then
    greedy generation of prompts with two images, none and one, n=2 each, left-padded in
    one batch, equals transformers' own generation of each prompt alone with its images;
    every token's log-prob equals a forward of the prompt, its images and the response."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from distflow_mc.rollout.engine import Images
    from tests.tiny_hf import IMAGE_TOKEN

    model_dir = make_tiny_model("qwen2_5_vl", tmp_path / "vl")
    engine = HFEngine(model_dir, pad_token_id=0, device=torch.device("cpu"))
    engine.update_weights([list(load_tensors(model_dir).items())])
    g = torch.Generator().manual_seed(2)

    def image(t: int, h: int, w: int) -> tuple[list[int], torch.Tensor]:
        return [IMAGE_TOKEN] * (t * h * w // 4), torch.randn(t * h * w, 1176, generator=g)

    (a, pa), (b, pb), (c, pc) = image(1, 4, 4), image(1, 2, 6), image(1, 6, 4)
    prompts = [[5, 6, 7, *a, 8, 9, *b, 10, 11], [12, 13, 14, 15, 16], [17, *c, 18, 19, 20]]
    images = [
        Images(torch.cat([pa, pb]), torch.tensor([[1, 4, 4], [1, 2, 6]])),
        None,
        Images(pc, torch.tensor([[1, 6, 4]])),
    ]
    params = SamplingParams(n=2, temperature=0, max_new_tokens=6)
    got = engine.generate(prompts, params, images=images)
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    for i, (prompt, im) in enumerate(zip(prompts, images, strict=True)):
        ids = torch.tensor([prompt])
        extra = {"pixel_values": im.pixel_values, "image_grid_thw": im.grid_thw} if im else {}
        kinds = (ids == IMAGE_TOKEN).int()
        ref = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            mm_token_type_ids=kinds,
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=0,
            **extra,
        )[0, len(prompt) :]
        for r in (2 * i, 2 * i + 1):
            assert got.response_ids[r].tolist() == ref.tolist(), (i, r)
        full = torch.tensor([prompt + ref.tolist()])
        with torch.no_grad():
            logits = hf(full, mm_token_type_ids=(full == IMAGE_TOKEN).int(), **extra).logits[
                0, len(prompt) - 1 : -1
            ]
        want = torch.log_softmax(logits, -1).gather(-1, ref[:, None])[:, 0]
        torch.testing.assert_close(got.logprobs[2 * i], want, atol=2e-5, rtol=0)
