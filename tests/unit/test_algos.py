"""Each algorithm function against a case computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from distflow_mc.algos import advantages as adv
from distflow_mc.algos import correction, losses

R = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
G = torch.tensor([7, 7, 7, 3, 3, 3])  # group ids need not be contiguous or sorted


def test_grpo_normalises_within_groups():
    # group 7: rewards (1, 0, 0), mean 1/3, unbiased std sqrt(1/3); group 3: all equal -> 0
    std = math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2) + 1e-6
    want = [(2 / 3) / std, -(1 / 3) / std, -(1 / 3) / std, 0, 0, 0]
    torch.testing.assert_close(adv.grpo(R, G, eps=1e-6), torch.tensor(want))


def test_dr_grpo_and_rloo():
    torch.testing.assert_close(adv.dr_grpo(R, G), torch.tensor([2 / 3, -1 / 3, -1 / 3, 0, 0, 0]))
    # RLOO: 1 - mean(0, 0) = 1; 0 - mean(1, 0) = -0.5
    torch.testing.assert_close(adv.rloo(R, G), torch.tensor([1.0, -0.5, -0.5, 0, 0, 0]))


def test_batch_moments_over_replicas_equal_the_whole_batch():
    """Two replicas' halves, their [sum, squares, count] summed (what the DP all-reduce
    does), give the mean and std of the whole batch, also when one replica is empty."""
    x = torch.tensor([0.5, -1.0, 2.0, 3.5, 0.0, 1.0], dtype=torch.float64)
    for cut in (3, 0):
        a, b = x[:cut], x[cut:]
        other = torch.stack([b.sum(), (b * b).sum(), b.new_tensor(float(b.numel()))])
        mean, std = adv.batch_moments(a, reduce=lambda s, o=other: s + o)
        torch.testing.assert_close((mean, std), (x.mean(), x.std()))


def test_reinforce_pp_baseline_normalises_over_the_batch():
    centred = torch.tensor([2 / 3, -1 / 3, -1 / 3, 0, 0, 0])
    want = (centred - centred.mean()) / centred.std()
    torch.testing.assert_close(adv.reinforce_pp_baseline(R, G, eps=0.0), want)


def test_gae_by_hand():
    # one response of 3 tokens (then padding), reward 1 at the last token, gamma 1, lam 0.5
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.25, 0.5, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # deltas: t2: 1 + 0 - .5 = .5; t1: 0 + .5 - .25 = .25; t0: 0 + .25 - .5 = -.25
    # A2 = .5; A1 = .25 + .5*.5 = .5; A0 = -.25 + .5*.5 = 0
    a, ret = adv.gae(rewards, values, mask, gamma=1.0, lam=0.5)
    torch.testing.assert_close(a, torch.tensor([[0.0, 0.5, 0.5, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.5, 0.75, 1.0, 0.0]]))


def test_gae_steps_over_tool_tokens():
    # an agent trajectory: turn 1 (2 tokens), a tool result (2 tokens, mask 0), turn 2 (1
    # token): the tool tokens are not steps, so it equals GAE on the 3 generated tokens
    rewards = torch.tensor([[0.0, 0.0, 7.0, 7.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.25, 9.0, 9.0, 0.5, 9.0]])
    mask = torch.tensor([[1, 1, 0, 0, 1, 0]])
    a, ret = adv.gae(rewards, values, mask, gamma=1.0, lam=0.5)
    torch.testing.assert_close(a, torch.tensor([[0.0, 0.5, 0.0, 0.0, 0.5, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.5, 0.75, 0.0, 0.0, 1.0, 0.0]]))


def test_aggregation_modes():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    num, den = losses.aggregate(loss, mask, "TOKEN_MEAN")
    assert (float(num), float(den)) == (10.0, 4.0)
    num, den = losses.aggregate(loss, mask, "SEQ_MEAN_TOKEN_SUM")
    assert (float(num), float(den)) == (10.0, 2.0)
    num, den = losses.aggregate(loss, mask, "SEQ_MEAN_TOKEN_MEAN")
    assert (float(num), float(den)) == (6.0, 2.0)  # means 2 and 4


@pytest.mark.parametrize("mode", ["TOKEN_MEAN", "SEQ_MEAN_TOKEN_SUM", "SEQ_MEAN_TOKEN_MEAN"])
def test_packed_rows_aggregate_and_gspo_as_one_sequence_per_row(mode):
    """Three sequences (lengths 3, 1, 2) one per row, and packed two rows ([3], [1, 2]):
    every aggregation and GSPO's sequence ratio (value and gradient) agree."""
    g = torch.Generator().manual_seed(0)
    lengths = [3, 1, 2]
    logp = [torch.randn(n, generator=g) for n in lengths]
    old = [x + 0.1 * torch.randn(len(x), generator=g) for x in logp]
    adv = [torch.full((n,), float(a)) for n, a in zip(lengths, (1.0, -2.0, 0.5), strict=True)]
    mask = [torch.tensor(m) for m in ([0, 1, 1], [1], [0, 1])]

    def rows(parts, layout):  # [rows, 3] from per-sequence pieces
        out = torch.zeros(len(layout), 3, dtype=parts[0].dtype)
        for r, seqs in enumerate(layout):
            out[r, : sum(lengths[i] for i in seqs)] = torch.cat([parts[i] for i in seqs])
        return out

    results = []
    for layout, segments in (
        ([[0], [1], [2]], None),
        ([[0], [1, 2]], torch.tensor([[0, 0, 0], [1, 2, 2]])),
    ):
        lp = rows(logp, layout).requires_grad_()
        args = (rows(old, layout), rows(adv, layout), rows(mask, layout))
        loss, _ = losses.gspo(lp, *args, clip_low=0.05, clip_high=0.05, segments=segments)
        num, den = losses.aggregate(loss, args[2], mode, segments)
        num.backward()
        real = rows([torch.ones(n, dtype=torch.bool) for n in lengths], layout)
        results.append((num.detach(), den, loss.detach()[real], lp.grad[real]))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)


def test_ppo_clip_asymmetric_and_dual():
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.5, 0.5, 1.1, 3.0]))
    a = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, clipped = losses.ppo_clip(logp, old, a, clip_low=0.2, clip_high=0.28)
    # ratio 1.5, A>0: min(1.5, 1.28) -> -1.28; ratio .5, A>0: min(.5, .8) -> -.5
    # ratio 1.1, A<0: max(1.1, 1.1)*-1 -> 1.1; ratio 3, A<0: -(-1*3) = 3
    torch.testing.assert_close(loss, torch.tensor([-1.28, -0.5, 1.1, 3.0]))
    assert clipped.tolist() == [True, False, False, False]
    dual, _ = losses.ppo_clip(logp, old, a, 0.2, 0.28, dual_clip=2.0)
    torch.testing.assert_close(dual, torch.tensor([-1.28, -0.5, 1.1, 2.0]))  # capped at 2|A|


def test_gspo_uses_the_sequence_ratio():
    old = torch.zeros(1, 3)
    logp = torch.tensor([[0.3, -0.1, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0]])
    a = torch.tensor([[2.0, 2.0, 2.0]])
    loss, _ = losses.gspo(logp, old, a, mask, clip_low=1.0, clip_high=1.0)
    s = math.exp((0.3 - 0.1) / 2)  # geometric mean ratio over the 2 real tokens
    torch.testing.assert_close(loss.detach(), torch.full((1, 3), -2 * s))
    num, _ = losses.aggregate(loss, mask, "SEQ_MEAN_TOKEN_MEAN")
    num.backward()
    # d/dlogp_t of -A*s*exp(logp_t - sg) averaged over 2 tokens: -A*s/2 on real tokens
    torch.testing.assert_close(logp.grad, torch.tensor([[-s, -s, 0.0]]))


@pytest.mark.parametrize(
    ("kind", "want"),
    [("K1", math.log(2)), ("K2", 0.5 * math.log(2) ** 2), ("K3", 0.5 - 1 + math.log(2))],
)
def test_kl_estimators(kind, want):
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    torch.testing.assert_close(losses.kl_penalty(logp, ref, kind), torch.tensor([want]))


def test_value_loss_clipping():
    v, old, ret = torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([3.0])
    # unclipped (2-3)^2 = 1; clipped V = 1 + .5 = 1.5 -> (1.5-3)^2 = 2.25; max -> 2.25 / 2
    torch.testing.assert_close(losses.value_loss(v, old, ret, clip=0.5), torch.tensor([1.125]))
    torch.testing.assert_close(losses.value_loss(v, old, ret, clip=None), torch.tensor([0.5]))


def test_dynamic_sampling_keeps_informative_groups():
    from distflow_mc.algos.dapo import informative_groups

    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5])
    groups = torch.tensor([4, 4, 9, 9, 2, 2])
    assert informative_groups(rewards, groups).tolist() == [False, False, True, True, False, False]


def test_overlong_penalty():
    from distflow_mc.algos.dapo import overlong_penalty

    got = overlong_penalty(torch.tensor([10, 16, 18, 20]), max_len=20, buffer=4, factor=1.0)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, -0.5, -1.0]))


# Two sequences of 3 response tokens (the second row's last slot is padding); the
# proximal-over-behaviour ratios are e^0.1, e^1.0, e^-1.0 and e^-0.2, e^0.3.
PROX = torch.tensor([[0.1, 1.0, -1.0], [-0.2, 0.3, 5.0]])
BEHAV = torch.zeros(2, 3)
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def test_truncated_importance_weights():
    c = correction.behaviour_weights(PROX, BEHAV, MASK, tis_cap=2.0)
    e = math.exp
    want = [[e(0.1), 2.0, e(-1.0)], [e(-0.2), e(0.3), 0.0]]  # e^1 = 2.72 is capped
    torch.testing.assert_close(c.weight, torch.tensor(want))
    assert c.truncated.tolist() == [[False, True, False], [False, False, False]]
    torch.testing.assert_close(c.mask, MASK)  # nothing left out
    assert c.ratio[0, 1].item() == pytest.approx(e(1.0)) and c.ratio[1, 2] == 0


def test_masked_importance_sampling_per_token_and_per_sequence():
    token = correction.behaviour_weights(PROX, BEHAV, MASK, mis_low=0.5, mis_high=2.0)
    # e^1.0 = 2.72 > 2 and e^-1.0 = 0.37 < 0.5 leave; the padding stays out, unmasked
    assert token.masked.tolist() == [[False, True, True], [False, False, False]]
    assert token.mask.tolist() == [[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]]
    torch.testing.assert_close(token.weight[1, :2], torch.exp(PROX[1, :2]))
    assert token.weight[0, 1:].tolist() == [0.0, 0.0]
    # per sequence: row 0's product e^0.1 is inside, row 1's e^0.1 too; a range that
    # excludes e^0.1 leaves both whole sequences out
    seq = correction.behaviour_weights(PROX, BEHAV, MASK, 0.5, 0.5, 2.0, sequence=True)
    assert seq.mask.tolist() == MASK.tolist() and not seq.masked.any()
    out = correction.behaviour_weights(PROX, BEHAV, MASK, mis_low=1.2, mis_high=2.0, sequence=True)
    assert not out.mask.any() and out.masked.sum() == 5 and not out.weight.any()


def test_sequence_masking_of_packed_rows_equals_one_sequence_per_row():
    """Both sequences packed in one row (segments 0 and 1) are judged alike."""
    packed = [torch.cat([PROX[0], PROX[1, :2]])[None], torch.zeros(1, 5), torch.ones(1, 5)]
    segments = torch.tensor([[0, 0, 0, 1, 1]])
    for low, high in ((0.5, 2.0), (1.2, 2.0), (0.5, 1.2)):
        rows = correction.behaviour_weights(PROX, BEHAV, MASK, 2.0, low, high, sequence=True)
        one = correction.behaviour_weights(*packed, 2.0, low, high, True, segments)
        torch.testing.assert_close(one.weight[0], rows.weight[MASK.bool()])
        torch.testing.assert_close(one.mask[0], rows.mask[MASK.bool()])


def test_decoupled_loss_gradient_is_the_weighted_ppo_gradient():
    """The weights carry no gradient: d/d logp of w * ppo_clip is w times PPO's own."""
    logp = torch.tensor([[0.15, 0.9, -1.0]], requires_grad=True)
    adv = torch.tensor([[1.0, -1.0, 0.5]])
    c = correction.behaviour_weights(PROX[:1], BEHAV[:1], MASK[:1], tis_cap=2.0)
    (c.weight * losses.ppo_clip(logp, PROX[:1], adv)[0]).sum().backward()
    plain = logp.detach().clone().requires_grad_(True)
    losses.ppo_clip(plain, PROX[:1], adv)[0].sum().backward()
    torch.testing.assert_close(logp.grad, c.weight * plain.grad)
    assert not c.weight.requires_grad
