"""What the default stage functions read and write, declared per configuration: the
planner's liveness pass drops nodes nothing reads, a move carries only what the stages
after it read, and a pipeline stage gets only what its ranks read."""

from __future__ import annotations

from collections.abc import Callable

from distflow_mc.config.schema import AdvEstimator, AlgoConfig, Config, Placement, SharedPrefix
from distflow_mc.dag import Fields, NodeType, Plan, PlannedNode, Role, unmet_reads
from distflow_mc.models.hf_config import has_vision
from distflow_mc.parallel.layout import Layouts, Move, movement

MODEL_INPUTS = frozenset({"input_ids"})  # what a pipeline's first stage reads: it embeds them


def on_policy(a: AlgoConfig) -> bool:
    """One optimizer step per batch: the policy that sampled is the one being trained, so
    the old log-probs are the training forward's own (detached); no separate pass."""
    return a.ppo_epochs == 1 and a.mini_batches == 1


def corrected(a: AlgoConfig) -> bool:
    """The actor's loss corrects for the behaviour policy (algo.tis_cap / mis_low / mis_high):
    it reads the engine's log-probs."""
    return any(x is not None for x in (a.tis_cap, a.mis_low, a.mis_high))


TOKENS = frozenset({"input_ids", "response_mask"})


def node_fields(config: Config) -> Callable[[PlannedNode], Fields | None]:
    """The batch fields each default stage function reads and writes under `config`, for
    the planner's liveness pass; None for a node with its own `fn` (anything goes)."""
    a = config.algo
    kl = a.kl_coef > 0
    gae = a.adv_estimator is AdvEstimator.GAE
    f = Fields
    rows = row_layout(config)  # what the model nodes' micro-batches are laid out by
    images = vision_fields(config)
    model = TOKENS | rows | images
    actor_reads = model | {"advantages"}
    # on-policy, the loss measures the rollout gap itself; else the old-log-prob pass does
    actor_reads |= {"rollout_logprobs"} if on_policy(a) else {"old_logprobs"}
    actor_reads |= {"rollout_logprobs"} if corrected(a) else set()
    actor_reads |= {"ref_logprobs"} if kl and not a.kl_in_reward else set()
    advantage_reads = {"reward", "response_mask"} | ({"values"} if gae else set())
    advantage_reads |= {"old_logprobs", "ref_logprobs"} if kl and a.kl_in_reward else set()
    table = {
        (Role.ROLLOUT, NodeType.MODEL_INFERENCE): f(
            frozenset(), TOKENS | {"rollout_logprobs", "prompt_length"} | images
        ),
        (Role.REWARD, NodeType.COMPUTE): f(TOKENS, frozenset({"reward"})),
        (Role.REFERENCE, NodeType.MODEL_INFERENCE): f(
            model, frozenset({"ref_logprobs"}), "algo.kl_coef=0: no KL term"
        ),
        (Role.ACTOR, NodeType.MODEL_INFERENCE): f(
            model | {"rollout_logprobs"},
            frozenset({"old_logprobs"}),
            "on-policy with algo.ppo_epochs=1 and algo.mini_batches=1: the training forward's"
            " detached log-probs are the old ones",
        ),
        (Role.CRITIC, NodeType.MODEL_INFERENCE): f(
            model, frozenset({"values"}), "the advantage estimator uses no values"
        ),
        (None, NodeType.COMPUTE): f(
            frozenset(advantage_reads), frozenset({"advantages"} | ({"returns"} if gae else set()))
        ),
        (Role.ACTOR, NodeType.MODEL_TRAIN): f(frozenset(actor_reads), frozenset()),
        (Role.CRITIC, NodeType.MODEL_TRAIN): f(model | {"values", "returns"}, frozenset()),
    }
    return lambda node: None if node.fn else table.get((node.role, node.type))


# who writes a field a default stage function reads, for the refusal when none does
WRITERS = {
    "values": "a CRITIC MODEL_INFERENCE node (algo=ppo)",
    "returns": "the advantage node, with algo.adv_estimator=GAE only: a critic learns GAE's"
    " returns",
    "ref_logprobs": "a REFERENCE node",
    "old_logprobs": "an ACTOR MODEL_INFERENCE node",
    "reward": "a REWARD node",
    "advantages": "the advantage node",
}


def check_reads(plan: Plan, config: Config) -> None:
    """ValueError naming each node that reads a field none of its dependencies writes under
    `config` (say, a critic trained without GAE's returns), before any model is built."""
    unmet = unmet_reads(plan, node_fields(config))
    if unmet:
        lines = [
            f"  - node '{node}' reads {field}, which none of the nodes it depends on writes"
            + (f" (written by {WRITERS[field]})" if field in WRITERS else "")
            for node, field in unmet
        ]
        a = config.algo
        raise ValueError(
            f"algo.workflow (algo={a.name}) cannot run with algo.adv_estimator="
            f"{a.adv_estimator.name}, algo.kl_coef={a.kl_coef},"
            f" algo.kl_in_reward={a.kl_in_reward}:\n" + "\n".join(lines)
        )


def stage_reads(plan: Plan, config: Config, pp: int) -> tuple[frozenset[str] | None, ...] | None:
    """Per pipeline stage of the train layout, the batch fields its ranks read when every
    node's reads are declared: the first stage embeds the tokens, the middle ones read
    nothing (their inputs are the hidden states of the stage before), the last computes
    the losses and the advantages (None: everything that moves). None without a pipeline,
    or when a node has its own fn (it may read anything on any stage)."""
    fields = node_fields(config)
    if pp == 1 or any(fields(n) is None for n in plan.nodes):
        return None
    # every stage lays its micro-batches out alike, and turns by the 3-D positions
    images = vision_fields(config)
    rows = row_layout(config) | (images & {"mrope_positions"})
    return (MODEL_INPUTS | rows | images, *[rows] * (pp - 2), None)


def vision_fields(config: Config) -> frozenset[str]:
    """A vision-language model's: each prompt's images and which tokens are theirs (the
    first stage embeds them) and each token's three positions (every stage's rotary
    embedding reads them)."""
    images = {"images", "image_mask", "mrope_positions"}
    return frozenset(images if has_vision(config.model.path) else ())


def row_layout(config: Config) -> frozenset[str]:
    """The sample fields micro-batches are laid out by: the prompts' lengths when a group's
    samples may share them (trainer.shared_prefix)."""
    shared = config.trainer.shared_prefix is not SharedPrefix.NEVER
    return frozenset({"prompt_length"} if shared else ())


def carried(
    plan: Plan, config: Config, layouts: Layouts
) -> tuple[list[frozenset[str] | None], list[frozenset[str] | None]]:
    """Per node, from the stages' declared reads and writes: `keep`, when the batch moves in
    before it, the fields read from there on before being written (None: all, some node
    has its own fn); `early`, the fields to start sending after it, final while the next
    node (the reward) runs before the move."""
    nodes, fields = plan.nodes, node_fields(config)
    # SEPARATE: every sample carries the policy version that generated it, and the batch
    # moves whole once the rollout group has scored it
    separate = config.rollout.placement is Placement.SEPARATE
    version = frozenset({"version"} if separate else ())
    version |= {"token_version"} if config.rollout.partial or config.rollout.stream else set()
    where = [layouts.for_role(n.role) for n in nodes]
    declared = [fields(n) for n in nodes]
    keep: list[frozenset[str] | None] = [None] * len(nodes)
    early: list[frozenset[str] | None] = [None] * len(nodes)
    for i in range(len(nodes)):
        before = where[i - 1] if i else layouts.rollout
        if where[i] == before or any(f is None for f in declared[i:]):
            continue
        live: frozenset[str] = frozenset()  # read before written, from node i on
        for f in reversed(declared[i:]):
            live = (live - f.writes) | f.reads
        keep[i] = live | version
        last = declared[i - 1] if i >= 2 and where[i - 2] == before and not separate else None
        if last is not None and movement(before, where[i]) is not Move.NONE:
            early[i - 2] = keep[i] - last.writes
    return keep, early
