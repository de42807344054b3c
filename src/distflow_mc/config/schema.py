"""Typed configuration. Every Hydra group composes onto one of these dataclasses, so an
unknown key or a value of the wrong type is an error that names the key."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from omegaconf import MISSING

from distflow_mc.dag.spec import NodeSpec


class Dtype(Enum):
    AUTO = "AUTO"  # bfloat16 on GPU, float32 on CPU
    FLOAT32 = "FLOAT32"
    BFLOAT16 = "BFLOAT16"


class LayerSpec(Enum):
    AUTO = "AUTO"  # TransformerEngine's where it is installed and CUDA runs, else LOCAL
    LOCAL = "LOCAL"  # megatron's local spec with torch's fused attention (models/gpt.py)
    TE = "TE"  # TransformerEngine's (GPU, transformer_engine installed)


class Engine(Enum):
    HF = "HF"  # transformers generate: CPU default, also runs on GPU
    SGLANG = "SGLANG"  # optional extra, GPU only


class AdvEstimator(Enum):
    GRPO = "GRPO"
    DR_GRPO = "DR_GRPO"
    RLOO = "RLOO"
    REINFORCE_PP = "REINFORCE_PP"
    GAE = "GAE"  # needs a critic


class Placement(Enum):
    COLOCATED = "COLOCATED"  # every rank rolls out and trains, in turns
    SEPARATE = "SEPARATE"  # rollout.ranks ranks roll out while the others train


class SharedPrefix(Enum):  # (not ON/OFF: YAML reads those as booleans)
    NEVER = "NEVER"
    ALWAYS = "ALWAYS"
    AUTO = "AUTO"  # when the shared tokens are a large enough share of a batch's


class Recompute(Enum):
    NONE = "NONE"
    FULL = "FULL"  # megatron's full recompute: a layer's activations made again in backward
    SELECTIVE = "SELECTIVE"  # megatron's selective: the dense MLPs' activations again


class OnStale(Enum):
    WAIT = "WAIT"  # a group deferred once goes in the next step: the step waits for it
    DROP = "DROP"  # ...unless it is still running when the step is full: dropped, counted


class PolicyLoss(Enum):
    PPO = "PPO"  # token-level clipped ratio (asymmetric bounds, optional dual clip)
    GSPO = "GSPO"  # sequence-level ratio


class LossAgg(Enum):
    TOKEN_MEAN = "TOKEN_MEAN"
    SEQ_MEAN_TOKEN_SUM = "SEQ_MEAN_TOKEN_SUM"
    SEQ_MEAN_TOKEN_MEAN = "SEQ_MEAN_TOKEN_MEAN"


class KLEstimator(Enum):
    K1 = "K1"
    K2 = "K2"
    K3 = "K3"


class MisLevel(Enum):
    TOKEN = "TOKEN"
    SEQUENCE = "SEQUENCE"


@dataclass
class AlgoConfig:
    name: str = MISSING
    workflow: list[NodeSpec] = MISSING
    adv_estimator: AdvEstimator = AdvEstimator.GRPO
    policy_loss: PolicyLoss = PolicyLoss.PPO
    loss_agg: LossAgg = LossAgg.TOKEN_MEAN
    # null: the loss's own default (PPO 0.2 / 0.2; GSPO 3e-4 / 4e-4, its paper's sequence-level
    # range). DAPO's clip-higher: clip_high 0.28.
    clip_low: float | None = None
    clip_high: float | None = None
    dual_clip: float | None = None  # e.g. 3.0
    kl_coef: float = 0.0
    kl_estimator: KLEstimator = KLEstimator.K3
    kl_in_reward: bool = False  # penalise in the reward instead of adding a loss term
    entropy_coef: float = 0.0
    gamma: float = 1.0  # GAE
    lam: float = 0.95  # GAE
    value_clip: float | None = 0.2
    ppo_epochs: int = 1
    mini_batches: int = 1  # optimizer steps per epoch, over each rank's samples
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal ...
    dynamic_sampling_max_rounds: int = 4  # ... and sample more prompts, at most this often
    overlong_buffer: int = 0  # DAPO soft overlong penalty over the last N tokens; 0: off
    overlong_penalty: float = 1.0
    # Off-policy correction against the engine that sampled (algos/correction.py): any of
    # these set weights each token's loss by pi_prox / pi_behav, capped at tis_cap, and
    # leaves out tokens (or, with mis_level SEQUENCE, sequences) whose weight is outside
    # [mis_low, mis_high]. null: off.
    tis_cap: float | None = None  # e.g. 2.0
    mis_low: float | None = None  # e.g. 0.5
    mis_high: float | None = None  # e.g. 2.0
    mis_level: MisLevel = MisLevel.TOKEN


@dataclass
class ModelConfig:
    name: str = MISSING
    path: str = MISSING  # local Hugging Face directory: config.json, *.safetensors, tokenizer
    dtype: Dtype = Dtype.AUTO
    embedded_task: bool = False  # the built-in CPU task: made locally on first use
    # MoE models: weight of megatron's router load-balancing loss (0: off, as RL recipes do)
    router_aux_loss_coef: float = 0.0
    # vision-language models: the vision tower stays as loaded (most recipes); false: it
    # trains with the rest (gradients all-reduced over DP, replicated over TP)
    freeze_vision: bool = True
    # the transformer layers' implementation; LOCAL also on a GPU with TransformerEngine
    # installed, for what only the local spec runs (CP, packed rows, shared prefixes)
    layer_spec: LayerSpec = LayerSpec.AUTO


@dataclass
class ParallelConfig:
    """Training layout. Data parallel size is derived: world / (tp * pp * cp)."""

    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    # Layers of the first / last pipeline stage when the layer count does not split evenly
    # (null: chosen automatically; see models/gpt.py pipeline_split)
    first_stage_layers: int | None = None
    last_stage_layers: int | None = None
    cp: int = 1
    sequence_parallel: bool = False
    ep: int = 1  # expert parallel (MoE models): experts split over ep data-parallel replicas
    timeout_s: float = 600.0  # every collective of every process group


@dataclass
class OptimConfig:
    """Adam with warmup then decay, megatron's optimizer and LR scheduler."""

    lr: float = 1e-6
    min_lr: float = 0.0
    warmup_steps: int = 0
    decay_steps: int | None = None  # None: trainer.total_steps
    decay_style: str = "constant"  # constant | linear | cosine
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    distributed_optimizer: bool = False  # shard optimizer state over data parallel ranks


@dataclass
class AgentConfig:
    """Multi-turn, tool-calling rollouts (agent/loop.py); single-turn while `tools` is empty."""

    tools: list[str] = field(default_factory=list)  # dotted paths: tools, or tool sets
    parser: str = "hermes"  # tool-call format: <tool_call>{json}</tool_call> (Qwen), or a path
    max_turns: int = 4  # model turns per trajectory
    max_total_tokens: int = 1024  # prompt + turns + tool results, per trajectory
    tool_timeout_s: float = 10.0  # per call
    tool_timeouts: dict[str, float] = field(default_factory=dict)  # per tool name, overrides
    max_tool_output_chars: int = 2000  # a longer result is cut
    # a turn also ends at a token whose text ends with one of these (e.g. "</tool_call>":
    # one call per turn, the template closes the message); default: at end of sequence
    stop: list[str] = field(default_factory=list)


@dataclass
class RolloutConfig:
    """Rollout layout and sampling. Rollout data parallel size is world / tp."""

    engine: Engine = Engine.HF
    tp: int = 1
    n: int = 8  # samples per prompt, all generated on one rank
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 256
    mem_fraction: float = 0.5  # SGLang: GPU memory for weights + KV cache
    # shares GPUs with training: sleep/wake around each step (COLOCATED placement only)
    colocated: bool = True
    placement: Placement = Placement.COLOCATED
    ranks: int = 0  # SEPARATE: the last this many ranks roll out, the first ones train
    logprob_gap_warn: float = 0.05  # warn when engine/actor log-probs differ more (mean)
    weight_sync_bucket_mb: int = 256
    # SEPARATE: a generation running when new weights arrive stops at the next token
    # boundary (with rollout.stream: at the end of its engine call) and goes on with them
    # (each token's log-prob and version from the weights that drew it), instead of
    # finishing on the old ones
    partial: bool = False
    # SEPARATE: a step takes its share of groups as soon as that many are finished; the
    # rest (a slow tool call, a long response) go on while the next step's groups generate
    # and go in that step (trainer.on_stale); the rollout then runs k - 1 versions ahead
    stream: bool = False
    # rollout.stream: the most tokens an engine call generates (0: a whole turn); a turn
    # cut there goes on in the next call, with the new groups: a long response does not
    # hold the finished ones (single-turn tasks need it to stream at all)
    stream_chunk: int = 0
    agent: AgentConfig = field(default_factory=AgentConfig)


class Resume(Enum):
    NEVER = "NEVER"
    AUTO = "AUTO"  # from the latest complete checkpoint in trainer.checkpoint_dir, if any


class OnBadRow(Enum):
    SKIP = "SKIP"  # count it, warn, carry on with the rest of the batch
    ERROR = "ERROR"  # stop with the file and row number


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)
    val_files: list[str] = field(default_factory=list)
    tokenizer: str | None = None  # local HF tokenizer directory; None: model.path
    batch_size: int = 8  # prompts per step, over all rollout data-parallel ranks
    max_prompt_length: int = 512
    shuffle: bool = True  # a seeded permutation per epoch, the same on every rank
    on_malformed: OnBadRow = OnBadRow.SKIP
    on_overlong: OnBadRow = OnBadRow.SKIP  # prompts longer than max_prompt_length
    prefetch: bool = True  # read and tokenize the next batch while the step runs
    max_empty_steps: int = 3  # stop after this many steps in a row with no usable sample
    # vision-language rows: an image of more pixels is a malformed row (before any resize)
    max_image_pixels: int = 4096 * 4096


@dataclass
class RewardConfig:
    fn: str | None = None  # dotted path of a custom reward; rule-based by data_source otherwise
    timeout_s: float = 10.0
    error_score: float = 0.0
    max_failing_steps: int = 3  # stop after this many steps in a row of error scores only


@dataclass
class TrainerConfig:
    total_steps: int = 100
    seed: int = 1
    dry_run: bool = False  # plan, agree across ranks, print the plan, exit
    log_all_ranks: bool = False
    micro_batch_tokens: int = 4096  # padded tokens (rows x longest) of one micro-batch
    # several samples per micro-batch row (own positions, attention within the sample):
    # less padding; needs the local layer spec (TransformerEngine's would need THD)
    sequence_packing: bool = False
    # a group's samples in one row: their common prompt once, then each sample's own tokens
    # (attending to the prompt and to themselves), the same math with less work; AUTO: when
    # it saves enough, on the local layer spec, without an MoE load-balancing loss or
    # activation recomputation
    shared_prefix: SharedPrefix = SharedPrefix.AUTO
    # activation recomputation for long sequences: FULL keeps each layer's input only and
    # computes the rest again in the backward pass (more compute, much less memory)
    recompute: Recompute = Recompute.NONE
    val_every: int = 0  # validate on data.val_files every N steps (and at the end); 0: off
    progress_bar: bool = True  # rank 0: step, reward, tokens/s, ETA
    tensorboard: bool = True  # rank 0 writes <output dir>/tensorboard
    wandb_project: str | None = None  # log to Weights & Biases too (pip install wandb)
    export_hf: bool = False  # write the final actor as a HF checkpoint to <output dir>/hf
    save_every: int = 0  # checkpoint every N steps (and at the end); 0: never
    keep_last: int = 3
    checkpoint_dir: str | None = None  # None: <output dir>/checkpoints
    resume: Resume = Resume.NEVER
    val_n: int = 1  # samples per validation prompt; 1: greedy
    # rollout.placement=SEPARATE: batch t is generated by the actor of max(0, t - k) optimizer
    # steps. 0: the colocated run's math (no overlap); 1: one step off (generation of t + 1
    # overlaps training of t)
    max_staleness: int = 1
    # SEPARATE: the train group sends the actor to the engines after every N-th optimizer
    # step only (less traffic for large models); batch t is then generated by the newest sent
    # version at least k steps old, so a sample is at most k + N - 1 versions old
    weight_sync_every: int = 1
    # rollout.stream: a group still running when the step after the one it started in is
    # full: WAIT for it (every prompt trained once) or DROP it (counted)
    on_stale: OnStale = OnStale.WAIT
    actor_optim: OptimConfig = field(default_factory=OptimConfig)
    critic_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5))


@dataclass
class Config:
    name: str = "distflow"
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


# Hydra group -> schema. `experiment` is a global overlay, so its schema is `Config` itself.
GROUP_SCHEMAS: dict[str, type] = {
    "algo": AlgoConfig,
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "rollout": RolloutConfig,
    "data": DataConfig,
    "reward": RewardConfig,
    "trainer": TrainerConfig,
}
