"""TPO's YAML keys, and LLaMA-Factory's ``FinetuningArguments`` extended with them and with ``stage: tpo``.

Each key is a dataclass field whose ``help`` says meaning, range and default; docs/configuration.md is
generated from these fields (``python docs/generate_configuration.py``, checked by a test). Values are validated
in ``__post_init__``, that is while LLaMA-Factory parses the arguments and before any model or data is loaded.
"""

import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Literal

from llamafactory.hparams.finetuning_args import FinetuningArguments

from ..method.noise import NUM_NOISE_STEPS


CORRUPTIONS = ("diffusion", "blank")
REWARD_SIDES = ("both", "chosen", "rejected", "none")
WEIGHTINGS = ("log_additive", "multiplicative")
NOISE_SCHEDULES = ("step", "sample")
SCORE_KINDS = ("logit", "logprob")
TPO_PREF_LOSSES = ("sigmoid", "hinge", "ipo")


@dataclass
class TPOArguments:
    r"""Arguments of Token Preference Optimization (see docs/method.md)."""

    tpo_noise_step: int = field(
        default=500,
        metadata={
            "help": "Diffusion step k of the image corruption, an integer in 0-999 (docs/method.md §1). Default 500."
        },
    )
    tpo_corruption: Literal["diffusion", "blank"] = field(
        default="diffusion",
        metadata={
            "help": "How the image is corrupted: `diffusion` noise at step tpo_noise_step, or a `blank` white image "
            "of the same size (docs/method.md §1). Default diffusion."
        },
    )
    tpo_reward_offset: float = field(
        default=0.5,
        metadata={
            "help": "Offset a of the token weight c = a + sigmoid(±s), a float >= 0 (docs/method.md §3). Default 0.5."
        },
    )
    tpo_reward_on: Literal["both", "chosen", "rejected", "none"] = field(
        default="both",
        metadata={
            "help": "Which response gets token weights: `both`, `chosen` or `rejected`; the other side's tokens get "
            "weight 1 (docs/method.md §3). `none`: every token weight 1, so the margin is DPO's (with the "
            "conditional and anchor terms, mDPO's objective). Default both."
        },
    )
    tpo_score: Literal["logit", "logprob"] = field(
        default="logit",
        metadata={
            "help": "What the visual score compares between the clean and the corrupted image: the target token's "
            "raw `logit` (reference code) or its `logprob` (docs/method.md §2, Eq. 3). Default logit."
        },
    )
    tpo_detach_reward: bool = field(
        default=False,
        metadata={
            "help": "Stop gradients through the policy's token weights; the corrupted policy pass then runs without "
            "a graph, which is cheaper (docs/method.md §4). Default false."
        },
    )
    tpo_weighting: Literal["log_additive", "multiplicative"] = field(
        default="log_additive",
        metadata={
            "help": "How the token weights enter each response's score: `log_additive`, sum [log p + log c], the "
            "paper's (the weights act through the margin and through their own gradient), or `multiplicative`, "
            "sum c * log p with the policy's c detached and applied to the reference's log-probabilities too (the "
            "weights scale each token's gradient; the reference's corrupted pass is skipped) (docs/method.md §4). "
            "Default log_additive."
        },
    )
    tpo_weight_clip: float = field(
        default=0.0,
        metadata={
            "help": "Guard against TPO's run-away: bound each token's log c^theta - log c^ref to +-this value, so "
            "the policy is no longer rewarded for inflating its visual scores past it (log_additive only, refused "
            "with multiplicative, whose weights have no gradient to bound); a float >= 0, 0 turns it off "
            "(docs/method.md §4). "
            "Default 0."
        },
    )
    tpo_conditional_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of mDPO's conditional image preference, added to the loss: the chosen answer given the "
            "image is preferred over the same answer given the corrupted image, -log sigmoid(beta * (r(y_w|v) - "
            "r(y_w|v_k))) with r = log p_theta - log p_ref (docs/method.md Eq. 17). A float >= 0, 0 turns it off; "
            "needs `pref_loss: sigmoid`. Default 0."
        },
    )
    tpo_anchor_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of mDPO's reward anchor, added to the loss: -log sigmoid(beta * r(y_w|v)) keeps the "
            "chosen answer's reward positive (docs/method.md Eq. 18). A float >= 0, 0 turns it off; needs "
            "`pref_loss: sigmoid`. Default 0."
        },
    )
    tpo_noise_per: Literal["step", "sample"] = field(
        default="step",
        metadata={
            "help": "When the corruption noise is drawn: fresh each `step` (keyed by seed, step and image), or once "
            "per `sample` (one fixed corrupted copy of each image for the whole run, keyed by seed and image) "
            "(docs/method.md §1). Default step."
        },
    )
    tpo_precompute_ref: bool = field(
        default=False,
        metadata={
            "help": "Compute the reference model's token scores of every training and evaluation pair once, before "
            "training, store them in OUTPUT_DIR (reused on resume, recomputed when anything they depend on changed) "
            "and never run the reference model during training; a separate reference model is freed after the "
            "pass. Needs `tpo_noise_per: sample`. Default false."
        },
    )
    tpo_allow_changed_settings: bool = field(
        default=False,
        metadata={
            "help": "Resume from a checkpoint even though settings that define the objective (tpo_* keys, pref_beta, "
            "pref_loss, pref_ftx, dpo_label_smoothing, ref_model, ref_model_adapters, seed) differ from those it "
            "was trained with; the changes are logged. Otherwise such a resume is refused. Default false."
        },
    )

    tpo_log_tokens: int = field(
        default=0,
        metadata={
            "help": "Number of fixed training pairs (the first N) whose per-token visual scores s and weights c are "
            "appended to OUTPUT_DIR/tpo_tokens.jsonl at every logging step, an integer >= 0; 0 turns it off and "
            "costs nothing. `tpo-plugin inspect --history OUTPUT_DIR` shows how they moved. Default 0."
        },
    )

    def validate_tpo_arguments(self) -> None:
        """Raise ``ValueError`` naming the key, the value and what is allowed."""
        step = self.tpo_noise_step
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < NUM_NOISE_STEPS:
            raise ValueError(f"`tpo_noise_step` must be an integer in 0..{NUM_NOISE_STEPS - 1}, got {step!r}.")

        _check_choice("tpo_corruption", self.tpo_corruption, CORRUPTIONS)
        _check_choice("tpo_reward_on", self.tpo_reward_on, REWARD_SIDES)
        _check_choice("tpo_score", self.tpo_score, SCORE_KINDS)
        _check_choice("tpo_weighting", self.tpo_weighting, WEIGHTINGS)

        self.tpo_reward_offset = checked_number("tpo_reward_offset", self.tpo_reward_offset, ">= 0", lambda v: v >= 0)
        self.tpo_weight_clip = checked_number(
            "tpo_weight_clip", self.tpo_weight_clip, ">= 0 (0: off)", lambda v: v >= 0
        )
        if self.tpo_weight_clip > 0 and self.tpo_weighting != "log_additive":  # a guard that guards nothing
            raise ValueError(
                f"`tpo_weight_clip: {self.tpo_weight_clip:g}` has no effect with `tpo_weighting: "
                f"{self.tpo_weighting}`: its token weights are detached, so there is no weight term to bound. Set "
                f"`tpo_weighting: log_additive`, or `tpo_weight_clip: 0`."
            )

        for key in ("tpo_conditional_weight", "tpo_anchor_weight"):
            setattr(self, key, checked_number(key, getattr(self, key), ">= 0 (0: off)", _at_least_zero))

        if not isinstance(self.tpo_detach_reward, bool):
            raise ValueError(f"`tpo_detach_reward` must be true or false, got {self.tpo_detach_reward!r}.")
        _check_choice("tpo_noise_per", self.tpo_noise_per, NOISE_SCHEDULES)
        if not isinstance(self.tpo_precompute_ref, bool):
            raise ValueError(f"`tpo_precompute_ref` must be true or false, got {self.tpo_precompute_ref!r}.")
        if self.tpo_precompute_ref and self.tpo_noise_per != "sample":
            raise ValueError(
                "`tpo_precompute_ref: true` needs `tpo_noise_per: sample`: stored reference scores hold for one "
                "corrupted copy of each image, but with `tpo_noise_per: step` the reference sees fresh noise at "
                "every step. Set `tpo_noise_per: sample`, or `tpo_precompute_ref: false`."
            )
        if not isinstance(self.tpo_allow_changed_settings, bool):
            raise ValueError(
                f"`tpo_allow_changed_settings` must be true or false, got {self.tpo_allow_changed_settings!r}."
            )

        num_logged = self.tpo_log_tokens
        if isinstance(num_logged, bool) or not isinstance(num_logged, int) or num_logged < 0:
            raise ValueError(f"`tpo_log_tokens` must be an integer >= 0 (0: off), got {num_logged!r}.")


def checked_number(key: str, value: Any, allowed: str, within: Callable[[float], bool]) -> float:
    """``value`` as a float, or a ``ValueError`` naming the key, the value and the allowed range. Infinity and NaN
    are never allowed: either turns every loss of the run into NaN or into a constant."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not within(value):
        raise ValueError(f"`{key}` must be a number {allowed}, got {value!r}.")
    if not math.isfinite(value):
        raise ValueError(f"`{key}` must be a finite number {allowed}, got {value!r}.")
    return float(value)


def _at_least_zero(value: float) -> bool:
    return value >= 0


def _check_choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"`{key}` must be one of {', '.join(allowed)}; got {value!r}.")


def tpo_defaults() -> dict[str, Any]:
    """The default value of every ``tpo_*`` key."""
    return {f.name: f.default for f in fields(TPOArguments)}


@dataclass
class TPOFinetuningArguments(FinetuningArguments, TPOArguments):
    r"""LLaMA-Factory's fine-tuning arguments with ``stage: tpo`` and the ``tpo_*`` keys."""

    stage: Literal["pt", "sft", "rm", "ppo", "dpo", "kto", "tpo"] = field(
        default="sft",
        metadata={"help": "Which stage will be performed in training (`tpo`: Token Preference Optimization)."},
    )

    def __post_init__(self):
        FinetuningArguments.__post_init__(self)
        self.validate_tpo_arguments()
        if self.stage == "tpo":
            self._check_tpo_stage()
        else:
            self._check_tpo_keys_unused()

    def _check_tpo_stage(self) -> None:
        # TPO compares the policy with a reference model, like DPO with a sigmoid/hinge/ipo loss.
        self.use_ref_model = True
        if self.pref_loss not in TPO_PREF_LOSSES:
            raise ValueError(
                f"`pref_loss: {self.pref_loss}` is not supported by stage tpo; "
                f"use one of {', '.join(TPO_PREF_LOSSES)}."
            )

        # LLaMA-Factory checks none of these ranges; outside them the run trains, with excellent-looking metrics,
        # something else: beta < 0 pushes the chosen answers down and the rejected ones up, beta = 0 has no
        # gradient, label smoothing >= 0.5 prefers the rejected answers, a negative pref_ftx unlearns the chosen.
        self.pref_beta = checked_number("pref_beta", self.pref_beta, "> 0", lambda v: v > 0)
        self.pref_ftx = checked_number("pref_ftx", self.pref_ftx, ">= 0 (0: off)", _at_least_zero)
        self.dpo_label_smoothing = checked_number(
            "dpo_label_smoothing", self.dpo_label_smoothing, "in [0, 0.5) (0: off)", lambda v: 0 <= v < 0.5
        )
        if self.pref_loss != "sigmoid" and self.dpo_label_smoothing > 1e-6:
            raise ValueError("`dpo_label_smoothing` is only valid with `pref_loss: sigmoid`.")
        for key in ("tpo_conditional_weight", "tpo_anchor_weight"):
            if getattr(self, key) > 0 and self.pref_loss != "sigmoid":  # mDPO defines both terms as log-sigmoids
                raise ValueError(
                    f"`{key}: {getattr(self, key):g}` needs `pref_loss: sigmoid` (mDPO's terms are log-sigmoid "
                    f"losses), got `pref_loss: {self.pref_loss}`. Set `pref_loss: sigmoid`, or `{key}: 0`."
                )

        unsupported = {
            "pref_bco_weight": self.pref_bco_weight > 1e-6,
            "ld_alpha": self.ld_alpha is not None,
            "pissa_init": self.pissa_init,
        }
        for key, is_set in unsupported.items():
            if is_set:
                raise ValueError(f"`{key}: {getattr(self, key)}` is not supported by stage tpo; remove it.")

    def _check_tpo_keys_unused(self) -> None:
        # A silently ignored tpo_* key would let a user believe they trained TPO: refuse instead.
        for key, default in tpo_defaults().items():
            if getattr(self, key) != default:
                raise ValueError(
                    f"`{key}: {getattr(self, key)}` is only used by `stage: tpo`, but stage is {self.stage!r}; "
                    "remove the tpo_* keys or set `stage: tpo`."
                )
