"""SGLang engine adapter on a GPU: greedy output equals the transformers engine's, weights
update from tensors, memory is released and resumed. Skipped without CUDA or sglang."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from distflow_mc.rollout.engine import SamplingParams
from distflow_mc.rollout.hf_engine import HFEngine
from tests.tiny_hf import load_tensors, make_tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("sglang") is None, reason="needs sglang"),
]
PROMPTS = [[5, 17, 33, 2], [9], [40, 41, 42, 43, 44, 45, 46]]


def test_sglang_matches_transformers_and_syncs(tmp_path):
    from distflow_mc.rollout.sglang_engine import SGLangEngine

    model = make_tiny_model("qwen2", tmp_path / "qwen2")
    tensors = list(load_tensors(model).items())
    reference = HFEngine(model, pad_token_id=0, device=torch.device("cuda"))
    reference.update_weights([tensors])
    engine = SGLangEngine(model, tp=1, base_gpu_id=0, seed=0, mem_fraction=0.2, colocated=True)
    try:
        greedy = SamplingParams(temperature=0, max_new_tokens=8)
        want = [r.tolist() for r in reference.generate(PROMPTS, greedy).response_ids]
        assert [r.tolist() for r in engine.generate(PROMPTS, greedy).response_ids] == want
        engine.sleep()
        engine.wake()
        engine.update_weights([[(n, t * 0.5) for n, t in tensors]])
        changed = [r.tolist() for r in engine.generate(PROMPTS, greedy).response_ids]
        reference.update_weights([[(n, t * 0.5) for n, t in tensors]])
        assert changed == [r.tolist() for r in reference.generate(PROMPTS, greedy).response_ids]
        sampled = engine.generate(PROMPTS, SamplingParams(n=2, temperature=0.8, max_new_tokens=8))
        assert len(sampled.response_ids) == 6
        assert all(
            len(lp) == len(r) for lp, r in zip(sampled.logprobs, sampled.response_ids, strict=True)
        )
    finally:
        engine.shutdown()


def test_agent_loop_on_sglang_equals_transformers(tmp_path):
    """Multi-turn tool-calling trajectories through the same engine protocol (token ids in
    and out): greedy, SGLang's trajectories are the transformers engine's, token for token."""
    from distflow_mc.agent.loop import AgentLoop
    from distflow_mc.config.schema import AgentConfig
    from distflow_mc.data.tiny import AGENT_TOKENS, Lookup, make_model, make_tokenizer
    from distflow_mc.rollout.sglang_engine import SGLangEngine

    model = tmp_path / "agent"
    tok = make_tokenizer(model, AGENT_TOKENS)
    make_model(model, tok, seed=3)
    tensors = list(load_tensors(model).items())
    config = AgentConfig(
        parser="tests.unit.test_agent.always_lookup", max_turns=3, max_total_tokens=60
    )
    loop = AgentLoop(config, tok, {"lookup": Lookup()})
    prompts = [tok.encode("<|user|>key: 1\n<|assistant|>"), tok.encode("key: 22")]
    params = SamplingParams(temperature=0, max_new_tokens=5, stop_token_ids=tuple(range(10, 128)))
    reference = HFEngine(model, pad_token_id=tok.pad_token_id, device=torch.device("cuda"))
    reference.update_weights([tensors])
    want = loop.run(reference, prompts, [loop.tools] * 2, params)
    engine = SGLangEngine(model, tp=1, base_gpu_id=0, seed=0, mem_fraction=0.2, colocated=False)
    try:
        engine.update_weights([tensors])
        got = loop.run(engine, prompts, [loop.tools] * 2, params)
    finally:
        engine.shutdown()
    assert [t.ids for t in got] == [t.ids for t in want]
    assert [t.mask for t in got] == [t.mask for t in want]
    assert max(t.turns for t in got) >= 2
