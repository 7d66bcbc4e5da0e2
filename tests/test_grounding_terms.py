"""mDPO's conditional image preference and reward anchor in stage tpo (docs/method.md §11), and ``tpo_reward_on:
none``: against hand computations, the keys' checks, and ``stage: dpo`` itself.

Expected values are written out with ``math`` on plain floats, independently of the tensor code under test.
"""

import math

import pytest
import torch
from test_objective import (
    MASK,
    POLICY_CLEAN_LOGIT,
    POLICY_CLEAN_LOGP,
    POLICY_CORRUPT_LOGIT,
    POLICY_CORRUPT_LOGP,
    REF_CLEAN_LOGIT,
    REF_CLEAN_LOGP,
    REF_CORRUPT_LOGIT,
    REF_CORRUPT_LOGP,
    hand_sequence,
    log_sigmoid,
    token_scores,
)
from transformers import HfArgumentParser

from tpo_plugin.hparams.tpo_args import TPOFinetuningArguments
from tpo_plugin.method.objective import anchor_losses, conditional_preference_losses, tpo_batch_loss

from conftest import run_cli, train_config, train_logs, write_yaml


def test_conditional_preference_and_anchor_against_formulas():
    clean, corrupted = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -1.0])
    assert conditional_preference_losses(clean, corrupted, beta=0.1).tolist() == pytest.approx(
        [-log_sigmoid(0.1 * 1.5), math.log(2.0)], rel=1e-6
    )
    assert anchor_losses(torch.tensor([-3.0, 4.0]), beta=0.1).tolist() == pytest.approx(
        [-log_sigmoid(-0.3), -log_sigmoid(0.4)], rel=1e-6
    )
    assert anchor_losses(torch.tensor([1.0]), beta=0.5, delta=0.2).item() == pytest.approx(-log_sigmoid(0.3))


def chosen_sum(rows, row=0) -> float:
    return sum(value for value, in_response in zip(rows[row], MASK[row], strict=True) if in_response)


@pytest.mark.parametrize("reward_on", ["both", "none"])
def test_batch_loss_adds_both_terms_to_the_tpo_or_dpo_margin(reward_on):
    beta, conditional_weight, anchor_weight = 0.1, 0.7, 0.3
    result = tpo_batch_loss(
        token_scores(POLICY_CLEAN_LOGIT, POLICY_CLEAN_LOGP),
        token_scores(POLICY_CORRUPT_LOGIT, POLICY_CORRUPT_LOGP),
        token_scores(REF_CLEAN_LOGIT, REF_CLEAN_LOGP),
        token_scores(REF_CORRUPT_LOGIT, REF_CORRUPT_LOGP),
        torch.tensor([True, True]),
        beta=beta,
        reward_on=reward_on,
        conditional_weight=conditional_weight,
        anchor_weight=anchor_weight,
    )
    weighted = reward_on == "both"
    logratio = [
        hand_sequence(POLICY_CLEAN_LOGP, POLICY_CLEAN_LOGIT, POLICY_CORRUPT_LOGIT, row, weighted, 0.5, False)
        - hand_sequence(REF_CLEAN_LOGP, REF_CLEAN_LOGIT, REF_CORRUPT_LOGIT, row, weighted, 0.5, False)
        for row in (0, 1)
    ]
    clean = chosen_sum(POLICY_CLEAN_LOGP) - chosen_sum(REF_CLEAN_LOGP)  # plain: no token weights
    corrupted = chosen_sum(POLICY_CORRUPT_LOGP) - chosen_sum(REF_CORRUPT_LOGP)
    expected = (
        -log_sigmoid(beta * (logratio[0] - logratio[1]))
        + conditional_weight * -log_sigmoid(beta * (clean - corrupted))
        + anchor_weight * -log_sigmoid(beta * clean)
    )
    assert result.losses.item() == pytest.approx(expected, rel=1e-5)
    assert result.conditional_margin.item() == pytest.approx(beta * (clean - corrupted), rel=1e-5)
    assert result.anchor_reward.item() == pytest.approx(beta * clean, rel=1e-5)
    if reward_on == "none":  # every weight 1: the margin is DPO's
        assert result.token_weight.eq(1.0).all()
        assert logratio[0] == pytest.approx(clean)


def test_terms_are_off_by_default_and_the_conditional_term_skips_pairs_without_image():
    scores = [
        token_scores(POLICY_CLEAN_LOGIT, POLICY_CLEAN_LOGP),
        token_scores(POLICY_CORRUPT_LOGIT, POLICY_CORRUPT_LOGP),
        token_scores(REF_CLEAN_LOGIT, REF_CLEAN_LOGP),
        token_scores(REF_CORRUPT_LOGIT, REF_CORRUPT_LOGP),
    ]
    default = tpo_batch_loss(*scores, torch.tensor([True, True]))
    assert default.conditional_margin is None and default.anchor_reward is None
    without_image = tpo_batch_loss(*scores, torch.tensor([False, False]), conditional_weight=5.0)
    assert without_image.losses.item() == pytest.approx(
        tpo_batch_loss(*scores, torch.tensor([False, False])).losses.item(), rel=1e-6
    )


def test_the_conditional_term_trains_the_policy_through_its_corrupted_pass():
    policy_corrupted = token_scores(POLICY_CORRUPT_LOGIT, POLICY_CORRUPT_LOGP, requires_grad=True)
    result = tpo_batch_loss(
        token_scores(POLICY_CLEAN_LOGIT, POLICY_CLEAN_LOGP, requires_grad=True),
        policy_corrupted,
        token_scores(REF_CLEAN_LOGIT, REF_CLEAN_LOGP),
        token_scores(REF_CORRUPT_LOGIT, REF_CORRUPT_LOGP),
        torch.tensor([True, True]),
        reward_on="none",
        conditional_weight=1.0,
    )
    result.losses.sum().backward()
    clean = chosen_sum(POLICY_CLEAN_LOGP) - chosen_sum(REF_CLEAN_LOGP)
    corrupted = chosen_sum(POLICY_CORRUPT_LOGP) - chosen_sum(REF_CORRUPT_LOGP)
    # d/d log p_theta(y_w | v_k) of -log sigmoid(beta (clean - corrupted)) = beta * sigmoid(-beta (clean - corrupted))
    expected = 0.1 / (1 + math.exp(0.1 * (clean - corrupted)))
    assert policy_corrupted.logp.grad[0].tolist() == pytest.approx([expected] * 3, rel=1e-5)
    assert policy_corrupted.logp.grad[1].abs().sum().item() == 0.0  # the rejected answer is not in the term


def parse(**overrides) -> TPOFinetuningArguments:
    (finetuning_args,) = HfArgumentParser([TPOFinetuningArguments]).parse_dict({"stage": "tpo", **overrides})
    return finetuning_args


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"tpo_conditional_weight": -0.1}, "`tpo_conditional_weight` must be a number >= 0 (0: off), got -0.1"),
        ({"tpo_anchor_weight": float("nan")}, "`tpo_anchor_weight` must be a number >= 0 (0: off), got nan"),
        (
            {"tpo_anchor_weight": 1.0, "pref_loss": "hinge"},
            "`tpo_anchor_weight: 1` needs `pref_loss: sigmoid` (mDPO's terms are log-sigmoid losses), got "
            "`pref_loss: hinge`",
        ),
        (
            {"tpo_conditional_weight": 0.5, "pref_loss": "ipo"},
            "`tpo_conditional_weight: 0.5` needs `pref_loss: sigmoid`",
        ),
        ({"tpo_reward_on": "neither"}, "`tpo_reward_on` must be one of both, chosen, rejected, none; got 'neither'"),
    ],
)
def test_bad_term_settings_are_refused_by_name(overrides, message):
    with pytest.raises(ValueError) as error:
        parse(**overrides)
    assert message in str(error.value)


COMPARED_WITH_DPO = (
    "loss",
    "grad_norm",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
)


@pytest.mark.e2e
def test_reward_on_none_without_terms_trains_exactly_like_stage_dpo(model_dirs, dataset_dir, tmp_path):
    runs = {}
    for stage, overrides in (("dpo", {}), ("tpo", {"tpo_reward_on": "none"})):
        config = train_config(
            model_dirs["qwen2_vl"], "qwen2_vl", dataset_dir, tmp_path / stage, max_steps=3, stage=stage, **overrides
        )
        run_cli(["train", str(write_yaml(tmp_path / f"{stage}.yaml", config))], cwd=tmp_path)
        runs[stage] = train_logs(tmp_path / stage)
    assert len(runs["dpo"]) == len(runs["tpo"]) == 3
    for dpo, tpo in zip(runs["dpo"], runs["tpo"], strict=True):
        for key in COMPARED_WITH_DPO:
            assert tpo[key] == pytest.approx(dpo[key], rel=1e-4, abs=1e-6), (dpo["step"], key)
        assert tpo["tpo/weight_chosen"] == tpo["tpo/weight_rejected"] == 1.0
    assert runs["dpo"][-1]["rewards/margins"] != 0.0  # the runs trained, so the comparison has teeth


@pytest.mark.e2e
def test_terms_at_the_first_step_and_with_precomputed_reference_scores(model_dirs, dataset_dir, tmp_path):
    from llamafactory.train.tuner import run_exp

    # At the first step the LoRA policy equals its reference: every log-ratio is 0, so each of the three losses
    # (TPO's margin, the conditional preference, the anchor) is log 2.
    conditional_weight, anchor_weight = 0.5, 0.25
    runs = {}
    for precompute in (False, True):
        output_dir = tmp_path / f"precompute-{precompute}"
        config = train_config(
            model_dirs["qwen2_vl"],
            "qwen2_vl",
            dataset_dir,
            output_dir,
            max_steps=3,
            tpo_reward_on="none",  # mDPO with diffusion corruption
            tpo_conditional_weight=conditional_weight,
            tpo_anchor_weight=anchor_weight,
            tpo_noise_per="sample",
            tpo_precompute_ref=precompute,
        )
        run_exp(args=config)
        runs[precompute] = train_logs(output_dir)

    first = runs[False][0]
    assert first["loss"] == pytest.approx(math.log(2.0) * (1 + conditional_weight + anchor_weight), rel=1e-5)
    assert first["tpo/conditional_margin"] == pytest.approx(0.0, abs=1e-6)
    assert first["tpo/anchor_reward"] == pytest.approx(0.0, abs=1e-6)
    assert runs[False][-1]["tpo/conditional_margin"] != 0.0  # the term moved the policy
    for live, precomputed in zip(runs[False], runs[True], strict=True):
        for key in ("loss", "grad_norm", "rewards/margins", "tpo/conditional_margin", "tpo/anchor_reward"):
            assert precomputed[key] == pytest.approx(live[key], rel=1e-4, abs=1e-6), key
