"""The tpo_* keys and the DPO options TPO refuses, validated while LLaMA-Factory parses arguments."""

import pytest
from transformers import HfArgumentParser

from tpo_plugin.hparams.tpo_args import TPOFinetuningArguments, tpo_defaults


def parse(**overrides) -> TPOFinetuningArguments:
    (finetuning_args,) = HfArgumentParser([TPOFinetuningArguments]).parse_dict({"stage": "tpo", **overrides})
    return finetuning_args


def test_defaults_follow_the_method():
    args = parse()
    assert tpo_defaults() == {
        "tpo_noise_step": 500,
        "tpo_corruption": "diffusion",
        "tpo_reward_offset": 0.5,
        "tpo_reward_on": "both",
        "tpo_score": "logit",
        "tpo_detach_reward": False,
        "tpo_weighting": "log_additive",
        "tpo_weight_clip": 0.0,
        "tpo_conditional_weight": 0.0,
        "tpo_anchor_weight": 0.0,
        "tpo_noise_per": "step",
        "tpo_precompute_ref": False,
        "tpo_allow_changed_settings": False,
        "tpo_log_tokens": 0,
    }
    assert args.use_ref_model and args.pref_loss == "sigmoid" and args.pref_beta == 0.1


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("tpo_noise_step", 1000, "`tpo_noise_step` must be an integer in 0..999, got 1000"),
        ("tpo_noise_step", -1, "`tpo_noise_step` must be an integer in 0..999, got -1"),
        ("tpo_noise_step", 2.5, "`tpo_noise_step` must be an integer in 0..999, got 2.5"),
        ("tpo_noise_step", True, "`tpo_noise_step` must be an integer in 0..999, got True"),
        ("tpo_corruption", "gaussian", "`tpo_corruption` must be one of diffusion, blank; got 'gaussian'"),
        ("tpo_reward_on", "all", "`tpo_reward_on` must be one of both, chosen, rejected, none; got 'all'"),
        ("tpo_score", "prob", "`tpo_score` must be one of logit, logprob; got 'prob'"),
        ("tpo_reward_offset", -0.1, "`tpo_reward_offset` must be a number >= 0, got -0.1"),
        ("tpo_reward_offset", float("nan"), "`tpo_reward_offset` must be a number >= 0, got nan"),
        ("tpo_detach_reward", "maybe", "`tpo_detach_reward` must be true or false, got 'maybe'"),
        ("tpo_weighting", "additive", "`tpo_weighting` must be one of log_additive, multiplicative; got 'additive'"),
        ("tpo_weight_clip", -0.1, "`tpo_weight_clip` must be a number >= 0 (0: off), got -0.1"),
        ("tpo_weight_clip", "small", "`tpo_weight_clip` must be a number >= 0 (0: off), got 'small'"),
        ("tpo_noise_per", "epoch", "`tpo_noise_per` must be one of step, sample; got 'epoch'"),
        ("tpo_precompute_ref", "yes", "`tpo_precompute_ref` must be true or false, got 'yes'"),
        ("tpo_precompute_ref", True, "`tpo_precompute_ref: true` needs `tpo_noise_per: sample`"),
        ("tpo_allow_changed_settings", 1, "`tpo_allow_changed_settings` must be true or false, got 1"),
        ("tpo_log_tokens", -1, "`tpo_log_tokens` must be an integer >= 0 (0: off), got -1"),
        ("tpo_log_tokens", 1.5, "`tpo_log_tokens` must be an integer >= 0 (0: off), got 1.5"),
        ("tpo_reward_offset", float("inf"), "`tpo_reward_offset` must be a finite number >= 0, got inf"),
        ("tpo_weight_clip", float("inf"), "`tpo_weight_clip` must be a finite number >= 0 (0: off), got inf"),
        ("pref_beta", -0.5, "`pref_beta` must be a number > 0, got -0.5"),
        ("pref_beta", 0.0, "`pref_beta` must be a number > 0, got 0.0"),
        ("pref_beta", float("nan"), "`pref_beta` must be a number > 0, got nan"),
        ("pref_beta", float("inf"), "`pref_beta` must be a finite number > 0, got inf"),
        ("pref_ftx", -1.0, "`pref_ftx` must be a number >= 0 (0: off), got -1.0"),
        ("pref_ftx", float("inf"), "`pref_ftx` must be a finite number >= 0 (0: off), got inf"),
        ("dpo_label_smoothing", 0.9, "`dpo_label_smoothing` must be a number in [0, 0.5) (0: off), got 0.9"),
        ("dpo_label_smoothing", 0.5, "`dpo_label_smoothing` must be a number in [0, 0.5) (0: off), got 0.5"),
        ("dpo_label_smoothing", -0.5, "`dpo_label_smoothing` must be a number in [0, 0.5) (0: off), got -0.5"),
    ],
)
def test_invalid_values_name_key_value_and_allowed(key, value, message):
    with pytest.raises(ValueError) as error:
        parse(**{key: value})
    assert message in str(error.value)


def test_weight_clip_is_refused_where_there_is_no_weight_term_to_bound():
    assert parse(tpo_weight_clip=0.1).tpo_weight_clip == 0.1  # log_additive, the default
    assert parse(tpo_weighting="multiplicative").tpo_weight_clip == 0.0
    with pytest.raises(ValueError) as error:
        parse(tpo_weighting="multiplicative", tpo_weight_clip=0.1)
    assert "`tpo_weight_clip: 0.1` has no effect with `tpo_weighting: multiplicative`" in str(error.value)
    assert "`tpo_weight_clip: 0`" in str(error.value)


@pytest.mark.parametrize("loss", ["kto_pair", "orpo", "simpo"])
def test_unsupported_pref_loss_is_refused(loss):
    with pytest.raises(ValueError, match=f"`pref_loss: {loss}` is not supported by stage tpo; use one of sigmoid"):
        parse(pref_loss=loss)


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"pref_bco_weight": 0.5}, "pref_bco_weight"),
        ({"ld_alpha": 0.5}, "ld_alpha"),
        ({"pissa_init": True}, "pissa_init"),
    ],
)
def test_unsupported_dpo_options_are_refused(overrides, key):
    with pytest.raises(ValueError, match=f"`{key}: .*` is not supported by stage tpo"):
        parse(**overrides)


def test_label_smoothing_only_with_sigmoid():
    assert parse(dpo_label_smoothing=0.1).dpo_label_smoothing == 0.1
    with pytest.raises(ValueError, match="`dpo_label_smoothing` is only valid with `pref_loss: sigmoid`"):
        parse(pref_loss="hinge", dpo_label_smoothing=0.1)


@pytest.mark.parametrize("loss", ["sigmoid", "hinge", "ipo"])
def test_supported_losses_parse(loss):
    assert parse(pref_loss=loss).pref_loss == loss


def test_tpo_keys_with_another_stage_are_refused():
    with pytest.raises(ValueError, match="`tpo_noise_step: 250` is only used by `stage: tpo`, but stage is 'dpo'"):
        parse(stage="dpo", tpo_noise_step=250)
    assert parse(stage="dpo").use_ref_model  # defaults are harmless; dpo keeps LLaMA-Factory's own logic


def test_argv_form_checks_choices():
    parser = HfArgumentParser([TPOFinetuningArguments])
    (args,) = parser.parse_args_into_dataclasses(
        ["--stage", "tpo", "--tpo_noise_step", "250", "--tpo_score", "logprob"]
    )
    assert (args.stage, args.tpo_noise_step, args.tpo_score) == ("tpo", 250, "logprob")
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--stage", "tpo", "--tpo_corruption", "gaussian"])
