"""The TPO objective against hand computations (docs/method.md §2–§4).

Expected values are written out with ``math`` on plain floats, token by token, independently of the
tensor code under test.
"""

import math

import pytest
import torch

from tpo_plugin.method.objective import (
    IGNORE_INDEX,
    TokenScores,
    clip_log_weight_change,
    first_scored_position,
    log_normalizer_gap,
    log_token_weight,
    preference_losses,
    target_token_scores,
    tpo_batch_loss,
    weight_term_share,
)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_first_scored_position_is_one_before_the_earliest_response_label():
    ignore = IGNORE_INDEX
    labels = torch.tensor([[ignore, ignore, ignore, 5, 6], [ignore, ignore, 7, 8, ignore]])
    assert first_scored_position(labels) == 1  # position 1 predicts row 1's first answer token (index 2)
    assert first_scored_position(torch.tensor([[4, 5, ignore]])) == 0
    assert first_scored_position(torch.full((2, 3), ignore)) == 0


def test_target_token_scores_shift_gather_and_mask():
    # one sequence of 4 tokens; token 0 is the prompt (ignored), tokens 1..3 are the response, token 3 is padding
    logits = torch.tensor([[[1.0, 2.0, 0.0], [0.5, -1.0, 3.0], [2.0, 2.0, 2.0], [9.0, 9.0, 9.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 1, 2, IGNORE_INDEX]])
    scores = target_token_scores(logits, labels)

    assert scores.mask.tolist() == [[True, True, False]]
    # position 0 predicts label 1, position 1 predicts label 2
    expected_logit = [2.0, 3.0]
    expected_logp = [
        2.0 - math.log(math.exp(1.0) + math.exp(2.0) + math.exp(0.0)),
        3.0 - math.log(math.exp(0.5) + math.exp(-1.0) + math.exp(3.0)),
    ]
    assert scores.logit[0, :2].tolist() == pytest.approx(expected_logit)
    assert scores.logp[0, :2].tolist() == pytest.approx(expected_logp, rel=1e-6)
    assert scores.logit[0, 2].item() == 0.0 and scores.logp[0, 2].item() == 0.0


@pytest.mark.parametrize("offset", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("score", [-3.0, 0.0, 0.7, 4.0])
def test_token_weight_by_side(score, offset):
    chosen = log_token_weight(torch.tensor(score), rejected=False, offset=offset).exp().item()
    rejected = log_token_weight(torch.tensor(score), rejected=True, offset=offset).exp().item()
    assert chosen == pytest.approx(offset + sigmoid(score), rel=1e-6)
    assert rejected == pytest.approx(offset + 1.0 - sigmoid(score), rel=1e-6)


def test_zero_score_gives_weight_one_with_default_offset():
    assert log_token_weight(torch.tensor(0.0), rejected=False, offset=0.5).item() == pytest.approx(0.0, abs=1e-7)
    assert log_token_weight(torch.tensor(0.0), rejected=True, offset=0.5).item() == pytest.approx(0.0, abs=1e-7)


def test_zero_offset_log_weight_stays_finite():
    value = log_token_weight(torch.tensor(-200.0), rejected=False, offset=0.0).item()
    assert math.isfinite(value) and value == pytest.approx(-200.0, rel=1e-6)


def test_preference_losses_against_formulas():
    chosen, rejected, beta = torch.tensor([1.2, -0.4]), torch.tensor([0.2, 0.6]), 0.5
    margins = [beta * (1.2 - 0.2), beta * (-0.4 - 0.6)]
    sigmoid_loss = preference_losses(chosen, rejected, "sigmoid", beta).tolist()
    assert sigmoid_loss == pytest.approx([-log_sigmoid(m) for m in margins], rel=1e-6)

    smoothed = preference_losses(chosen, rejected, "sigmoid", beta, label_smoothing=0.2).tolist()
    assert smoothed == pytest.approx([-0.8 * log_sigmoid(m) - 0.2 * log_sigmoid(-m) for m in margins], rel=1e-6)

    hinge = preference_losses(chosen, rejected, "hinge", beta).tolist()
    assert hinge == pytest.approx([max(0.0, 1 - m) for m in margins], rel=1e-6)

    ipo = preference_losses(chosen, rejected, "ipo", beta).tolist()
    assert ipo == pytest.approx([(m / beta - 1 / (2 * beta)) ** 2 for m in margins], rel=1e-6)

    # each loss really is its own: no silent fallback to sigmoid (LLaMA-Factory 0.9.5's DPO pitfall)
    assert len({round(sigmoid_loss[0], 6), round(hinge[0], 6), round(ipo[0], 6)}) == 3
    with pytest.raises(ValueError, match="sigmoid, hinge or ipo"):
        preference_losses(chosen, rejected, "kto_pair", beta)


# One pair (row 0 chosen, row 1 rejected), three response positions; the rejected answer is two tokens long.
MASK = [[True, True, True], [True, True, False]]
POLICY_CLEAN_LOGIT = [[2.0, 1.0, 0.5], [1.5, -0.5, 0.0]]
POLICY_CORRUPT_LOGIT = [[0.5, 1.2, 0.5], [1.0, 0.5, 0.0]]
POLICY_CLEAN_LOGP = [[-0.2, -1.0, -0.7], [-0.9, -2.0, 0.0]]
POLICY_CORRUPT_LOGP = [[-1.1, -0.8, -0.7], [-1.0, -1.6, 0.0]]
REF_CLEAN_LOGIT = [[1.0, 1.0, 0.3], [1.2, -0.2, 0.0]]
REF_CORRUPT_LOGIT = [[0.8, 0.6, 0.3], [1.2, 0.4, 0.0]]
REF_CLEAN_LOGP = [[-0.5, -1.1, -0.9], [-0.7, -1.5, 0.0]]
REF_CORRUPT_LOGP = [[-0.6, -1.3, -0.9], [-0.8, -1.2, 0.0]]


def token_scores(logit, logp, requires_grad=False) -> TokenScores:
    return TokenScores(
        torch.tensor(logit, requires_grad=requires_grad),
        torch.tensor(logp, requires_grad=requires_grad),
        torch.tensor(MASK),
    )


def hand_sequence(clean_logp, clean, corrupted, row, weighted, offset, average):
    """sum_i [log p_i + log c_i] over the response tokens of one row, computed token by token."""
    total, count = 0.0, 0
    for i, in_response in enumerate(MASK[row]):
        if not in_response:
            continue
        score = clean[row][i] - corrupted[row][i]
        weight = offset + (sigmoid(score) if row == 0 else 1.0 - sigmoid(score))
        total += clean_logp[row][i] + (math.log(weight) if weighted else 0.0)
        count += 1
    return total / count if average else total


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
@pytest.mark.parametrize("score_kind", ["logit", "logprob"])
@pytest.mark.parametrize("reward_on", ["both", "chosen", "rejected"])
@pytest.mark.parametrize("offset", [0.5, 1.0])
def test_tpo_batch_loss_against_hand_computation(loss_type, score_kind, reward_on, offset):
    beta = 0.1
    result = tpo_batch_loss(
        token_scores(POLICY_CLEAN_LOGIT, POLICY_CLEAN_LOGP),
        token_scores(POLICY_CORRUPT_LOGIT, POLICY_CORRUPT_LOGP),
        token_scores(REF_CLEAN_LOGIT, REF_CLEAN_LOGP),
        token_scores(REF_CORRUPT_LOGIT, REF_CORRUPT_LOGP),
        torch.tensor([True, True]),
        loss_type=loss_type,
        beta=beta,
        score_kind=score_kind,
        reward_on=reward_on,
        offset=offset,
    )

    if score_kind == "logit":
        policy_pair, ref_pair = (POLICY_CLEAN_LOGIT, POLICY_CORRUPT_LOGIT), (REF_CLEAN_LOGIT, REF_CORRUPT_LOGIT)
    else:
        policy_pair, ref_pair = (POLICY_CLEAN_LOGP, POLICY_CORRUPT_LOGP), (REF_CLEAN_LOGP, REF_CORRUPT_LOGP)
    average = loss_type == "ipo"
    logratio = []
    for row in (0, 1):
        weighted = reward_on == "both" or (reward_on == "chosen") == (row == 0)
        policy = hand_sequence(POLICY_CLEAN_LOGP, *policy_pair, row, weighted, offset, average)
        ref = hand_sequence(REF_CLEAN_LOGP, *ref_pair, row, weighted, offset, average)
        logratio.append(policy - ref)

    margin = beta * (logratio[0] - logratio[1])
    expected_loss = {
        "sigmoid": -log_sigmoid(margin),
        "hinge": max(0.0, 1 - margin),
        "ipo": (margin / beta - 1 / (2 * beta)) ** 2,
    }[loss_type]
    assert result.losses.item() == pytest.approx(expected_loss, rel=1e-5)
    assert result.chosen_rewards.item() == pytest.approx(beta * logratio[0], rel=1e-5)
    assert result.rejected_rewards.item() == pytest.approx(beta * logratio[1], rel=1e-5)

    clean, corrupted = policy_pair
    expected_scores = [clean[0][0] - corrupted[0][0], clean[1][1] - corrupted[1][1]]
    assert [result.visual_score[0, 0].item(), result.visual_score[1, 1].item()] == pytest.approx(expected_scores)
    chosen_weight = offset + sigmoid(expected_scores[0]) if reward_on != "rejected" else 1.0
    rejected_weight = offset + 1 - sigmoid(expected_scores[1]) if reward_on != "chosen" else 1.0
    assert result.token_weight[0, 0].item() == pytest.approx(chosen_weight, rel=1e-6)
    assert result.token_weight[1, 1].item() == pytest.approx(rejected_weight, rel=1e-6)
    assert result.token_weight[1, 2].item() == 1.0  # padding position


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
@pytest.mark.parametrize("reward_on", ["both", "chosen"])
def test_multiplicative_weighting_against_hand_computation(loss_type, reward_on):
    # sum_i c_i * (log p_theta - log p_ref), c from the policy's own clean/corrupted logits; the reference's
    # corrupted pass is not used (passing None must not matter)
    beta, offset = 0.1, 0.5
    result = tpo_batch_loss(
        token_scores(POLICY_CLEAN_LOGIT, POLICY_CLEAN_LOGP),
        token_scores(POLICY_CORRUPT_LOGIT, POLICY_CORRUPT_LOGP),
        token_scores(REF_CLEAN_LOGIT, REF_CLEAN_LOGP),
        None,
        torch.tensor([True, True]),
        loss_type=loss_type,
        beta=beta,
        reward_on=reward_on,
        weighting="multiplicative",
    )
    logratio = []
    for row in (0, 1):
        weighted = reward_on == "both" or row == 0
        total, count = 0.0, 0
        for i, in_response in enumerate(MASK[row]):
            if not in_response:
                continue
            score = POLICY_CLEAN_LOGIT[row][i] - POLICY_CORRUPT_LOGIT[row][i]
            weight = offset + (sigmoid(score) if row == 0 else 1.0 - sigmoid(score)) if weighted else 1.0
            total += weight * (POLICY_CLEAN_LOGP[row][i] - REF_CLEAN_LOGP[row][i])
            count += 1
        logratio.append(total / count if loss_type == "ipo" else total)

    margin = beta * (logratio[0] - logratio[1])
    expected = -log_sigmoid(margin) if loss_type == "sigmoid" else (margin / beta - 1 / (2 * beta)) ** 2
    assert result.losses.item() == pytest.approx(expected, rel=1e-5)
    assert result.chosen_rewards.item() == pytest.approx(beta * logratio[0], rel=1e-5)


def test_multiplicative_weights_scale_each_tokens_gradient_and_get_none():
    policy_clean = token_scores(POLICY_CLEAN_LOGIT, POLICY_CLEAN_LOGP, requires_grad=True)
    policy_corrupted = token_scores(POLICY_CORRUPT_LOGIT, POLICY_CORRUPT_LOGP, requires_grad=True)
    result = tpo_batch_loss(
        policy_clean,
        policy_corrupted,
        token_scores(REF_CLEAN_LOGIT, REF_CLEAN_LOGP),
        None,
        torch.tensor([True, True]),
        weighting="multiplicative",
    )
    result.losses.sum().backward()

    # d loss / d log p_w,i = -beta * (1 - sigmoid(h)) * c_i: each chosen token's gradient scaled by its weight
    margin = (result.chosen_rewards - result.rejected_rewards).item()
    weights = [0.5 + sigmoid(POLICY_CLEAN_LOGIT[0][i] - POLICY_CORRUPT_LOGIT[0][i]) for i in range(3)]
    expected = [-(1 - sigmoid(margin)) * 0.1 * weight for weight in weights]
    assert policy_clean.logp.grad[0].tolist() == pytest.approx(expected, rel=1e-5)
    assert policy_corrupted.logit.grad is None or policy_corrupted.logit.grad.abs().sum().item() == 0.0
    assert policy_clean.logit.grad is None or policy_clean.logit.grad.abs().sum().item() == 0.0


def test_multiplicative_weighting_starts_at_zero_margin():
    # policy == reference at the first step: every log-ratio is 0, whatever the weights
    scores = token_scores(POLICY_CLEAN_LOGIT, POLICY_CLEAN_LOGP)
    corrupted = token_scores(POLICY_CORRUPT_LOGIT, POLICY_CORRUPT_LOGP)
    result = tpo_batch_loss(scores, corrupted, scores, None, torch.tensor([True, True]), weighting="multiplicative")
    assert result.losses.item() == pytest.approx(math.log(2), rel=1e-6)


def test_unknown_weighting_is_refused():
    scores = token_scores(POLICY_CLEAN_LOGIT, POLICY_CLEAN_LOGP)
    with pytest.raises(ValueError, match="expected log_additive or multiplicative"):
        tpo_batch_loss(scores, scores, scores, scores, torch.tensor([True, True]), weighting="additive")


def test_pairs_without_image_train_as_plain_dpo():
    # two pairs; pair 1 has no image: its rows get weight 1 and score 0, so its loss is plain DPO
    mask = torch.ones(4, 2, dtype=torch.bool)
    policy = TokenScores(
        torch.zeros(4, 2), torch.tensor([[-1.0, -1.0], [-0.5, -0.5], [-2.0, -2.0], [-1.5, -1.0]]), mask
    )
    corrupted = TokenScores(torch.full((4, 2), -3.0), torch.full((4, 2), -3.0), mask)
    ref = TokenScores(torch.zeros(4, 2), torch.full((4, 2), -1.0), mask)
    result = tpo_batch_loss(policy, corrupted, ref, corrupted, torch.tensor([True, False, True, False]), beta=1.0)

    dpo_margin = (-0.5 - 0.5 - (-2.0)) - (-1.5 - 1.0 - (-2.0))
    assert result.losses[1].item() == pytest.approx(-log_sigmoid(dpo_margin), rel=1e-6)
    assert result.token_weight[[1, 3]].eq(1.0).all() and result.visual_score[[1, 3]].eq(0.0).all()
    assert result.token_weight[[0, 2]].ne(1.0).all()


def test_no_image_in_batch_gives_plain_dpo():
    result = tpo_batch_loss(
        token_scores(POLICY_CLEAN_LOGIT, POLICY_CLEAN_LOGP),
        None,
        token_scores(REF_CLEAN_LOGIT, REF_CLEAN_LOGP),
        None,
        torch.tensor([False, False]),
    )
    chosen = sum(POLICY_CLEAN_LOGP[0]) - sum(REF_CLEAN_LOGP[0])
    rejected = sum(POLICY_CLEAN_LOGP[1][:2]) - sum(REF_CLEAN_LOGP[1][:2])
    assert result.losses.item() == pytest.approx(-log_sigmoid(0.1 * (chosen - rejected)), rel=1e-6)


@pytest.mark.parametrize("detach_reward", [False, True])
def test_gradient_through_policy_weights_unless_detached(detach_reward):
    policy_clean = token_scores(POLICY_CLEAN_LOGIT, POLICY_CLEAN_LOGP, requires_grad=True)
    policy_corrupted = token_scores(POLICY_CORRUPT_LOGIT, POLICY_CORRUPT_LOGP, requires_grad=True)
    result = tpo_batch_loss(
        policy_clean,
        policy_corrupted,
        token_scores(REF_CLEAN_LOGIT, REF_CLEAN_LOGP),
        token_scores(REF_CORRUPT_LOGIT, REF_CORRUPT_LOGP),
        torch.tensor([True, True]),
        detach_reward=detach_reward,
    )
    result.losses.sum().backward()

    # log p always gets its gradient: d loss / d log p_w = -beta * (1 - sigmoid(h)) for every chosen token
    margin = (result.chosen_rewards - result.rejected_rewards).item()
    expected_logp_grad = -(1 - sigmoid(margin)) * 0.1
    assert policy_clean.logp.grad[0].tolist() == pytest.approx([expected_logp_grad] * 3, rel=1e-5)

    if detach_reward:
        assert policy_corrupted.logit.grad is None or policy_corrupted.logit.grad.abs().sum().item() == 0.0
        assert policy_clean.logit.grad is None or policy_clean.logit.grad.abs().sum().item() == 0.0
    else:
        # the loss reaches z through log c = log(a + sigmoid(z_clean - z_corrupt)), whose slope is sigmoid'(s) / c
        score = POLICY_CLEAN_LOGIT[0][0] - POLICY_CORRUPT_LOGIT[0][0]
        weight = 0.5 + sigmoid(score)
        expected = expected_logp_grad * (-sigmoid(score) * (1 - sigmoid(score)) / weight)
        assert policy_corrupted.logit.grad[0, 0].item() == pytest.approx(expected, rel=1e-5)
        assert policy_clean.logit.grad[0, 0].item() == pytest.approx(-expected, rel=1e-5)


def test_ftx_adds_mean_chosen_nll():
    kwargs = dict(has_image=torch.tensor([True, True]), beta=0.1)
    scores = [
        token_scores(POLICY_CLEAN_LOGIT, POLICY_CLEAN_LOGP),
        token_scores(POLICY_CORRUPT_LOGIT, POLICY_CORRUPT_LOGP),
        token_scores(REF_CLEAN_LOGIT, REF_CLEAN_LOGP),
        token_scores(REF_CORRUPT_LOGIT, REF_CORRUPT_LOGP),
    ]
    without = tpo_batch_loss(*scores, **kwargs).losses.item()
    with_ftx = tpo_batch_loss(*scores, ftx=0.5, **kwargs).losses.item()
    assert with_ftx - without == pytest.approx(0.5 * -sum(POLICY_CLEAN_LOGP[0]) / 3, rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_token_scores_equal_full_log_softmax_values_and_gradients(dtype, monkeypatch):
    import tpo_plugin.method.objective as objective

    monkeypatch.setattr(objective, "FLOAT32_CHUNK_ELEMENTS", 2 * 11)  # two rows per chunk: exercise chunking
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 6, 11, generator=generator) * 4).to(dtype).requires_grad_()
    labels = torch.randint(0, 11, (3, 6), generator=generator)
    labels[:, :2] = IGNORE_INDEX
    labels[2, 4:] = IGNORE_INDEX
    upstream = torch.randn(2, 3, 5, generator=generator)  # arbitrary weights on logit and logp outputs

    scores = target_token_scores(logits, labels)
    ((scores.logit * upstream[0]).sum() + (scores.logp * upstream[1]).sum()).backward()
    chunked_grad = logits.grad.clone()

    # straightforward: float64 log-softmax over the full vocabulary, then gather and mask
    logits.grad = None
    shifted = logits[:, :-1].double()
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    index = targets.clamp_min(0).unsqueeze(-1)
    expected_logit = shifted.gather(-1, index).squeeze(-1) * mask
    expected_logp = torch.log_softmax(shifted, -1).gather(-1, index).squeeze(-1) * mask
    ((expected_logit * upstream[0]).sum() + (expected_logp * upstream[1]).sum()).backward()

    assert torch.equal(scores.mask, mask)
    torch.testing.assert_close(scores.logit.double(), expected_logit, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores.logp.double(), expected_logp, rtol=1e-5, atol=1e-5)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(chunked_grad.double(), logits.grad.double(), rtol=tolerance, atol=tolerance)


def hand_log_weights(clean, corrupted, row):
    """log c_i of one row's response tokens (row 0 chosen, row 1 rejected; offset 0.5)."""
    weights = []
    for i, in_response in enumerate(MASK[row]):
        if in_response:
            score = clean[row][i] - corrupted[row][i]
            weights.append(math.log(0.5 + (sigmoid(score) if row == 0 else 1.0 - sigmoid(score))))
    return weights


def test_clip_log_weight_change_bounds_the_change_and_its_gradient():
    policy = torch.tensor([0.30, -0.20, 0.02, -0.60], requires_grad=True)
    ref = torch.tensor([0.10, 0.10, 0.00, -0.65])
    clipped = clip_log_weight_change(policy, ref, bound=0.1)
    # changes 0.2, -0.3, 0.02, 0.05: the first two are cut to +-0.1, the others kept
    assert clipped.tolist() == pytest.approx([0.20, 0.00, 0.02, -0.60])
    clipped.sum().backward()
    assert policy.grad.tolist() == [0.0, 0.0, 1.0, 1.0]  # past the bound, no reward for moving further


def test_log_normalizer_gap_is_the_logsumexp_difference_and_a_uniform_shift_moves_only_it():
    clean_logits = torch.tensor([[[1.0, 2.0, 0.0], [0.5, -1.0, 3.0], [9.0, 9.0, 9.0]]])  # the last predicts nothing
    corrupted_logits = torch.tensor([[[0.0, 1.0, 1.0], [2.0, 0.0, 0.0], [9.0, 9.0, 9.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 1, 2]])  # position 0 predicts token 1, position 1 token 2
    clean, corrupted = target_token_scores(clean_logits, labels), target_token_scores(corrupted_logits, labels)
    expected = [math.log(math.exp(1) + math.exp(2) + 1) - math.log(1 + math.e + math.e)]
    expected.append(math.log(math.exp(0.5) + math.exp(-1) + math.exp(3)) - math.log(math.exp(2) + 2))
    assert log_normalizer_gap(clean, corrupted)[0].tolist() == pytest.approx(expected, abs=1e-6)

    shifted = target_token_scores(clean_logits + 1.5, labels)  # every clean logit up by 1.5: no probability moves
    assert (shifted.logit - clean.logit)[0].tolist() == pytest.approx([1.5, 1.5])
    assert (shifted.logp - clean.logp).abs().max().item() < 1e-6
    gap_change = log_normalizer_gap(shifted, corrupted) - log_normalizer_gap(clean, corrupted)
    assert gap_change[0].tolist() == pytest.approx([1.5, 1.5], abs=1e-6)


def test_weight_term_share_against_hand_computation():
    share = weight_term_share(torch.tensor([0.5, -1.5]), torch.tensor([2.0, 1.0]))
    assert share.item() == pytest.approx((0.5 + 1.5) / (0.5 + 1.5 + 2.0 + 1.0))
    assert weight_term_share(torch.zeros(2), torch.zeros(2)).item() == 0.0  # policy still equals the reference


def test_monitor_values_of_the_batch_loss_against_hand_computation():
    result = tpo_batch_loss(
        token_scores(POLICY_CLEAN_LOGIT, POLICY_CLEAN_LOGP),
        token_scores(POLICY_CORRUPT_LOGIT, POLICY_CORRUPT_LOGP),
        token_scores(REF_CLEAN_LOGIT, REF_CLEAN_LOGP),
        token_scores(REF_CORRUPT_LOGIT, REF_CORRUPT_LOGP),
        torch.tensor([True, True]),
    )
    for row in (0, 1):
        for i, in_response in enumerate(MASK[row]):
            policy_score = POLICY_CLEAN_LOGIT[row][i] - POLICY_CORRUPT_LOGIT[row][i]
            ref_score = REF_CLEAN_LOGIT[row][i] - REF_CORRUPT_LOGIT[row][i]
            expected = policy_score - ref_score if in_response else 0.0
            assert result.score_drift[row, i].item() == pytest.approx(expected, abs=1e-6), (row, i)
            policy_gap = (POLICY_CLEAN_LOGIT[row][i] - POLICY_CLEAN_LOGP[row][i]) - (
                POLICY_CORRUPT_LOGIT[row][i] - POLICY_CORRUPT_LOGP[row][i]
            )
            ref_gap = (REF_CLEAN_LOGIT[row][i] - REF_CLEAN_LOGP[row][i]) - (
                REF_CORRUPT_LOGIT[row][i] - REF_CORRUPT_LOGP[row][i]
            )
            expected = policy_gap - ref_gap if in_response else 0.0
            assert result.normalizer_drift[row, i].item() == pytest.approx(expected, abs=1e-6), (row, i)

    # the margin's two parts: chosen minus rejected sum (log c^theta - log c^ref), and the same of log p
    weight_part, logp_part = [], []
    for row in (0, 1):
        policy_weights = hand_log_weights(POLICY_CLEAN_LOGIT, POLICY_CORRUPT_LOGIT, row)
        ref_weights = hand_log_weights(REF_CLEAN_LOGIT, REF_CORRUPT_LOGIT, row)
        weight_part.append(sum(policy_weights) - sum(ref_weights))
        logp_part.append(
            sum(p - r for p, r, m in zip(POLICY_CLEAN_LOGP[row], REF_CLEAN_LOGP[row], MASK[row], strict=True) if m)
        )
    weight_margin, logp_margin = weight_part[0] - weight_part[1], logp_part[0] - logp_part[1]
    expected_share = abs(weight_margin) / (abs(weight_margin) + abs(logp_margin))
    assert result.weight_term_share.item() == pytest.approx(expected_share, rel=1e-5)
    assert 0.0 < expected_share < 1.0


@pytest.mark.parametrize("bound", [0.05, 0.2])
def test_weight_clip_bounds_each_tokens_weight_change_in_the_margin(bound):
    policy_corrupted = token_scores(POLICY_CORRUPT_LOGIT, POLICY_CORRUPT_LOGP, requires_grad=True)
    beta = 0.1
    result = tpo_batch_loss(
        token_scores(POLICY_CLEAN_LOGIT, POLICY_CLEAN_LOGP),
        policy_corrupted,
        token_scores(REF_CLEAN_LOGIT, REF_CLEAN_LOGP),
        token_scores(REF_CORRUPT_LOGIT, REF_CORRUPT_LOGP),
        torch.tensor([True, True]),
        beta=beta,
        weight_clip=bound,
    )
    logratio, free = [], []
    for row in (0, 1):
        policy_weights = hand_log_weights(POLICY_CLEAN_LOGIT, POLICY_CORRUPT_LOGIT, row)
        ref_weights = hand_log_weights(REF_CLEAN_LOGIT, REF_CORRUPT_LOGIT, row)
        changes = [p - r for p, r in zip(policy_weights, ref_weights, strict=True)]
        free.append([abs(change) < bound for change in changes])
        logps = [p - r for p, r, m in zip(POLICY_CLEAN_LOGP[row], REF_CLEAN_LOGP[row], MASK[row], strict=True) if m]
        logratio.append(sum(logps) + sum(max(-bound, min(bound, change)) for change in changes))
    margin = beta * (logratio[0] - logratio[1])
    assert result.losses.item() == pytest.approx(-log_sigmoid(margin), rel=1e-5)
    # only tokens inside the bound pass gradient to the policy's corrupted logits
    result.losses.sum().backward()
    for row in (0, 1):
        grads = policy_corrupted.logit.grad[row, : sum(MASK[row])].tolist()
        assert [grad != 0.0 for grad in grads] == free[row], (row, grads)
    assert any(any(row) for row in free) and not all(all(row) for row in free)  # the case tests both kinds
