"""Megatron GPTModel built from a Hugging Face config: Llama and Qwen2 families."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import warnings

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as mpu
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)

from distflow_mc.models.context import attention
from distflow_mc.models.hf_config import HFArch, Llama3Rope
from distflow_mc.models.spans import Spans, once
from distflow_mc.models.vision import attach_vision, mrope_angles
from distflow_mc.parallel.megatron_state import ModelParallel

# megatron-core 0.16 reads `te_general_gemm` in the MoE router but defines it only when
# TransformerEngine imports: without TE the name is missing (NameError), not None.
if not hasattr(moe_utils, "te_general_gemm"):
    moe_utils.te_general_gemm = None


def use_transformer_engine(layer_spec: str = "AUTO") -> bool:
    """Whether model.layer_spec (AUTO, LOCAL or TE) takes TransformerEngine's layer spec:
    AUTO where it can run (CUDA, transformer_engine installed)."""
    if layer_spec != "AUTO":
        return layer_spec == "TE"
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def padded_vocab(vocab_size: int, tp: int) -> int:
    """The vocabulary rounded up to a multiple of TP (each TP rank holds an equal slice);
    the padding rows are zero, never sampled, and take no probability."""
    return -(-vocab_size // tp) * tp


def pipeline_split(
    layers: int, pp: int, vpp: int | None, first: int | None, last: int | None
) -> tuple[int | None, int | None]:
    """Layers of the first and last pipeline stage, or (None, None) for an even split.
    megatron needs every stage's count divisible by the virtual stages and the middle
    stages equal; among the splits that qualify (`first` / `last` fixed when given) the
    most even one wins, then the one with fewer layers on the last stage (it also runs
    the output layer). ValueError names the settings when none qualifies."""
    v = vpp or 1
    if first is None and last is None and layers % (pp * v) == 0:
        return None, None
    options = []
    for f in [first] if first is not None else range(v, layers + 1, v):
        for lst in [last] if last is not None else range(v, layers + 1, v):
            middle, inner = layers - f - lst, pp - 2
            per = middle // inner if inner else 0
            if f % v or lst % v or middle < 0 or (inner == 0 and middle):
                continue
            if inner and (middle % inner or per < v or per % v):
                continue
            options.append((max(f, lst, per), f + lst, lst, f))
    if not options:
        raise ValueError(
            f"the model's num_hidden_layers={layers} cannot be split over parallel.pp={pp}"
            f" x parallel.vpp={v} with parallel.first_stage_layers={first},"
            f" parallel.last_stage_layers={last}: every stage needs a multiple of vpp layers"
            " and the middle stages an equal share"
        )
    *_, lst, f = min(options)
    return f, lst


def check_divisibility(arch: HFArch, mp: ModelParallel) -> None:
    """The model's sizes against the layout; ValueError names both settings."""
    pipeline_split(arch.num_layers, mp.pp, mp.vpp, mp.first_stage_layers, mp.last_stage_layers)
    checks = [
        ("num_attention_heads", arch.num_heads, "parallel.tp", mp.tp),
        ("num_key_value_heads", arch.num_kv_heads, "parallel.tp", mp.tp),
        ("intermediate_size", arch.intermediate_size, "parallel.tp", mp.tp),
    ]
    if arch.moe is None and mp.ep > 1:
        raise ValueError(
            f"parallel.ep={mp.ep} needs a MoE model; {arch.architecture} has no experts"
        )
    if arch.moe is not None:
        checks += [
            ("num_experts", arch.moe.num_experts, "parallel.ep", mp.ep),
            ("moe_intermediate_size", arch.moe.intermediate_size, "parallel.tp", mp.tp),
        ]
    for field, value, setting, size in checks:
        if value % size:
            raise ValueError(
                f"the model's {field}={value} (config.json) is not divisible by {setting}={size}:"
                f" change {setting}"
            )


def transformer_config(
    arch: HFArch,
    mp: ModelParallel,
    dtype: torch.dtype,
    router_aux_loss_coef: float = 0.0,
    recompute: str | None = None,
) -> TransformerConfig:
    with warnings.catch_warnings():
        # megatron's own default cuda_graph_scope trips its deprecation notice (no CUDA graphs here)
        warnings.filterwarnings("ignore", message="full scope is deprecated")
        return _transformer_config(arch, mp, dtype, router_aux_loss_coef, recompute)


def _moe_settings(arch: HFArch, aux_loss_coef: float) -> dict:
    """Qwen3-MoE routing in megatron's terms: softmax over the top-k logits equals the
    softmax over all experts renormalised over the top k (norm_topk_prob); without
    renormalisation the softmax comes first. Experts run one after another (SequentialMLP:
    HF's per-expert tensors map one to one)."""
    if arch.moe is None:
        return {}
    return dict(
        num_moe_experts=arch.moe.num_experts,
        moe_ffn_hidden_size=arch.moe.intermediate_size,
        moe_router_topk=arch.moe.top_k,
        moe_router_pre_softmax=not arch.moe.norm_topk_prob,
        moe_router_load_balancing_type="aux_loss" if aux_loss_coef else "none",
        moe_aux_loss_coeff=aux_loss_coef,
        moe_grouped_gemm=False,
    )


# trainer.recompute, megatron's granularities: "full" keeps each layer's input and makes the
# rest of its activations again in the backward pass (one layer per checkpoint);
# "selective" makes again the dense MLP's, the largest (the fused attention keeps only its
# output and log-sum-exp: nothing there to recompute; megatron's "layernorm" module needs
# TransformerEngine: its CheckpointWithoutOutput takes fp8=False for fp8 on)
RECOMPUTE = {
    None: {},
    "full": {
        "recompute_granularity": "full",
        "recompute_method": "uniform",
        "recompute_num_layers": 1,
    },
    "selective": {"recompute_granularity": "selective", "recompute_modules": ["mlp"]},
}


def _transformer_config(
    arch: HFArch,
    mp: ModelParallel,
    dtype: torch.dtype,
    router_aux_loss_coef: float,
    recompute: str | None,
) -> TransformerConfig:
    first, last = pipeline_split(
        arch.num_layers, mp.pp, mp.vpp, mp.first_stage_layers, mp.last_stage_layers
    )
    return TransformerConfig(
        **_moe_settings(arch, router_aux_loss_coef),
        **RECOMPUTE[recompute],
        expert_model_parallel_size=mp.ep,
        num_layers_in_first_pipeline_stage=first,
        num_layers_in_last_pipeline_stage=last,
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        ffn_hidden_size=arch.intermediate_size,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_softmax_in_fp32=True,
        tensor_model_parallel_size=mp.tp,
        pipeline_model_parallel_size=mp.pp,
        virtual_pipeline_model_parallel_size=mp.vpp,
        context_parallel_size=mp.cp,
        sequence_parallel=mp.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=not torch.cuda.is_available(),
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        # RL batches have a different length every micro-batch; p2p sends shapes first. The
        # interleaved schedule exchanges shapes both ways with one peer at PP=2, which
        # megatron's batched shape exchange mismatches: there, micro-batches are padded to
        # one length (models/schedule.py) and p2p goes unbatched, one group per direction.
        variable_seq_lengths=mp.vpp is None,
        batch_p2p_comm=mp.vpp is None,
        # megatron rejects variable lengths with the default (allgather) MoE dispatcher
        moe_token_dispatcher_type="alltoall",
        # Loss functions return (sum, count); megatron divides by the global count.
        calculate_per_token_loss=True,
    )


def build_gpt(
    arch: HFArch,
    mp: ModelParallel,
    dtype: torch.dtype,
    value_head: bool = False,
    router_aux_loss_coef: float = 0.0,
    recompute: str | None = None,
    freeze_vision: bool = True,
    layer_spec: str = "AUTO",
) -> list[MegatronModule]:
    """This rank's model chunks (one, or vpp with virtual pipeline stages). With
    `value_head`, the output layer is a scalar head (critic) and embeddings are untied;
    `recompute`: trainer.recompute; `freeze_vision`: model.freeze_vision; `layer_spec`:
    model.layer_spec."""
    check_divisibility(arch, mp)
    config = transformer_config(arch, mp, dtype, router_aux_loss_coef, recompute)
    chunks = []
    for vp_stage in range(mp.vpp or 1):
        vp = vp_stage if mp.vpp else None
        model = GPTModel(
            config=config,
            transformer_layer_spec=layers(config, vp, arch, use_transformer_engine(layer_spec)),
            vocab_size=padded_vocab(arch.vocab_size, mp.tp),
            max_sequence_length=arch.max_position_embeddings,
            pre_process=mpu.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=mpu.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
            parallel_output=True,
            share_embeddings_and_output_weights=arch.tie_word_embeddings and not value_head,
            position_embedding_type="rope",
            rotary_base=arch.rope_theta,
            vp_stage=vp,
        )
        if arch.rope_scaling is not None:
            rope = model.rotary_pos_emb
            rope.inv_freq = llama3_inv_freq(rope.inv_freq, arch.rope_scaling)
        packed_rope(model, arch.vision.mrope_section if arch.vision else None)
        if arch.vision is not None:
            attach_vision(model, arch.vision, dtype, freeze_vision)
        model.rotary_pos_emb.cp_group = None  # whole rows' angles: CP chunks pass positions
        if value_head and model.post_process:
            model.output_layer = ValueHead(arch.hidden_size, dtype, mp.sequence_parallel)
        elif model.post_process and not mp.sequence_parallel:
            batch_major_logits(model.output_layer)
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        chunks.append(model)
    return chunks


def packed_rope(model: GPTModel, sections: tuple[int, ...] | None = None) -> None:
    """Packed rows (models/schedule.py) pass each token's position in its own sample as
    `position_ids`; megatron's rotary embedding covers the row's positions 0..s-1, so each
    token takes the angles of its own position: [s, 1, 1, d] -> [s, b, 1, d]. Unpacked
    rows pass none and keep megatron's. A vision-language model's rows pass each token's
    three positions ([3, b, s]), turning the frequency `sections` (models/vision.py)."""
    positions: list[torch.Tensor | None] = [None]

    def remember(_: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        positions[0] = kwargs.get("position_ids", args[1] if len(args) > 1 else None)

    def per_token(_: torch.nn.Module, __: tuple, freqs: torch.Tensor) -> torch.Tensor:
        p = positions[0]
        if p is not None and p.dim() == 3:
            return mrope_angles(freqs, p, sections)
        return freqs if p is None else freqs[:, 0][p.T]

    model.register_forward_pre_hook(remember, with_kwargs=True)
    model.rotary_pos_emb.register_forward_hook(per_token)


def batch_major_logits(output_layer: torch.nn.Module) -> None:
    """The output layer computes on [b, s, h], so its logits come out in the [b, s, V]
    order GPTModel returns them in: GPTModel's [s, b, V] -> [b, s, V] copy of the logits,
    and megatron's copy of their transposed gradient in the layer's backward, become views
    (the copy moves to the hidden states, V / h times smaller). Every shape megatron sees is
    unchanged. Not under sequence parallelism, whose gather runs along the sequence dim."""

    def before(_: torch.nn.Module, args: tuple) -> tuple:
        return (args[0].transpose(0, 1).contiguous(), *args[1:])

    def after(_: torch.nn.Module, __: tuple, out: tuple) -> tuple:
        return (out[0].transpose(0, 1), *out[1:])

    output_layer.register_forward_pre_hook(before)
    output_layer.register_forward_hook(after)


def llama3_inv_freq(inv_freq: torch.Tensor, s: Llama3Rope) -> torch.Tensor:
    """Llama 3.x RoPE scaling (Meta's Llama 3.1 release; transformers' 'llama3' rope type):
    wavelengths beyond original_context / low_freq_factor are slowed by `factor`, those
    below original_context / high_freq_factor are kept, and the band between interpolates
    smoothly between the two."""
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def layers(config: TransformerConfig, vp_stage: int | None, arch: HFArch, te: bool):
    """TransformerEngine's layer spec (`te`); megatron's local spec otherwise, with a torch
    RMSNorm that also runs under sequence parallel (the local spec's own norm refuses it),
    for the layers and the final norm of this (virtual) stage."""
    if te:
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        return get_gpt_layer_with_transformer_engine_spec(
            num_experts=config.num_moe_experts, moe_grouped_gemm=False, qk_layernorm=arch.qk_norm
        )
    layer = get_gpt_layer_local_spec(
        num_experts=config.num_moe_experts, normalization="RMSNorm", qk_layernorm=arch.qk_norm
    )
    layer.submodules.input_layernorm = SequenceParallelRMSNorm
    layer.submodules.pre_mlp_layernorm = SequenceParallelRMSNorm
    layer.submodules.self_attention.module = RopeInCoreSelfAttention
    layer.submodules.self_attention.submodules.core_attention = SDPAttention
    if arch.qk_norm:  # per head: megatron all-reduces their gradients over TP (qk_layernorm)
        attention = layer.submodules.self_attention.submodules
        attention.q_layernorm = attention.k_layernorm = SequenceParallelRMSNorm
    return TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(config, vp_stage=vp_stage),
        layer_norm=SequenceParallelRMSNorm,
    )


class RopeInCoreSelfAttention(SelfAttention):
    """Megatron's SelfAttention with the rotary embedding left to its core attention
    (SDPAttention), which applies it while laying Q and K out for the fused kernel: on CPU
    megatron's own rope makes two full copies of Q and K per layer (a rotate-half cat and a
    cat with the empty non-rotary part), then the kernel's layout would be a third."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        # the rope travels beside the call, so the core attention must not be recomputed
        assert not self.checkpoint_core_attention and not self.config.no_rope_freq

    def forward(self, *args: object, rotary_pos_emb=None, **kwargs: object):
        if rotary_pos_emb is not None and not isinstance(rotary_pos_emb, tuple):
            rotary_pos_emb = (rotary_pos_emb,) * 2
        self.core_attention.rotary = rotary_pos_emb
        return super().forward(*args, **kwargs)


def rope_batch_major(t: torch.Tensor, freqs: torch.Tensor | None) -> torch.Tensor:
    """[s, b, heads, d] -> [b, heads, s, d] over [b, s, heads, d] memory, rotated by
    `freqs` [s, 1, 1, d] (megatron's: both halves equal, the whole head rotated) exactly as
    megatron computes it, t * cos + rotate_half(t) * sin, with one cat doing the layout."""
    if freqs is None:
        return t.transpose(0, 1).contiguous().transpose(1, 2)
    assert freqs.shape[-1] == t.shape[-1], "rope over part of the head is not supported"
    half = t.shape[-1] // 2
    cos, sin = (f(freqs[..., :half]).to(t.dtype) for f in (torch.cos, torch.sin))
    x1, x2 = t[..., :half], t[..., half:]
    first, second = x1 * cos - x2 * sin, x2 * cos + x1 * sin  # a + (-b) is a - b, exactly
    return torch.cat((first.transpose(0, 1), second.transpose(0, 1)), dim=-1).transpose(1, 2)


class SDPAttention(DotProductAttention):
    """The local spec's core attention through torch's fused `scaled_dot_product_attention`
    (causal, grouped K/V heads without repeating them): softmax(Q K^T * scale) V, as
    DotProductAttention computes it, without its [b, heads, s, s] score buffer and mask fill.
    It applies the rotary embedding (RopeInCoreSelfAttention hands it over) while laying
    Q, K and V out as [b, s, heads, d] memory, which the fused CPU kernel reads 1.5x faster
    than strided views of [s, b, ...]; rope angles are per position ([s, 1, 1, d]) or per
    token of a packed row ([s, b, 1, d]). The models here use no attention dropout, window
    or softmax offset. Under context parallelism (parallel.cp) it attends to the whole
    sample: K and V gathered over the CP group (models/context.py)."""

    rotary: tuple[torch.Tensor | None, torch.Tensor | None] | None = None

    def __init__(self, config: TransformerConfig, *args: object, **kwargs: object) -> None:
        # (megatron's DotProductAttention refuses CP; this one gathers K and V itself)
        super().__init__(dataclasses.replace(config, context_parallel_size=1), *args, **kwargs)
        cp = config.context_parallel_size > 1
        self.cp_group = mpu.get_context_parallel_group() if cp else None

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, **_: object):
        # causal self-attention over whole rows, or over the spans of packed rows (Spans:
        # samples, or a shared prompt and each sample's own part; schedule.py)
        assert self.softmax_offset is None
        scale = self.softmax_scale * (
            self.layer_number if self.config.apply_query_key_layer_scaling else 1
        )
        q_freqs, k_freqs = self.rotary or (None, None)
        q, k = rope_batch_major(query, q_freqs), rope_batch_major(key, k_freqs)
        v = rope_batch_major(value, None)
        if self.cp_group is not None:  # (a plan of its Pieces: models/context.py)
            out = attention(q, k, v, self.cp_group, scale, attention_mask)
        elif attention_mask is not None:  # a plan of its Spans
            spans = once(attention_mask, lambda: Spans.build(*attention_mask))
            out = spans.attention(q, k, v, scale)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=scale, enable_gqa=q.size(1) != k.size(1)
            )
        return out.permute(2, 0, 1, 3).reshape(out.size(2), out.size(0), -1)  # [s, b, h]


class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm with megatron's norm constructor. The norm works token by token, so
    on a sequence shard it computes what it would on the whole sequence; under sequence
    parallel its weight is marked so that megatron all-reduces its gradient over TP."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_: object):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        if config.sequence_parallel:
            self.weight.sequence_parallel = True


class ValueHead(torch.nn.Module):
    """Scalar head replacing the vocab output layer. Its input (after the final norm) is the
    same on every TP rank (gathered first under sequence parallel), so every TP rank holds
    and trains an identical copy."""

    def __init__(self, hidden_size: int, dtype: torch.dtype, sequence_parallel: bool) -> None:
        super().__init__()
        # zero: the critic starts at V = 0, not at noise as large as the rewards
        self.weight = torch.nn.Parameter(torch.zeros(1, hidden_size, dtype=dtype))
        self.sequence_parallel = sequence_parallel

    def forward(
        self, hidden: torch.Tensor, weight: torch.Tensor | None = None, **kwargs: object
    ) -> tuple[torch.Tensor, None]:
        if self.sequence_parallel:
            # every TP rank computes the loss on the whole sequence: its shard's gradient is
            # its slice of the (identical) full gradient, not a reduce-scatter of copies
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        return F.linear(hidden, self.weight), None
