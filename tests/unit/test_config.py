"""Typed config through Hydra's own composition: every shipped config composes; unknown
keys, wrong types and out-of-range values are errors naming the key."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from megatron.core.parallel_state import RankGenerator

from distflow_mc.config import Config, Engine, canonical_config, load_config, run_id
from distflow_mc.config.schema import Placement
from distflow_mc.dag import plan_workflow
from distflow_mc.parallel import (
    Layout,
    Move,
    build_layouts,
    describe_placement,
    describe_plan,
    movement,
)
from distflow_mc.stages.fields import carried
from tests.conftest import CONF_DIR, compose_config


def shipped(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("experiment", shipped("experiment"))
def test_every_experiment_composes_and_plans(experiment):
    config = load_config(compose_config([f"experiment={experiment}"]))
    assert config.name == experiment
    plan_workflow(config.algo.workflow)


@pytest.mark.parametrize(
    "override",
    [f"{g}={name}" for g in ("algo", "model", "parallel", "rollout") for name in shipped(g)],
)
def test_every_group_option_composes(override):
    config = load_config(compose_config([override]))
    assert isinstance(config, Config)
    plan_workflow(config.algo.workflow)


def test_typed_objects_below_main():
    config = load_config(compose_config(["rollout=sglang", "parallel.tp=2"]))
    assert config.rollout.engine is Engine.SGLANG
    assert config.parallel.tp == 2
    assert type(config.algo.workflow[0]).__name__ == "NodeSpec"


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("trainer.totl_steps=3", "totl_steps"),
        ("rollout.tempreature=0.5", "tempreature"),
    ],
)
def test_unknown_override_key_names_it(override, key):
    with pytest.raises(ConfigCompositionException) as info:
        compose_config([override])
    assert key in str(info.value.__cause__ or info.value)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("trainer.total_steps=many", "trainer.total_steps"),
        ("rollout.engine=VLLM", "rollout.engine"),
        ("parallel.sequence_parallel=maybe", "parallel.sequence_parallel"),
    ],
)
def test_wrong_type_names_key(override, key):
    with pytest.raises(ConfigCompositionException) as info:
        compose_config([override])
    assert key in str(info.value) + str(info.value.__cause__)


def test_misspelled_key_in_a_yaml_file_names_it(tmp_path: Path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    (conf / "trainer" / "typo.yaml").write_text("defaults: [schema, _self_]\ntotal_step: 5\n")
    with pytest.raises(ConfigCompositionException) as info:
        compose_config(["trainer=typo"], config_dir=conf)
    text = str(info.value) + str(info.value.__cause__)
    assert "total_step" in text


def test_misspelled_workflow_field_names_it(tmp_path: Path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    text = (conf / "algo" / "grpo.yaml").read_text().replace("deps: [rollout]", "dep: [rollout]")
    (conf / "algo" / "typo.yaml").write_text(text)
    with pytest.raises(ConfigCompositionException) as info:
        compose_config(["algo=typo"], config_dir=conf)
    assert "Key 'dep' not in 'NodeSpec'" in str(info.value) + str(info.value.__cause__)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("rollout.top_p=1.5", "rollout.top_p"),
        ("parallel.tp=0", "parallel.tp"),
        ("parallel.vpp=2", "parallel.vpp"),
        ("parallel.sequence_parallel=true", "parallel.sequence_parallel"),
        ("rollout.n=0", "rollout.n"),
        ("parallel.ep=0", "parallel.ep"),
        ("model.router_aux_loss_coef=-1", "model.router_aux_loss_coef"),
        ("parallel.first_stage_layers=2", "parallel.first_stage_layers"),
        ("algo.ppo_epochs=0", "algo.ppo_epochs"),
        ("algo.mini_batches=0", "algo.mini_batches"),
        ("algo.gamma=1.5", "algo.gamma"),
        ("algo.lam=-0.1", "algo.lam"),
        ("algo.clip_low=1.2", "algo.clip_low"),
        ("algo.dual_clip=0.5", "algo.dual_clip"),
        ("algo.dynamic_sampling_max_rounds=0", "algo.dynamic_sampling_max_rounds"),
        ("algo.overlong_buffer=999", "algo.overlong_buffer"),
        ("trainer.micro_batch_tokens=0", "trainer.micro_batch_tokens"),
        ("trainer.val_n=0", "trainer.val_n"),
        ("trainer.keep_last=0", "trainer.keep_last"),
        ("trainer.actor_optim.decay_style=cosinus", "trainer.actor_optim.decay_style"),
        ("trainer.critic_optim.lr=0", "trainer.critic_optim.lr"),
        ("trainer.actor_optim.adam_beta2=1.0", "trainer.actor_optim.adam_beta2"),
        ("data.train_files=[]", "data.train_files"),
        ("reward.error_score=nan", "reward.error_score"),
        ("rollout.agent.max_turns=0", "rollout.agent.max_turns"),
        ("rollout.agent.max_total_tokens=10", "rollout.agent.max_total_tokens"),
        ("rollout.agent.tool_timeout_s=0", "rollout.agent.tool_timeout_s"),
        ("rollout.agent.max_tool_output_chars=0", "rollout.agent.max_tool_output_chars"),
        ("+rollout.agent.tool_timeouts.python=0", "rollout.agent.tool_timeouts.python"),
        ("reward.max_failing_steps=0", "reward.max_failing_steps"),
        ("data.max_empty_steps=0", "data.max_empty_steps"),
        ("data.max_image_pixels=0", "data.max_image_pixels"),
        ("algo.tis_cap=0", "algo.tis_cap"),
        ("algo.mis_high=-1", "algo.mis_high"),
        ("algo.mis_low=0.5", "algo.mis_low"),  # no upper bound on the weights
    ],
)
def test_out_of_range_names_setting(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_config(compose_config([override]))


def test_missing_required_value_names_it():
    with pytest.raises(ValueError, match=r"missing required setting 'model\.path'"):
        load_config(compose_config(["model.path=???"]))


@pytest.mark.parametrize(
    ("overrides", "world", "message"),
    [
        (["parallel.tp=2"], 3, "parallel.tp x parallel.pp x parallel.cp"),
        (["rollout=sglang", "rollout.tp=4"], 2, "rollout.tp = 4"),
        (["data.batch_size=3"], 2, "data.batch_size = 3"),
    ],
)
def test_layout_errors_name_settings(overrides, world, message):
    config = load_config(compose_config(overrides))
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        build_layouts(config, world)


SEPARATE = ["rollout.placement=SEPARATE", "trainer.dry_run=true"]


@pytest.mark.parametrize(
    ("overrides", "world", "per_node", "message"),
    [
        (["rollout.ranks=4"], 4, 4, "rollout.ranks=4 leaves no rank to train in a world of 4"),
        (
            ["rollout.ranks=1", "parallel.tp=2"],
            4,
            4,
            "the 3 train ranks (world 4 - rollout.ranks 1) is not divisible by parallel.tp",
        ),
        (
            ["rollout.ranks=1", "rollout.tp=2"],
            4,
            4,
            "the 1 rollout ranks (rollout.ranks) is not divisible by rollout.tp = 2",
        ),
        # ranks 1-3 roll out, 2 a node: the TP group of ranks 1-2 would span two nodes
        (["rollout.ranks=2", "rollout=sglang", "rollout.tp=2"], 3, 2, "span nodes"),
        (["rollout.ranks=3", "data.batch_size=4"], 4, 4, "over the 3 rollout data-parallel"),
    ],
)
def test_separate_layout_errors_name_settings(overrides, world, per_node, message):
    config = load_config(compose_config([*SEPARATE, *overrides]))
    with pytest.raises(ValueError, match=re.escape(message)):
        build_layouts(config, world, per_node)


def test_separate_layouts_split_the_world():
    """The first ranks train (rank 0 among them), the last rollout.ranks roll out; the
    batch moves between them by all-to-all, and the plan says who is where."""
    config = load_config(compose_config([*SEPARATE, "rollout.ranks=2", "parallel.tp=2"]))
    layouts = build_layouts(config, 6)
    assert list(layouts.train.ranks) == [0, 1, 2, 3] and layouts.train.dp == 2
    assert list(layouts.rollout.ranks) == [4, 5] and layouts.rollout.emitters() == [4, 5]
    assert movement(layouts.rollout, layouts.train) is Move.EXCHANGE
    text = "\n".join(describe_plan(plan_workflow(config.algo.workflow), layouts))
    assert "layout rollout: DP=2 x TP=1 over 2 rank(s) (ranks 4-5)" in text
    assert "layout train: DP=2 x TP=2 x PP=1 over 4 rank(s) (ranks 0-3)" in text


STREAM = "rollout.stream=true"
AGENT_SEPARATE = ["experiment=cpu_tiny_agent", "placement=separate", "rollout.ranks=1"]
SINGLE_SEPARATE = ["placement=separate", "rollout.ranks=1"]


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["rollout.placement=SEPARATE", "trainer.dry_run=true"], "rollout.ranks"),
        (["rollout.ranks=2"], "rollout.ranks"),
        (["trainer.max_staleness=-1"], "trainer.max_staleness"),
        (["trainer.weight_sync_every=2"], "trainer.weight_sync_every"),  # colocated
        (["rollout.partial=true"], "rollout.partial"),  # colocated
        (
            ["placement=separate", "rollout.ranks=1", "rollout=sglang", "rollout.partial=true"],
            "partial",
        ),
        (["placement=separate", "rollout.ranks=1", "trainer.weight_sync_every=0"], "weight_sync"),
        (["experiment=cpu_tiny_agent", "rollout.stream=true"], "rollout.stream"),  # colocated
        (["rollout.stream_chunk=8"], "rollout.stream_chunk"),  # without the stream
        (
            [*SINGLE_SEPARATE, "trainer.max_staleness=2", STREAM, "rollout.stream_chunk=-1"],
            "rollout.stream_chunk",
        ),
        ([*AGENT_SEPARATE, STREAM], "max_staleness >= 2"),  # the preset's k=1
        (
            [*AGENT_SEPARATE, STREAM, "trainer.max_staleness=2", "algo.dynamic_sampling=true"],
            "dynamic_sampling",
        ),
        ([*AGENT_SEPARATE, "trainer.on_stale=DROP"], "trainer.on_stale"),
    ],
)
def test_placement_settings_are_checked(overrides, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_config(compose_config(overrides))


def test_stream_is_accepted_where_it_runs():
    single = [*SINGLE_SEPARATE, "trainer.max_staleness=2", STREAM, "rollout.stream_chunk=8"]
    assert load_config(compose_config(single)).rollout.stream_chunk == 8
    assert load_config(compose_config([*single, "rollout.partial=true"])).rollout.partial
    overrides = [*AGENT_SEPARATE, STREAM, "trainer.max_staleness=2", "trainer.on_stale=DROP"]
    config = load_config(compose_config(overrides))
    assert config.rollout.stream and config.trainer.on_stale.name == "DROP"
    text = "\n".join(describe_placement(config, build_layouts(config, 2)))
    assert "the groups started for batch t are generated by the actor after max(0, t - 1)" in text
    assert "at most 2 behind" in text and "which drops it if it still runs then" in text


def test_layouts_derive_data_parallel():
    config = load_config(compose_config(["parallel.tp=2", "parallel.pp=2", "rollout.tp=1"]))
    layouts = build_layouts(config, 8)
    assert (layouts.train.dp, layouts.rollout.dp) == (2, 8)
    assert layouts.train.emitters() == [4, 6]


@pytest.mark.parametrize(("tp", "cp", "dp", "pp"), [(2, 1, 2, 2), (1, 2, 2, 2), (4, 1, 1, 2)])
def test_layout_coordinates_match_megatron(tp, cp, dp, pp):
    """Our rank arithmetic against megatron-core's own rank generator (tp-cp-ep-dp-pp)."""
    layout = Layout("train", dp=dp, tp=tp, pp=pp, cp=cp)
    gen = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=cp, order="tp-cp-ep-dp-pp")
    for dim in ("tp", "dp", "pp", "cp"):
        for group in gen.get_ranks(dim):
            coords = [layout.coords(r) for r in group]
            assert [c[dim] for c in coords] == list(range(len(group)))
            others = {tuple(v for k, v in sorted(c.items()) if k != dim) for c in coords}
            assert len(others) == 1


def test_canonical_config_excludes_workflow_order():
    a = load_config(compose_config())
    b = load_config(compose_config())
    b.algo.workflow.reverse()
    assert canonical_config(a) == canonical_config(b)
    assert "workflow" not in canonical_config(a)["algo"]


def test_run_id_precedence(monkeypatch):
    for key in ("DISTFLOW_RUN_ID", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID"):
        monkeypatch.delenv(key, raising=False)
    cases = [
        ({"SLURM_JOB_ID": "77"}, "slurm-77"),
        ({"SLURM_JOB_ID": "77", "TORCHELASTIC_RUN_ID": "job-a"}, "job-a"),
        ({"TORCHELASTIC_RUN_ID": "job-a", "DISTFLOW_RUN_ID": "mine"}, "mine"),
    ]
    for env, expected in cases:
        run_id.cache_clear()
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            assert run_id() == expected
    run_id.cache_clear()
    assert run_id() == run_id()
    run_id.cache_clear()


def test_model_sizes_must_divide_the_layout():
    from distflow_mc.models.gpt import check_divisibility
    from distflow_mc.models.hf_config import HFArch
    from distflow_mc.parallel.megatron_state import ModelParallel

    arch = HFArch("Qwen2ForCausalLM", 128, 64, 96, 6, 6, 2, 16, 1e-6, 1e4, 256, True, True)
    mp = ModelParallel(4, 4, 1, 1, None, False, 0, 0, 0, None, None, None)
    with pytest.raises(ValueError, match=r"num_attention_heads=6 .* parallel\.tp=4"):
        check_divisibility(arch, mp)
    mp = ModelParallel(2, 2, 1, 1, None, False, 0, 0, 0, None, None, None, ep=2)
    with pytest.raises(ValueError, match=r"parallel\.ep=2 needs a MoE model"):
        check_divisibility(arch, mp)
    mp = ModelParallel(2, 4, 1, 1, 2, False, 0, 0, 0, None, None, None)
    with pytest.raises(
        ValueError, match=r"num_hidden_layers=6 cannot be split over parallel\.pp=4"
    ):
        check_divisibility(arch, mp)


@pytest.mark.parametrize(
    ("layers", "pp", "vpp", "first", "last", "split"),
    [
        (8, 2, None, None, None, (None, None)),  # even: megatron's default
        (3, 2, None, None, None, (2, 1)),  # the last stage also runs the output layer
        (3, 2, None, 1, None, (1, 2)),  # an override fixes one side
        (5, 3, None, None, 3, (1, 3)),  # parallel.last_stage_layers set: stages 1, 1, 3
        (6, 4, None, None, None, (1, 1)),  # middle stages 2 each
        (10, 2, 2, None, None, (6, 4)),  # multiples of vpp
        (7, 3, None, None, None, (3, 1)),  # stages 3, 3, 1
    ],
)
def test_uneven_pipeline_split(layers, pp, vpp, first, last, split):
    from distflow_mc.models.gpt import pipeline_split

    assert pipeline_split(layers, pp, vpp, first, last) == split


def test_unknown_architecture_is_named(tmp_path: Path):
    import json

    from distflow_mc.models.hf_config import read_hf_config

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match=r"architecture \['GPT2LMHeadModel'\] is not supported"):
        read_hf_config(tmp_path)


def test_every_problem_is_listed_at_once():
    with pytest.raises(ValueError) as info:
        load_config(compose_config(["algo.ppo_epochs=0", "trainer.val_n=0", "rollout.n=0"]))
    assert all(k in str(info.value) for k in ("algo.ppo_epochs", "trainer.val_n", "rollout.n"))


def test_gspo_gets_its_own_clip_range_by_default():
    """GSPO's ratio is per sequence: its paper clips to [1 - 3e-4, 1 + 4e-4], not 0.2."""
    import inspect

    from distflow_mc.algos import losses

    config = load_config(compose_config(["algo.policy_loss=GSPO"]))
    assert config.algo.clip_low is None and config.algo.clip_high is None
    defaults = inspect.signature(losses.gspo).parameters
    assert (defaults["clip_low"].default, defaults["clip_high"].default) == (3e-4, 4e-4)


def test_rollout_tp_with_either_engine():
    """The transformers engine is unsharded: with rollout.tp > 1 one engine serves the group."""
    assert load_config(compose_config(["rollout.tp=2"])).rollout.tp == 2
    assert load_config(compose_config(["rollout=sglang", "rollout.tp=2"])).rollout.tp == 2


def test_context_parallel_limits_are_refused_by_name():
    load_config(compose_config(["parallel.cp=2"]))  # GRPO's defaults run under CP
    with pytest.raises(ValueError, match=r"model\.router_aux_loss_coef: > 0 with parallel\.cp"):
        load_config(compose_config(["parallel.cp=2", "model.router_aux_loss_coef=0.01"]))
    per_sequence = ["algo.loss_agg=SEQ_MEAN_TOKEN_MEAN", "algo.policy_loss=GSPO"]
    load_config(compose_config(["parallel.cp=2", *per_sequence, "algo.mis_level=SEQUENCE"]))
    rows = ["trainer.sequence_packing=true", "trainer.shared_prefix=ALWAYS"]
    load_config(compose_config(["parallel.cp=2", *rows]))


@pytest.mark.parametrize(
    ("rollout_tp", "train_tp", "pp", "move"),
    [
        (1, 1, 1, Move.NONE),  # every rank generated its own share and trains it
        (2, 2, 1, Move.BROADCAST),  # same replicas: the engine host's copy reaches its peer
        (1, 2, 1, Move.EXCHANGE),
        (2, 1, 1, Move.EXCHANGE),
        (2, 1, 2, Move.EXCHANGE),  # same DP size, different replicas (PP peers are far apart)
    ],
)
def test_movement_between_phases(rollout_tp, train_tp, pp, move):
    overrides = [f"rollout.tp={rollout_tp}", f"parallel.tp={train_tp}", f"parallel.pp={pp}"]
    layouts = build_layouts(load_config(compose_config(overrides)), 4)
    assert movement(layouts.rollout, layouts.train) is move
    assert layouts.rollout != layouts.train  # never the same phase, whatever the sizes
    config = load_config(compose_config(overrides))
    plan = plan_workflow(config.algo.workflow)
    text = "\n".join(describe_plan(plan, layouts))
    assert (f"({move.value} in)" in text) == (move is not Move.NONE), text
    # with what the stages read: the move lists its fields, the early round its own
    text = "\n".join(describe_plan(plan, layouts, *carried(plan, config, layouts)))
    # (prompt_length: trainer.shared_prefix=AUTO lays micro-batches out by it)
    moved = "input_ids, prompt_length, response_mask, reward, rollout_logprobs"
    assert (f"({move.value} in: {moved})" in text) == (move is not Move.NONE), text
    early = "(then starts sending input_ids, prompt_length, response_mask, rollout_logprobs)"
    assert (early in text) == (move is not Move.NONE), text


def test_refusals_before_any_collective():
    sglang = load_config(compose_config(["rollout=sglang", "rollout.tp=4"]))
    with pytest.raises(ValueError, match=r"rollout\.tp=4 would make a rollout TP group span"):
        build_layouts(sglang, 8, ranks_per_node=2)
    assert build_layouts(sglang, 8, ranks_per_node=4).rollout.dp == 2
    small = load_config(compose_config(["data.batch_size=2", "rollout.tp=2"]))
    with pytest.raises(ValueError, match=r"data\.batch_size = 2 prompts \(groups\) cannot"):
        build_layouts(small, 4)
    experts = load_config(compose_config(["parallel.ep=3"]))
    with pytest.raises(ValueError, match=r"parallel\.ep=3 must divide the train data-parallel"):
        build_layouts(experts, 4)
    dapo = ["data.batch_size=2", "rollout.tp=2", "algo.dynamic_sampling=true"]
    assert build_layouts(load_config(compose_config(dapo)), 4).train.dp == 4


def test_llama3_rope_scaling_matches_transformers(tmp_path: Path):
    """Our Llama 3.x inverse frequencies against transformers' own 'llama3' rope init,
    with all three bands present; other scaling types are refused by name."""
    import json

    import torch
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from distflow_mc.models.gpt import llama3_inv_freq
    from distflow_mc.models.hf_config import read_hf_config
    from tests.tiny_hf import make_tiny_model

    model = make_tiny_model("llama3", tmp_path / "llama3")
    arch = read_hf_config(model)
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](AutoConfig.from_pretrained(model), torch.device("cpu"))
    dim = arch.head_dim
    base = 1.0 / arch.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    got = llama3_inv_freq(base, arch.rope_scaling)
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=0)
    assert not torch.allclose(got, base)  # the scaling does something here
    raw = json.loads((model / "config.json").read_text())
    raw["rope_parameters"] = {**raw["rope_parameters"], "rope_type": "yarn"}
    (model / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"RoPE scaling 'yarn' is not supported"):
        read_hf_config(model)


def test_sequence_packing_is_refused_where_the_transformer_engine_spec_runs(monkeypatch):
    """Packed rows, shared prefixes and CP need the local spec's attention: where
    TransformerEngine's spec would run (GPU with TE installed, model.layer_spec=AUTO or TE),
    they are refused up front, named, and model.layer_spec=LOCAL runs them there."""
    import distflow_mc.models.gpt as gpt

    local = ["trainer.sequence_packing=true", "trainer.shared_prefix=ALWAYS", "parallel.cp=2"]
    load_config(compose_config(local))  # local spec: accepted
    with pytest.raises(ValueError, match=r"model\.layer_spec: TE needs a GPU with"):
        load_config(compose_config(["model.layer_spec=TE"]))  # no GPU, no TE here
    # a machine with TE on a GPU: AUTO takes TE's spec
    monkeypatch.setattr(gpt, "use_transformer_engine", lambda spec="AUTO": spec != "LOCAL")
    with pytest.raises(ValueError, match=r"trainer\.sequence_packing: packs rows"):
        load_config(compose_config(["trainer.sequence_packing=true"]))
    with pytest.raises(ValueError, match=r"trainer\.shared_prefix: ALWAYS needs the local"):
        load_config(compose_config(["trainer.shared_prefix=ALWAYS"]))
    with pytest.raises(ValueError, match=r"parallel\.cp: > 1 with TransformerEngine's spec"):
        load_config(compose_config(["parallel.cp=2"]))
    load_config(compose_config(["trainer.shared_prefix=AUTO"]))  # stays off there
    load_config(compose_config([]))  # off: nothing to refuse
    load_config(compose_config(["model.layer_spec=TE"]))
    load_config(compose_config([*local, "model.layer_spec=LOCAL"]))


def test_the_separate_preset_sets_the_async_defaults_and_asks_for_the_rollout_ranks():
    config = load_config(compose_config(["placement=separate", "rollout.ranks=2"]))
    assert config.rollout.placement is Placement.SEPARATE and config.rollout.ranks == 2
    assert config.trainer.max_staleness == 1 and config.algo.tis_cap == 2.0
    assert load_config(compose_config([])).algo.tis_cap is None  # colocated: no correction
    with pytest.raises(
        ValueError, match=r"rollout\.ranks: must be >= 1 with rollout\.placement=SEPARATE"
    ):
        load_config(compose_config(["placement=separate"]))
