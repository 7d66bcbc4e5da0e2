"""The stability monitor: warn once when TPO's self-calibrated weight term runs away (README, Stability).

The log-additive objective's margin holds, besides DPO's log-probability ratios, the weight term
``sum (log c^theta - log c^ref)`` (TPO_METHOD §4), and it has a gradient of its own: the policy earns margin by
making its tokens' logits more image-dependent (raising its visual scores ``s``), with nothing to stop it. The
trainer logs, at every step, ``tpo/score_drift_chosen`` and ``tpo/score_drift_rejected`` (the policy's mean
visual score minus the reference's on the same tokens) and ``tpo/weight_term_share`` (the share of the margins
that comes from the weight term). ``RunawayMonitor`` reads them as they are logged and warns once, naming the
step, when they cross the thresholds below, which ``benchmarks/hallucination_world_v2/STABILITY.md`` set.
"""

from typing import Optional

from llamafactory.extras import logging
from transformers import TrainerCallback


logger = logging.get_logger("llamafactory.train.tpo")

# Chosen by STABILITY_PROTOCOL.md's rule on world seed 0 of the v2 worlds (STABILITY.md): no pair of thresholds
# on the grid told the one collapsed run from the others (its drift, 0.7 at the end, was below that of runs that
# did not collapse, up to 4.1 on that seed), so the rule picked the most conservative pair, which warned in none
# of the 30 runs. The metrics themselves are the monitor: read their plots (README, Stability).
SHARE_THRESHOLD = 0.9
"""Warn when more than this share of the margins comes from the weight term..."""

DRIFT_THRESHOLD = 8.0
"""...and the policy's visual scores have risen by more than this (logit units, mean of both answers)."""

ADVICE = (
    "lower `learning_rate`, set `tpo_weight_clip` (e.g. 0.1) to bound the weight term, or `tpo_detach_reward: "
    "true` to train without it"
)


def runaway_message(logs: dict[str, float], step: int) -> Optional[str]:
    """The warning for one logged step, or None while the weight term has not run away."""
    keys = ("tpo/score_drift_chosen", "tpo/score_drift_rejected", "tpo/weight_term_share")
    if not all(key in logs for key in keys):
        return None
    drift = (logs["tpo/score_drift_chosen"] + logs["tpo/score_drift_rejected"]) / 2
    share = logs["tpo/weight_term_share"]
    if share <= SHARE_THRESHOLD or drift <= DRIFT_THRESHOLD:
        return None
    return (
        f"Stage tpo, step {step}: the token-weight term makes up {share:.0%} of the preference margin and the "
        f"policy's visual scores have risen by {drift:.2f} over the reference's. The policy is being rewarded for "
        f"making its tokens image-dependent rather than for preferring the chosen answers; in the project's "
        f"controlled worlds TPO's chosen answers lost likelihood (their NLL doubled) at learning rates where DPO's "
        f"did not. To avoid it: {ADVICE}."
    )


class RunawayMonitor(TrainerCallback):
    """Warns once per run, on the main process, when :func:`runaway_message` fires for a training log."""

    def __init__(self):
        self.warned = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.warned or not logs or "loss" not in logs:
            return
        message = runaway_message(logs, state.global_step)
        if message is not None:
            self.warned = True
            logger.warning_rank0(message)
