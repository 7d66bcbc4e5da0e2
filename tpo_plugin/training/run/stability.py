"""The stability monitor: warn once when TPO's self-calibrated weight term runs away (docs/stability.md).

The log-additive objective's margin holds, besides DPO's log-probability ratios, the weight term
``sum (log c^theta - log c^ref)`` (docs/method.md §6, Eq. 14), and it has a gradient of its own: the policy earns
margin by making its tokens' logits more image-dependent (raising its visual scores ``s``), with nothing to stop it.
The trainer logs ``tpo/score_drift_chosen`` and ``tpo/score_drift_rejected`` (the policy's mean visual score minus the
reference's on the same tokens) and ``tpo/weight_term_share`` (the share of the margins that comes from the weight
term). ``RunawayMonitor`` is handed the metrics of every training batch, with ``logps/chosen``, and warns once, naming
the step, when the run-away that ``benchmarks/hallucination_world_v2/STABILITY.md`` measured shows: the chosen answers
losing the likelihood they had reached (their NLL doubled, and by a nat at least) while the policy's visual scores have
risen.
"""

import json
import os
from typing import Any, Optional

import torch
from llamafactory.extras import logging
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .settings import resumed_checkpoint


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
WATCHED_KEYS = ("logps/chosen", *DRIFT_KEYS)

# Fixed windows (steps 1-5, 6-10, ...) rather than the last 5 steps at every step: on four fresh worlds
# (STABILITY_6.md) the fixed windows warned in time for all three TPO collapses with no false alarm in 24 runs;
# reading every step warned 0 to 5 steps earlier but in time for no more, so by its protocol it was not adopted.
WINDOW = 5
"""Optimizer steps per mean the rule reads: the logging interval of the checks that set and tested it."""

MONITOR_STATE_FILE = "tpo_monitor.json"  # in each checkpoint: what the monitor has seen, for an exact resume


def runaway_message(logs: dict[str, float], step: int, best_chosen_logp: float) -> Optional[str]:
    """The warning for one window's (or one log's) means, or None while the run has not run away.

    ``best_chosen_logp`` is the highest ``logps/chosen`` mean the run has reached so far, this one's included
    (negative: a log-probability).
    """
    if not all(key in logs for key in WATCHED_KEYS):
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
    """Warns once per run, on the main process, when :func:`runaway_message` fires for a window of steps.

    The rule reads means over ``WINDOW`` optimizer steps (steps 1-5, 6-10, ...), taken across gradient
    accumulation and ranks as LLaMA-Factory takes its logged metrics, and the monitor computes them itself from
    every batch the trainer hands to :meth:`record`: the checks that set and tested the rule logged every 5 steps,
    so with ``logging_steps: 5`` it decides as it did there, and ``logging_steps`` no longer delays it (with 10, the
    recipes' value, it read only 10-step means, every 10 steps). Each checkpoint holds what the monitor has seen
    (``MONITOR_STATE_FILE``), so a resumed run decides at the steps and on the means the uninterrupted run would.
    """

    def __init__(self, accelerator: Any):
        self.accelerator = accelerator
        self.warned = False
        self.best_chosen_logp: Optional[float] = None  # the highest window mean so far
        self._batch_values: list[list[float]] = []  # this step's batches, in WATCHED_KEYS order
        self._window: list[list[float]] = []  # the current window's per-step means

    def record(self, metrics: dict[str, float]) -> None:
        """Keep one training batch's metrics for the step's mean; silent where the keys are not logged."""
        if all(key in metrics for key in WATCHED_KEYS):
            self._batch_values.append([metrics[key] for key in WATCHED_KEYS])

    def on_train_begin(self, args, state, control, **kwargs):
        checkpoint = resumed_checkpoint(args) if state.global_step > 0 else None
        saved = os.path.join(checkpoint, MONITOR_STATE_FILE) if checkpoint else None
        if saved and os.path.isfile(saved):
            with open(saved, encoding="utf-8") as file:
                seen = json.load(file)
            self.warned, self.best_chosen_logp, self._window = seen["warned"], seen["best_chosen_logp"], seen["window"]
        else:  # a fresh run, or a checkpoint of an older tpo-plugin: the highest logged value before it
            logged = [
                entry["logps/chosen"] for entry in state.log_history if "loss" in entry and "logps/chosen" in entry
            ]
            self.best_chosen_logp = max(logged, default=None)

    def on_step_end(self, args, state, control, **kwargs):
        batch_values, self._batch_values = self._batch_values, []
        if not batch_values:  # the metrics have no monitor keys (multiplicative weighting): on every rank alike
            return
        # every rank reduces at every step, warned or not, so that no rank waits for another in a reduce
        self._window.append(mean_over_ranks(self.accelerator, torch.tensor(batch_values).mean(dim=0)))
        if state.global_step % WINDOW:
            return
        window, self._window = self._window, []
        if len(window) < WINDOW:  # resumed inside a window from a checkpoint that did not say what it had seen
            return
        means = dict(zip(WATCHED_KEYS, torch.tensor(window).mean(dim=0).tolist(), strict=True))
        if self.best_chosen_logp is None or means["logps/chosen"] > self.best_chosen_logp:
            self.best_chosen_logp = means["logps/chosen"]
        message = None if self.warned else runaway_message(means, state.global_step, self.best_chosen_logp)
        if message is not None:
            self.warned = True
            logger.warning_rank0(message)

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:
            checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            seen = {"warned": self.warned, "best_chosen_logp": self.best_chosen_logp, "window": self._window}
            with open(os.path.join(checkpoint, MONITOR_STATE_FILE), "w", encoding="utf-8") as file:
                json.dump(seen, file)


def mean_over_ranks(accelerator: Any, values: torch.Tensor) -> list[float]:
    """The mean of ``values`` over all ranks (every rank must call this), as LLaMA-Factory's logged metrics."""
    if accelerator.num_processes > 1:
        values = accelerator.reduce(values.to(accelerator.device), "mean")
    return values.tolist()
