"""The stability monitor: warn once when TPO's self-calibrated weight term runs away (README, Stability).

The log-additive objective's margin holds, besides DPO's log-probability ratios, the weight term
``sum (log c^theta - log c^ref)`` (TPO_METHOD §4), and it has a gradient of its own: the policy earns margin by
making its tokens' logits more image-dependent (raising its visual scores ``s``), with nothing to stop it. The
trainer logs, at every step, ``tpo/score_drift_chosen`` and ``tpo/score_drift_rejected`` (the policy's mean
visual score minus the reference's on the same tokens) and ``tpo/weight_term_share`` (the share of the margins
that comes from the weight term). ``RunawayMonitor`` reads them, with ``logps/chosen``, as they are logged and
warns once, naming the step, when the run-away that ``benchmarks/hallucination_world_v2/STABILITY.md`` measured
shows: the chosen answers losing the likelihood they had reached (their NLL doubled, and by a nat at least) while
the policy's visual scores have risen.
"""

from typing import Optional

from llamafactory.extras import logging
from transformers import TrainerCallback


logger = logging.get_logger("llamafactory.train.tpo")

# Set after STABILITY.md's 60 runs, from what they showed rather than by its pre-registered rule (whose
# share-and-drift thresholds, 0.9 and 8, warned in none of them, because the share falls as the run-away
# grows): in every TPO run whose chosen answers' NLL doubled the policy's scores had drifted up (by 0.6 to 6.4 at
# the end), such runs had lost object recall, and TPO's NLL doubled at learning rates where DPO's did not. On
# two world seeds not used to set them (STABILITY_2.md) they did not warn in the two runs that kept their recall,
# but in one of the two collapsed runs only once the model had collapsed: the warning can come late. TPO first
# raises its chosen answers' likelihood, then loses it (TRAJECTORY.md), so the NLL is compared with the lowest it
# reached rather than with its first value: in that diagnosis's five TPO runs this names the same step once and
# 5 to 35 steps earlier in the other four. STABILITY_3.md checks it on worlds that did not set it (in time for the
# one collapse there, but after recall had begun to fall).
NLL_GROWTH = 2.0
"""Warn when the chosen answers' mean log-probability has fallen below this multiple of the highest it reached
(2: their NLL doubled from its lowest)..."""

# Doubling alone is noise when the chosen answers are nearly certain: in STABILITY_4.md four of the five runs that
# warned without losing recall had a highest logps/chosen of -0.06 to -0.12 and warned on a fall of 0.10 to 0.17
# nats. Over the 39 TPO runs of checks 3 and 4 and their exploration, asking for a fall of one nat as well cut
# such warnings from 9 to 3 and still warned in both collapsed runs (one of them a log later, at step 35 instead of
# 30); it warned in 2 fewer of the degraded runs. On four worlds that did not set it (STABILITY_5.md) it was kept:
# 1 false alarm in 24 TPO runs against 2 without it, and the same steps in each of the three collapses.
NLL_FALL = 1.0
"""...and by at least this many nats (1: the chosen answers became at least e times less likely than at their
best)..."""

DRIFT_THRESHOLD = 0.25
"""...while the policy's visual scores are above the reference's by more than this (logit units, mean of both
answers): the fall comes with the weight term at work, not from the DPO part alone."""

ADVICE = (
    "set `pref_ftx` (e.g. 1.0) to keep the chosen answers likely, or lower `learning_rate`; `tpo_detach_reward: "
    "true` trains without the weight term's gradient"
)

DRIFT_KEYS = ("tpo/score_drift_chosen", "tpo/score_drift_rejected")


def runaway_message(logs: dict[str, float], step: int, best_chosen_logp: float) -> Optional[str]:
    """The warning for one logged step, or None while the run has not run away.

    ``best_chosen_logp`` is the highest ``logps/chosen`` the run has logged so far (negative: a log-probability).
    """
    if not all(key in logs for key in (*DRIFT_KEYS, "logps/chosen")):
        return None
    drift = (logs["tpo/score_drift_chosen"] + logs["tpo/score_drift_rejected"]) / 2
    chosen_logp = logs["logps/chosen"]
    fallen = chosen_logp < NLL_GROWTH * best_chosen_logp and best_chosen_logp - chosen_logp >= NLL_FALL
    if not fallen or drift <= DRIFT_THRESHOLD:
        return None
    return (
        f"Stage tpo, step {step}: the chosen answers' mean log-probability fell from {best_chosen_logp:.2f}, the "
        f"highest it reached, to {chosen_logp:.2f} while the policy's visual scores rose by {drift:.2f} over the "
        f"reference's. The policy is being paid for making its tokens image-dependent rather than for keeping its "
        f"chosen answers; in the project's controlled worlds, TPO runs past this point lost object recall. The "
        f"model may have lost it already: evaluate the checkpoints saved before step {step}. To avoid it: {ADVICE}."
    )


class RunawayMonitor(TrainerCallback):
    """Warns once per run, on the main process, when :func:`runaway_message` fires for a training log.

    The highest ``logps/chosen`` is read from the trainer state's log history, which a resumed run restores, so a
    resume compares with the whole run, not only its resumed part.
    """

    def __init__(self):
        self.warned = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.warned or not logs or "loss" not in logs:
            return
        training_logs = (entry for entry in state.log_history if "loss" in entry and "logps/chosen" in entry)
        chosen_logps = [entry["logps/chosen"] for entry in training_logs]
        if not chosen_logps:
            return
        message = runaway_message(logs, state.global_step, max(chosen_logps))
        if message is not None:
            self.warned = True
            logger.warning_rank0(message)
