"""What a workflow node is. Also the element type of `algo.workflow` in the typed config."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from omegaconf import MISSING


class Role(Enum):
    ACTOR = "ACTOR"
    CRITIC = "CRITIC"
    REFERENCE = "REFERENCE"
    REWARD = "REWARD"
    ROLLOUT = "ROLLOUT"


class NodeType(Enum):
    MODEL_INFERENCE = "MODEL_INFERENCE"
    MODEL_TRAIN = "MODEL_TRAIN"
    COMPUTE = "COMPUTE"


# Which node types each role can run. `None` is the role-free COMPUTE node (advantage, ...).
# A reference model is frozen, so it never trains; a rollout engine only generates.
ALLOWED_TYPES: dict[Role | None, frozenset[NodeType]] = {
    Role.ROLLOUT: frozenset({NodeType.MODEL_INFERENCE}),
    Role.ACTOR: frozenset({NodeType.MODEL_INFERENCE, NodeType.MODEL_TRAIN}),
    Role.CRITIC: frozenset({NodeType.MODEL_INFERENCE, NodeType.MODEL_TRAIN}),
    Role.REFERENCE: frozenset({NodeType.MODEL_INFERENCE}),
    Role.REWARD: frozenset({NodeType.COMPUTE, NodeType.MODEL_INFERENCE}),
    None: frozenset({NodeType.COMPUTE}),
}

# Role-free COMPUTE nodes with these ids run a built-in function when `fn` is not given.
BUILTIN_COMPUTE_IDS: frozenset[str] = frozenset({"advantage"})


@dataclass
class NodeSpec:
    """One workflow node as written in `algo.workflow`.

    `fn` is a dotted path `package.module.function` that replaces the default function
    bound to (role, type).
    """

    id: str = MISSING
    type: NodeType = MISSING
    role: Role | None = None
    deps: list[str] = field(default_factory=list)
    fn: str | None = None
