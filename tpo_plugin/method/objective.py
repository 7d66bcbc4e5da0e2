"""The TPO objective as pure tensor functions (docs/method.md §2–§4).

Shapes: ``B`` sequences (all chosen rows first, then all rejected rows, as LLaMA-Factory's pairwise
collator orders them), ``T`` token positions, ``V`` vocabulary entries.
"""

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F


IGNORE_INDEX = -100  # LLaMA-Factory's label for prompt and padding positions


class TokenScores(NamedTuple):
    """Per-token quantities of the response tokens; zero where ``mask`` is false."""

    logit: torch.Tensor  # (B, T) float32: raw logit z(y_i | x, v, y_<i) of the target token
    logp: torch.Tensor  # (B, T) float32: log p(y_i | x, v, y_<i)
    mask: torch.Tensor  # (B, T) bool: true on response tokens


# Rows of float32 logits held at once while normalising: about 256 MiB for a 150k vocabulary.
FLOAT32_CHUNK_ELEMENTS = 2**26


class _ResponseTokenLogits(torch.autograd.Function):
    """Target logit and log-normaliser ``logsumexp(z)`` at the given rows of a (N, V) logits matrix.

    Only the rows of response tokens are normalised, in float32, a chunk of rows at a time; backward
    recomputes each chunk's softmax from the saved logits. Autograd therefore never holds a float32 copy
    of the full (N, V) logits, which is what ``log_softmax(logits.float())`` would keep for backward.
    """

    @staticmethod
    def forward(ctx, logits, rows, targets, chunk_rows):
        target_logit = logits[rows, targets].float()
        log_normalizer = torch.empty_like(target_logit)
        for start in range(0, rows.numel(), chunk_rows):
            chunk = rows[start : start + chunk_rows]
            log_normalizer[start : start + chunk_rows] = torch.logsumexp(logits[chunk].float(), dim=-1)
        ctx.save_for_backward(logits, rows, targets, log_normalizer)
        ctx.chunk_rows = chunk_rows
        return target_logit, log_normalizer

    @staticmethod
    def backward(ctx, grad_target_logit, grad_log_normalizer):
        logits, rows, targets, log_normalizer = ctx.saved_tensors
        grad_logits = torch.zeros_like(logits)
        for start in range(0, rows.numel(), ctx.chunk_rows):
            end = start + ctx.chunk_rows
            chunk = rows[start:end]
            grad = torch.zeros(chunk.numel(), logits.size(-1), dtype=torch.float32, device=logits.device)
            if grad_log_normalizer is not None:  # d logsumexp(z) / dz = softmax(z)
                grad = torch.exp(logits[chunk].float() - log_normalizer[start:end, None])
                grad *= grad_log_normalizer[start:end, None]
            if grad_target_logit is not None:
                grad[torch.arange(chunk.numel(), device=grad.device), targets[start:end]] += grad_target_logit[
                    start:end
                ]
            grad_logits[chunk] = grad.to(logits.dtype)
        return grad_logits, None, None, None


def target_token_scores(logits: torch.Tensor, labels: torch.Tensor) -> TokenScores:
    r"""Target-token logit and log-probability of each response token (docs/method.md §2 and §4).

    Position t of ``logits`` predicts token t + 1 of ``labels``; the result has T = L - 1 positions.
    ``log p = z_target - logsumexp(z)`` is computed only where ``labels`` marks a response token, in
    float32, without materialising a float32 copy of the (B, L, V) logits.
    """
    batch, length, vocab = logits.shape
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    rows = mask.flatten().nonzero().squeeze(-1)
    chunk_rows = max(1, FLOAT32_CHUNK_ELEMENTS // vocab)
    target_logit, log_normalizer = _ResponseTokenLogits.apply(
        logits.reshape(-1, vocab), rows, targets.flatten()[rows], chunk_rows
    )

    def scatter(values: torch.Tensor) -> torch.Tensor:
        full = torch.zeros(batch * length, dtype=torch.float32, device=logits.device)
        return full.index_put((rows,), values).view(batch, length)[:, :-1]

    return TokenScores(scatter(target_logit), scatter(target_logit - log_normalizer), mask[:, :-1])


def first_scored_position(labels: torch.Tensor) -> int:
    """The first position whose logits score a response token in any row (docs/method.md §4 scores no other).

    Position t predicts label t + 1, so it is one before the earliest response label; 0 if there is none.
    """
    is_response = labels != IGNORE_INDEX
    if not is_response.any():
        return 0
    return max(0, int(is_response.any(dim=0).nonzero()[0]) - 1)


def visual_score(clean: torch.Tensor, corrupted: torch.Tensor) -> torch.Tensor:
    r"""Visual-anchored score ``s_i = z(y_i | x, v) - z(y_i | x, v_k)`` (docs/method.md §2, Eq. 3).

    Works on logits (the reference code's choice) or on log-probabilities alike.
    """
    return clean - corrupted


def log_normalizer_gap(clean: TokenScores, corrupted: TokenScores) -> torch.Tensor:
    r"""``logsumexp z(. | x, v) - logsumexp z(. | x, v_k)`` per token: the part of a logit score the vocabulary shares.

    A logit visual score (§2) is the log-probability score plus this gap, since ``z = log p + logsumexp z``: a
    model that raises every logit on the clean image raises its logit scores without changing any probability.
    """
    return (clean.logit - clean.logp) - (corrupted.logit - corrupted.logp)


def log_token_weight(score: torch.Tensor, rejected: bool, offset: float) -> torch.Tensor:
    r"""``log c_i`` with ``c_i = a + sigmoid(s_i)`` for chosen and ``a + 1 - sigmoid(s_i)`` for rejected tokens (§3).

    ``1 - sigmoid(s) = sigmoid(-s)``; with ``a = 0`` the logarithm is taken as ``logsigmoid`` so that a
    strongly (un)anchored token gives a large negative, not an infinite, log-weight.
    """
    signed_score = -score if rejected else score
    if offset == 0:
        return F.logsigmoid(signed_score)
    return torch.log(offset + torch.sigmoid(signed_score))


def sequence_logps(
    token_logps: torch.Tensor, token_log_weights: torch.Tensor, mask: torch.Tensor, average: bool = False
) -> torch.Tensor:
    r"""``sum_i [log p(y_i) + log c_i]`` over the response tokens of each sequence (docs/method.md Eq. 6).

    ``log(p * c) = log p + log c``: the token weight multiplies the token probability. With
    ``average`` the sum is divided by the number of response tokens (the IPO loss uses means).
    """
    total = ((token_logps + token_log_weights) * mask).sum(dim=-1)
    if average:
        return total / mask.sum(dim=-1).clamp_min(1)
    return total


def weighted_sequence_logps(
    token_logps: torch.Tensor, token_weights: torch.Tensor, mask: torch.Tensor, average: bool = False
) -> torch.Tensor:
    r"""``sum_i c_i * log p(y_i)`` over the response tokens of each sequence (docs/method.md Eq. 9, multiplicative).

    The weight scales the token's log-probability, hence its gradient, as RLHF-V's DDPO weights tokens; the
    caller passes detached weights. With ``average`` the sum is divided by the number of response tokens.
    """
    total = (token_weights * token_logps * mask).sum(dim=-1)
    if average:
        return total / mask.sum(dim=-1).clamp_min(1)
    return total


def preference_losses(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    loss_type: str,
    beta: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    r"""Per-pair loss on the TPO margin ``h = beta * (chosen_logratio - rejected_logratio)`` (docs/method.md §5).

    Each log-ratio is ``sum [log p_theta - log p_ref + log c_theta - log c_ref]`` of one response.

    - ``sigmoid``: ``-(1 - eps) log sigmoid(h) - eps log sigmoid(-h)`` (DPO; cDPO label smoothing eps).
    - ``hinge``: ``max(0, 1 - h)`` (SLiC).
    - ``ipo``: ``(h / beta - 1 / (2 beta))^2`` (IPO; log-ratios of mean token log-probabilities).
    """
    logratio_margin = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        margin = beta * logratio_margin
        return -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    if loss_type == "hinge":
        return torch.relu(1 - beta * logratio_margin)
    if loss_type == "ipo":
        return (logratio_margin - 1 / (2 * beta)) ** 2
    raise ValueError(f"Unknown TPO loss type {loss_type!r}; expected sigmoid, hinge or ipo.")


def conditional_preference_losses(
    clean_logratios: torch.Tensor, corrupted_logratios: torch.Tensor, beta: float
) -> torch.Tensor:
    r"""mDPO's conditional image preference, per pair (docs/method.md Eq. 17):
    ``-log sigmoid(beta * (r(y_w | x, v) - r(y_w | x, v_k)))``.

    ``clean_logratios`` and ``corrupted_logratios`` are the chosen answer's ``log p_theta - log p_ref`` summed over
    its tokens, with the clean image ``v`` and with the corrupted image ``v_k``: the policy is rewarded for making
    the chosen answer depend on the image, relative to the reference, whatever the rejected answer says.
    """
    return -F.logsigmoid(beta * (clean_logratios - corrupted_logratios))


def anchor_losses(chosen_logratios: torch.Tensor, beta: float, delta: float = 0.0) -> torch.Tensor:
    r"""mDPO's reward anchor, per pair (docs/method.md Eq. 18): ``-log sigmoid(beta * r(y_w | x, v) - delta)``.

    It keeps the chosen answer's reward ``beta * (log p_theta - log p_ref)`` above ``delta`` (mDPO: 0), so the
    preference cannot be won by lowering both answers' likelihood.
    """
    return -F.logsigmoid(beta * chosen_logratios - delta)


def clip_log_weight_change(
    policy_log_weight: torch.Tensor, ref_log_weight: torch.Tensor, bound: float
) -> torch.Tensor:
    r"""``log c^ref + clamp(log c^theta - log c^ref, -bound, bound)`` per token (the ``tpo_weight_clip`` guard).

    The weight term of the margin, ``sum (log c^theta - log c^ref)`` (docs/method.md §6), rewards the policy for
    making its tokens more image-dependent, without limit: each token's share of that reward is bounded here
    by ``bound > 0``, and a token past the bound gets no gradient through its weight, so the policy stops being
    paid for inflating its visual scores further.
    """
    return ref_log_weight + (policy_log_weight - ref_log_weight).clamp(-bound, bound)


def weight_term_share(weight_margin: torch.Tensor, logp_margin: torch.Tensor) -> torch.Tensor:
    r"""Share of a batch's margins that comes from the token weights: ``sum |w| / sum (|w| + |p|)``.

    Per pair, the log-ratio margin of docs/method.md Eq. 7 splits into ``w``, the chosen minus rejected
    ``sum (log c^theta - log c^ref)``, and ``p``, the same difference of ``sum (log p^theta - log p^ref)``;
    the share is 0 when the policy still equals the reference (both are 0).
    """
    weight_size, logp_size = weight_margin.abs().sum(), logp_margin.abs().sum()
    total = weight_size + logp_size
    return torch.where(total > 0, weight_size / total.clamp_min(torch.finfo(total.dtype).tiny), 0.0)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the true positions of ``mask`` (0 if there are none)."""
    return (values * mask).sum() / mask.sum().clamp_min(1)


def token_visual_scores_and_log_weights(
    clean: TokenScores,
    corrupted: Optional[TokenScores],
    has_image: torch.Tensor,
    score_kind: str = "logit",
    reward_on: str = "both",
    offset: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Visual scores ``s`` and log token weights ``log c`` of one model's response tokens (docs/method.md §2–§3).

    Rows are chosen then rejected sequences; ``has_image`` (B,) marks rows whose pair has an image (or video).
    Rows without an image, the side that ``reward_on`` leaves out (``none``: both), and non-response positions get
    ``s = 0`` (no image) and ``log c = 0``, i.e. weight 1. ``corrupted`` is ``None`` when the batch has
    no image at all.
    """
    if corrupted is None:
        zeros = torch.zeros_like(clean.logp)
        return zeros, zeros

    if score_kind == "logit":
        score = visual_score(clean.logit, corrupted.logit)
    else:
        score = visual_score(clean.logp, corrupted.logp)

    num_pairs = score.size(0) // 2
    chosen_score, rejected_score = score.split(num_pairs, dim=0)
    log_weight = torch.cat(
        [
            log_token_weight(chosen_score, rejected=False, offset=offset),
            log_token_weight(rejected_score, rejected=True, offset=offset),
        ]
    )
    weighted_rows = has_image.clone() if reward_on != "none" else torch.zeros_like(has_image)
    if reward_on == "chosen":
        weighted_rows[num_pairs:] = False
    elif reward_on == "rejected":
        weighted_rows[:num_pairs] = False

    score = torch.where(has_image.unsqueeze(-1) & clean.mask, score, 0.0)
    log_weight = torch.where(weighted_rows.unsqueeze(-1) & clean.mask, log_weight, 0.0)
    return score, log_weight


class TPOBatchLoss(NamedTuple):
    """Per-pair losses and the detached quantities the trainer logs."""

    losses: torch.Tensor  # (n,) TPO loss of each pair, plus pref_ftx times the chosen answer's SFT loss
    chosen_rewards: torch.Tensor  # (n,) beta * chosen log-ratio, weights included
    rejected_rewards: torch.Tensor  # (n,)
    chosen_logps: torch.Tensor  # (n,) policy log p of the chosen answer, without weights (mean for ipo)
    rejected_logps: torch.Tensor  # (n,)
    visual_score: torch.Tensor  # (2n, T) the policy's s, 0 off the response and on image-less rows
    token_weight: torch.Tensor  # (2n, T) the policy's c, 1 where no weight applies
    score_drift: torch.Tensor  # (2n, T) s^theta - s^ref; 0 where s is, and everywhere without ref_corrupted
    normalizer_drift: torch.Tensor  # (2n, T) the policy's log_normalizer_gap minus the reference's; 0 as score_drift
    weight_term_share: Optional[torch.Tensor]  # () share of the margins from the weights; None if multiplicative
    conditional_margin: Optional[torch.Tensor]  # (n,) beta * (r(y_w|v) - r(y_w|v_k)); None without that term
    anchor_reward: Optional[torch.Tensor]  # (n,) beta * r(y_w|v), plain log-ratio; None without the anchor


def tpo_batch_loss(
    policy_clean: TokenScores,
    policy_corrupted: Optional[TokenScores],
    ref_clean: TokenScores,
    ref_corrupted: Optional[TokenScores],
    has_image: torch.Tensor,
    *,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    ftx: float = 0.0,
    score_kind: str = "logit",
    reward_on: str = "both",
    offset: float = 0.5,
    detach_reward: bool = False,
    weighting: str = "log_additive",
    weight_clip: float = 0.0,
    conditional_weight: float = 0.0,
    anchor_weight: float = 0.0,
) -> TPOBatchLoss:
    r"""The visual-aware DPO objective of a batch of n pairs (docs/method.md §4).

    ``log_additive`` (the paper's): policy and reference each weight their own tokens from their own clean
    and corrupted passes, ``sum [log p + log c]``; with ``detach_reward`` no gradient flows through the
    policy's weights ``c^theta``; ``weight_clip > 0`` bounds each token's ``log c^theta - log c^ref``
    (:func:`clip_log_weight_change`). ``multiplicative``: ``sum c^theta * log p`` for policy and reference
    alike, with ``c^theta`` detached; ``ref_corrupted`` is not used by the loss (only by the score drift).
    ``conditional_weight`` and ``anchor_weight`` add mDPO's conditional image preference and reward anchor
    (:func:`conditional_preference_losses`, :func:`anchor_losses`; docs/method.md §11) on the chosen answers'
    plain log-ratios; the conditional term needs ``policy_corrupted`` and ``ref_corrupted``, and is 0 for pairs
    without an image.
    """
    token_weighting = {"score_kind": score_kind, "reward_on": reward_on, "offset": offset}
    policy_score, policy_log_weight = token_visual_scores_and_log_weights(
        policy_clean, policy_corrupted, has_image, **token_weighting
    )
    ref_score, ref_log_weight = token_visual_scores_and_log_weights(
        ref_clean, ref_corrupted, has_image, **token_weighting
    )
    mask, average = policy_clean.mask, loss_type == "ipo"
    num_pairs = mask.size(0) // 2
    share = None
    if weighting == "log_additive":
        if detach_reward:
            policy_log_weight = policy_log_weight.detach()
        if weight_clip > 0:
            policy_log_weight = clip_log_weight_change(policy_log_weight, ref_log_weight, weight_clip)
        logratios = sequence_logps(policy_clean.logp, policy_log_weight, mask, average) - sequence_logps(
            ref_clean.logp, ref_log_weight, mask, average
        )
        no_weight = torch.zeros_like(mask, dtype=policy_clean.logp.dtype)
        weight_ratio = sequence_logps(no_weight, (policy_log_weight - ref_log_weight).detach(), mask, average)
        logp_ratio = sequence_logps((policy_clean.logp - ref_clean.logp).detach(), no_weight, mask, average)
        share = weight_term_share(*(ratio[:num_pairs] - ratio[num_pairs:] for ratio in (weight_ratio, logp_ratio)))
    elif weighting == "multiplicative":
        policy_log_weight = policy_log_weight.detach()
        token_weight = policy_log_weight.exp()
        logratios = weighted_sequence_logps(policy_clean.logp, token_weight, mask, average) - weighted_sequence_logps(
            ref_clean.logp, token_weight, mask, average
        )
    else:
        raise ValueError(f"Unknown TPO weighting {weighting!r}; expected log_additive or multiplicative.")
    chosen_logratios, rejected_logratios = logratios.split(num_pairs)
    losses = preference_losses(chosen_logratios, rejected_logratios, loss_type, beta, label_smoothing)
    if ftx > 0:  # LLaMA-Factory's pref_ftx: mean token NLL of the chosen answer
        losses = losses - ftx * sequence_logps(
            policy_clean.logp[:num_pairs], torch.zeros_like(policy_clean.logp[:num_pairs]), mask[:num_pairs], True
        )

    no_weight = torch.zeros_like(policy_clean.logp[:num_pairs])
    conditional_margin = anchor_reward = None
    if conditional_weight > 0 or anchor_weight > 0:  # the chosen answers' plain log-ratio, with the clean image
        clean_logratios = sequence_logps(
            policy_clean.logp[:num_pairs] - ref_clean.logp[:num_pairs], no_weight, mask[:num_pairs]
        )
    if anchor_weight > 0:
        losses = losses + anchor_weight * anchor_losses(clean_logratios, beta)
        anchor_reward = beta * clean_logratios.detach()
    if conditional_weight > 0:
        with_image = has_image[:num_pairs]
        corrupted_logratios = clean_logratios  # no corrupted pass: no pair of the batch has an image
        if policy_corrupted is not None and ref_corrupted is not None:
            corrupted_logratios = sequence_logps(
                policy_corrupted.logp[:num_pairs] - ref_corrupted.logp[:num_pairs], no_weight, mask[:num_pairs]
            )
        conditional = conditional_preference_losses(clean_logratios, corrupted_logratios, beta)
        losses = losses + conditional_weight * torch.where(with_image, conditional, 0.0)
        conditional_margin = beta * (clean_logratios - corrupted_logratios).detach()

    if ref_corrupted is None or policy_corrupted is None:
        normalizer_drift = torch.zeros_like(policy_score)
    else:
        gap_drift = log_normalizer_gap(policy_clean, policy_corrupted) - log_normalizer_gap(ref_clean, ref_corrupted)
        normalizer_drift = torch.where(has_image.unsqueeze(-1) & mask, gap_drift.detach(), 0.0)

    plain_logps = sequence_logps(policy_clean.logp.detach(), torch.zeros_like(policy_clean.logp), mask, average)
    chosen_logps, rejected_logps = plain_logps.split(num_pairs)
    return TPOBatchLoss(
        losses=losses,
        chosen_rewards=beta * chosen_logratios.detach(),
        rejected_rewards=beta * rejected_logratios.detach(),
        chosen_logps=chosen_logps,
        rejected_logps=rejected_logps,
        visual_score=policy_score.detach(),
        token_weight=policy_log_weight.detach().exp(),
        score_drift=torch.zeros_like(policy_score) if ref_corrupted is None else (policy_score - ref_score).detach(),
        normalizer_drift=normalizer_drift,
        weight_term_share=share,
        conditional_margin=conditional_margin,
        anchor_reward=anchor_reward,
    )
