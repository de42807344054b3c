"""DAG validation errors, planning, and determinism (incl. property tests)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distflow_mc.dag import NodeSpec, NodeType, Role, WorkflowError, fingerprint, plan_workflow
from distflow_mc.dag.validate import find_cycle

R, T = Role, NodeType


def grpo() -> list[NodeSpec]:
    return [
        NodeSpec("rollout", T.MODEL_INFERENCE, R.ROLLOUT),
        NodeSpec("reward", T.COMPUTE, R.REWARD, ["rollout"]),
        NodeSpec("ref_log_prob", T.MODEL_INFERENCE, R.REFERENCE, ["reward"]),
        NodeSpec("actor_log_prob", T.MODEL_INFERENCE, R.ACTOR, ["reward"]),
        NodeSpec("advantage", T.COMPUTE, None, ["ref_log_prob", "actor_log_prob"]),
        NodeSpec("actor_train", T.MODEL_TRAIN, R.ACTOR, ["advantage"]),
    ]


def problems_of(nodes: list[NodeSpec]) -> list[str]:
    with pytest.raises(WorkflowError) as info:
        plan_workflow(nodes)
    assert "algo.workflow" in str(info.value)
    return info.value.problems


def test_grpo_plan_depths_and_order():
    plan = plan_workflow(grpo())
    assert [n.id for n in plan.nodes] == [
        "rollout",
        "reward",
        "actor_log_prob",
        "ref_log_prob",
        "advantage",
        "actor_train",
    ]
    assert [[n.id for n in s] for s in plan.stages][2] == ["actor_log_prob", "ref_log_prob"]
    assert {n.id: n.depth for n in plan.nodes}["actor_train"] == 4


def test_duplicate_id():
    nodes = [*grpo(), NodeSpec("reward", T.COMPUTE, R.REWARD, ["rollout"])]
    assert problems_of(nodes) == ["duplicate node id 'reward' (2 nodes, at positions 1, 6)"]


def test_unknown_dependency():
    nodes = grpo()
    nodes[5].deps = ["advantag"]
    (problem,) = problems_of(nodes)
    assert "node 'actor_train' depends on unknown node 'advantag'" in problem


def test_cycle_names_the_nodes_on_it():
    nodes = grpo()
    nodes[1].deps = ["rollout", "actor_train"]
    (problem,) = problems_of(nodes)
    assert problem.startswith("dependency cycle: ")
    cycle = problem.removeprefix("dependency cycle: ").split(" -> ")
    assert cycle[0] == cycle[-1]
    on_cycle = {"reward", "actor_train", "advantage"}
    assert set(cycle) in (on_cycle | {"actor_log_prob"}, on_cycle | {"ref_log_prob"})


def test_self_dependency_is_a_cycle():
    nodes = grpo()
    nodes[5].deps = ["advantage", "actor_train"]
    assert problems_of(nodes) == ["dependency cycle: actor_train -> actor_train"]


@pytest.mark.parametrize(
    ("role", "type_", "allowed"),
    [
        (R.REFERENCE, T.MODEL_TRAIN, "MODEL_INFERENCE"),
        (R.ROLLOUT, T.COMPUTE, "MODEL_INFERENCE"),
        (None, T.MODEL_TRAIN, "COMPUTE"),
    ],
)
def test_role_type_combination(role, type_, allowed):
    nodes = [*grpo(), NodeSpec("odd", type_, role, ["reward"], fn="math.sqrt")]
    (problem,) = problems_of(nodes)
    assert "node 'odd': role" in problem and f"type {type_.name}" in problem
    assert f"(allowed: {allowed})" in problem


def test_unreachable_nodes():
    nodes = [
        *grpo(),
        NodeSpec("orphan", T.MODEL_INFERENCE, R.CRITIC),
        NodeSpec("after_orphan", T.COMPUTE, R.REWARD, ["orphan"]),
    ]
    assert problems_of(nodes) == [
        "node 'after_orphan' is unreachable: no dependency path leads to it from a ROLLOUT node",
        "node 'orphan' is unreachable: no dependency path leads to it from a ROLLOUT node",
    ]


@pytest.mark.parametrize(
    ("fn", "why"),
    [
        ("no_such_module_xyz.fn", "module 'no_such_module_xyz' does not import"),
        ("math.no_such_function", "module 'math' has no attribute 'no_such_function'"),
        ("math.pi", "'math.pi' is not callable"),
        ("sqrt", "is not a dotted path"),
    ],
)
def test_fn_that_does_not_import(fn, why):
    nodes = grpo()
    nodes[1].fn = fn
    (problem,) = problems_of(nodes)
    assert problem.startswith(f"node 'reward': fn '{fn}' does not import")
    assert why in problem


def test_fn_override_that_imports_is_kept():
    nodes = grpo()
    nodes[1].fn = "math.sqrt"
    plan = plan_workflow(nodes)
    assert [n.fn for n in plan.nodes if n.id == "reward"] == ["math.sqrt"]


def test_role_free_compute_needs_fn_unless_built_in():
    nodes = [*grpo(), NodeSpec("filter", T.COMPUTE, None, ["reward"])]
    (problem,) = problems_of(nodes)
    assert "node 'filter': a role-free COMPUTE node needs `fn`" in problem


def test_no_rollout_and_empty():
    assert problems_of([]) == ["the workflow has no nodes"]
    only = [NodeSpec("advantage", T.COMPUTE)]
    assert problems_of(only) == ["the workflow has no ROLLOUT node: nothing would produce samples"]


def test_all_structural_problems_reported_together():
    nodes = grpo()
    nodes[2].type = T.MODEL_TRAIN
    nodes[4].deps = ["missing"]
    nodes.append(NodeSpec("rollout", T.MODEL_INFERENCE, R.ROLLOUT))
    assert len(problems_of(nodes)) == 3


def test_find_cycle_none_on_dag():
    assert find_cycle({"a": [], "b": ["a"], "c": ["a", "b"]}) is None


@st.composite
def random_dags(draw) -> list[NodeSpec]:
    n = draw(st.integers(min_value=1, max_value=40))
    nodes = [NodeSpec("n0", T.MODEL_INFERENCE, R.ROLLOUT)]
    for i in range(1, n):
        deps = draw(st.sets(st.integers(0, i - 1), min_size=1, max_size=min(i, 4)))
        nodes.append(NodeSpec(f"n{i}", T.COMPUTE, R.REWARD, [f"n{d}" for d in sorted(deps)]))
    return nodes


@settings(max_examples=60, deadline=None)
@given(random_dags(), st.randoms(use_true_random=False))
def test_plan_and_fingerprint_ignore_node_order(nodes, rng: random.Random):
    plan = plan_workflow(nodes)
    shuffled = [NodeSpec(n.id, n.type, n.role, rng.sample(n.deps, len(n.deps))) for n in nodes]
    rng.shuffle(shuffled)
    again = plan_workflow(shuffled)
    assert again == plan
    assert fingerprint(again, {"x": 1}) == fingerprint(plan, {"x": 1})
    assert fingerprint(plan, {"x": 2}) != fingerprint(plan, {"x": 1})


@settings(max_examples=60, deadline=None)
@given(random_dags())
def test_order_respects_dependencies_and_depth(nodes):
    plan = plan_workflow(nodes)
    position = {n.id: i for i, n in enumerate(plan.nodes)}
    depth = {n.id: n.depth for n in plan.nodes}
    for node in plan.nodes:
        assert all(position[d] < position[node.id] for d in node.deps)
        expected = 1 + max((depth[d] for d in node.deps), default=-1)
        assert node.depth == expected
    assert [n.id for s in plan.stages for n in s] == [n.id for n in plan.nodes]


def _fields(table: dict[str, tuple[set[str], set[str]]]):
    from distflow_mc.dag import Fields

    def fields(node):
        if node.fn:
            return None
        reads, writes = table[node.id]
        return Fields(frozenset(reads), frozenset(writes), f"{node.id} unread")

    return fields


def test_liveness_drops_what_nothing_reads_and_what_only_fed_it():
    from distflow_mc.dag import prune

    def node(id_: str, role, type_, deps=(), fn=None) -> NodeSpec:
        return NodeSpec(id=id_, type=type_, role=role, deps=list(deps), fn=fn)

    nodes = [
        node("gen", Role.ROLLOUT, NodeType.MODEL_INFERENCE),
        node("ref", Role.REFERENCE, NodeType.MODEL_INFERENCE, ["gen"]),
        node("kl", Role.REWARD, NodeType.COMPUTE, ["ref"]),
        node("advantage", None, NodeType.COMPUTE, ["gen"]),
        node("train", Role.ACTOR, NodeType.MODEL_TRAIN, ["advantage", "kl"]),
    ]
    table = {
        "gen": (set(), {"tokens"}),
        "ref": ({"tokens"}, {"ref"}),
        "kl": ({"ref"}, {"kl"}),
        "advantage": ({"tokens"}, {"adv"}),
        "train": ({"adv", "tokens"}, set()),
    }
    plan = prune(plan_workflow(nodes), _fields(table))
    assert [n.id for n in plan.nodes] == ["gen", "advantage", "train"]
    assert [d[0] for d in plan.dropped] == ["ref", "kl"]  # ref only fed the dropped kl
    assert plan.dropped[1][1] == "nothing reads its kl (kl unread)"
    nodes[1] = node("ref", Role.REFERENCE, NodeType.MODEL_INFERENCE, ["gen"], fn="m.f")
    kept = prune(plan_workflow(nodes, check_fn=False), _fields(table))
    assert "ref" in [n.id for n in kept.nodes]  # an explicit fn is never dropped
    assert [d[0] for d in kept.dropped] == ["kl"]


@pytest.mark.parametrize(
    ("overrides", "dropped"),
    [
        ([], {"ref_log_prob", "actor_log_prob"}),
        (["algo.kl_coef=0.01"], {"actor_log_prob"}),
        (["algo.kl_coef=0.01", "algo.kl_in_reward=true"], set()),  # KL(old || ref) in reward
        (["algo.ppo_epochs=2"], {"ref_log_prob"}),
        (["algo.mini_batches=2"], {"ref_log_prob"}),
        (["algo=ppo"], {"ref_log_prob", "actor_log_prob"}),  # the critic's values feed GAE
    ],
)
def test_liveness_of_the_shipped_workflows(overrides, dropped):
    from distflow_mc.config import load_config
    from distflow_mc.dag import prune
    from distflow_mc.stages.fields import node_fields
    from tests.conftest import compose_config

    config = load_config(compose_config(overrides))
    plan = prune(plan_workflow(config.algo.workflow), node_fields(config))
    assert {d[0] for d in plan.dropped} == dropped


@pytest.mark.parametrize(
    ("overrides", "moved"),
    [
        # on-policy GRPO: the loss reads the rollout log-probs for the gap (and every model
        # node the prompts' lengths: trainer.shared_prefix=AUTO lays its rows out by them)
        ([], {"input_ids", "response_mask", "rollout_logprobs", "reward", "prompt_length"}),
        # the old-log-prob pass reads them
        (
            ["algo.ppo_epochs=2"],
            {"input_ids", "response_mask", "rollout_logprobs", "reward", "prompt_length"},
        ),
        (
            ["algo=ppo"],
            {"input_ids", "response_mask", "rollout_logprobs", "reward", "prompt_length"},
        ),
        # flat rows: no prompt lengths
        (
            ["trainer.shared_prefix=NEVER"],
            {"input_ids", "response_mask", "rollout_logprobs", "reward"},
        ),
    ],
)
def test_moves_carry_what_later_stages_read(overrides, moved):
    """The rollout -> train move carries only the fields the train-layout stages read (the
    reward's strings stay behind); what is final before the reward leaves while the reward
    is scored. A node with its own fn may read anything: then everything moves, at once."""
    from dataclasses import replace
    from types import SimpleNamespace

    from distflow_mc.config import load_config
    from distflow_mc.dag import prune
    from distflow_mc.parallel import build_layouts
    from distflow_mc.stages.fields import node_fields
    from distflow_mc.stages.step import bind
    from tests.conftest import compose_config

    config = load_config(compose_config([*overrides, "parallel.tp=2"]))  # rollout DP2 -> TP2
    w = SimpleNamespace(config=config, layouts=build_layouts(config, 2))
    bound = bind(prune(plan_workflow(config.algo.workflow), node_fields(config)), w)
    moves = [b for b in bound if b.keep is not None]
    assert [b.keep for b in moves] == [moved]
    first_train = bound.index(moves[0])
    assert [b.node.id for b in bound if b.early is not None] == [bound[first_train - 2].node.id]
    assert bound[first_train - 2].early == moved - {"reward"}

    own = [
        replace(n, fn="distflow_mc.stages.train.actor") if n.id == "actor_train" else n
        for n in config.algo.workflow
    ]
    bound = bind(prune(plan_workflow(own), node_fields(config)), w)
    assert all(b.keep is None and b.early is None for b in bound)


def test_pipeline_stages_read_their_part():
    """With every node's reads declared, a pipeline's first stage reads the tokens, the
    middle ones nothing (but the prompts' lengths, under trainer.shared_prefix), the last
    the rest; without a pipeline, or with a node of its own
    fn (it may read anything anywhere), every stage reads everything."""
    from dataclasses import replace

    from distflow_mc.config import load_config
    from distflow_mc.dag import prune
    from distflow_mc.stages.fields import node_fields, stage_reads
    from tests.conftest import compose_config

    config = load_config(compose_config(["algo=ppo"]))
    plan = prune(plan_workflow(config.algo.workflow), node_fields(config))
    assert stage_reads(plan, config, 1) is None
    rows = frozenset({"prompt_length"})  # every stage lays its micro-batches out by them
    assert stage_reads(plan, config, 3) == (frozenset({"input_ids"}) | rows, rows, None)
    own = [
        replace(n, fn="distflow_mc.stages.advantage.compute") if n.id == "advantage" else n
        for n in config.algo.workflow
    ]
    assert stage_reads(prune(plan_workflow(own), node_fields(config)), config, 3) is None


def test_separate_splits_the_plan_between_the_groups():
    """rollout.placement=SEPARATE: the rollout group runs the ROLLOUT and REWARD nodes, the
    train group the rest; a workflow that trains before it has scored, or trains nothing,
    is refused by name."""
    from types import SimpleNamespace

    from distflow_mc.config import load_config
    from distflow_mc.parallel import build_layouts
    from distflow_mc.stages.step import bind, split
    from tests.conftest import compose_config

    config = load_config(compose_config(["placement=separate", "rollout.ranks=1", "algo=ppo"]))
    layouts = build_layouts(config, 3)
    w = SimpleNamespace(config=config, layouts=layouts)
    bound = bind(plan_workflow(config.algo.workflow), w)
    rolls, trains = split(bound, layouts.rollout)
    assert [b.node.id for b in rolls] == ["rollout", "reward"]
    assert {b.node.id for b in trains} >= {"advantage", "actor_train", "critic_train"}
    assert trains[0].keep is not None and "version" in trains[0].keep
    with pytest.raises(ValueError, match=r"rollout\.placement=SEPARATE needs every ROLLOUT"):
        split(rolls, layouts.rollout)  # nothing trains


def test_a_read_no_dependency_writes_is_unmet_unless_an_fn_may_write_it():
    from distflow_mc.dag import unmet_reads

    def node(id_: str, role, type_, deps=(), fn=None) -> NodeSpec:
        return NodeSpec(id=id_, type=type_, role=role, deps=list(deps), fn=fn)

    nodes = [
        node("gen", Role.ROLLOUT, NodeType.MODEL_INFERENCE),
        node("side", Role.REWARD, NodeType.COMPUTE, ["gen"]),  # writes kl: train not after it
        node("advantage", None, NodeType.COMPUTE, ["gen"]),
        node("train", Role.ACTOR, NodeType.MODEL_TRAIN, ["advantage"]),
    ]
    table = {
        "gen": (set(), {"tokens"}),
        "side": (set(), {"kl"}),
        "advantage": ({"tokens"}, {"adv"}),
        "train": ({"adv", "tokens", "kl", "returns"}, set()),
    }
    plan = plan_workflow(nodes)
    assert unmet_reads(plan, _fields(table)) == [("train", "kl"), ("train", "returns")]
    nodes[2] = node("advantage", None, NodeType.COMPUTE, ["gen"], fn="m.f")  # may write all
    assert unmet_reads(plan_workflow(nodes, check_fn=False), _fields(table)) == []


@pytest.mark.parametrize(
    ("overrides", "unmet"),
    [
        # a critic learns GAE's returns; the other estimators write none
        (["algo=ppo", "algo.adv_estimator=GRPO"], ["'critic_train' reads returns"]),
        (["algo=ppo", "algo.adv_estimator=RLOO"], ["'critic_train' reads returns"]),
        (["algo.adv_estimator=GAE"], ["'advantage' reads values"]),  # GRPO's: no critic
    ],
)
def test_shipped_workflows_refuse_what_no_node_writes(overrides, unmet):
    from distflow_mc.config import load_config
    from distflow_mc.stages.fields import check_reads
    from tests.conftest import compose_config

    config = load_config(compose_config(overrides))
    with pytest.raises(ValueError, match=r"algo\.workflow") as e:
        check_reads(plan_workflow(config.algo.workflow), config)
    assert [line for line in unmet if line not in str(e.value)] == []
    assert "written by" in str(e.value)
    for ok in ([], ["algo=ppo"], ["algo.kl_coef=0.01", "algo.kl_in_reward=true"]):
        config = load_config(compose_config(ok))
        check_reads(plan_workflow(config.algo.workflow), config)  # the shipped ones run
