"""Log-probs and entropy of given tokens on vocab-parallel logits.

Each TP rank holds logits for its slice of the vocabulary; the full vocabulary is never
gathered. log-softmax = x - max - log(sum(exp(x - max))) with the max and the sum
all-reduced over TP (MAX, then SUM). The sums go through megatron's
reduce-from-tensor-parallel region (all-reduce forward, identity backward), so both
outputs are differentiable for the policy loss and the entropy bonus. Without TP, torch's
fused log_softmax does the same in one pass each way.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as mpu
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

PADDING_LOGIT = -1e30  # exp() is exactly 0, and 0 * (PADDING_LOGIT - max) stays finite


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`logits` [..., V/tp] of this TP rank, `labels` [...] global token ids.
    Returns log p(label) [...] and, if asked, the entropy [...] of softmax(logits / T).
    Columns at or past `vocab_size` (padding that makes the vocabulary divide over TP) take
    no probability."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    local_vocab = logits.shape[-1]
    start = mpu.get_tensor_model_parallel_rank() * local_vocab
    if vocab_size is not None and start + local_vocab > vocab_size:
        padding = torch.arange(start, start + local_vocab, device=logits.device) >= vocab_size
        logits = logits.masked_fill(padding, PADDING_LOGIT)
    if mpu.get_tensor_model_parallel_world_size() == 1:  # the whole vocabulary: torch's fused op
        log_p = torch.log_softmax(logits, dim=-1)
        logp = log_p.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        return logp, -(log_p.exp() * log_p).sum(dim=-1) if with_entropy else None
    peak = logits.detach().max(dim=-1, keepdim=True).values
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=mpu.get_tensor_model_parallel_group())
    shifted = logits - peak
    exp = shifted.exp()
    sum_exp = reduce_from_tensor_model_parallel_region(exp.sum(dim=-1))
    log_z = sum_exp.log()
    local = labels - start
    in_range = (local >= 0) & (local < local_vocab)
    picked = shifted.gather(-1, local.clamp(0, local_vocab - 1).unsqueeze(-1)).squeeze(-1)
    label_logit = reduce_from_tensor_model_parallel_region(picked * in_range)
    logp = label_logit - log_z
    if not with_entropy:
        return logp, None
    expected = reduce_from_tensor_model_parallel_region((exp * shifted).sum(dim=-1)) / sum_exp
    return logp, log_z - expected
