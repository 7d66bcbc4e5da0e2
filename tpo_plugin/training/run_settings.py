"""What defines a TPO run's objective, recorded with each checkpoint and checked on resume.

A resume (an explicit ``resume_from_checkpoint``, or LLaMA-Factory's automatic one from the last checkpoint
of ``output_dir`` when ``overwrite_output_dir`` is false) continues the run that wrote the checkpoint. Two
things would silently make it something else, and both are refused before the model loads:

- settings that define the objective differ from those the checkpoint was trained with;
- the checkpoint's run has already finished: transformers would train one step past its end and rewrite
  its ``trainer_state.json`` and ``all_results.json``.

Also: transformers' ``train_loss`` of a resumed run sums only the resumed steps but divides by all steps;
:func:`whole_run_train_loss` reports the mean over the whole run instead.
"""

import json
import os
from typing import TYPE_CHECKING, Any, Optional

from llamafactory.extras import logging
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ..hparams.tpo_args import tpo_defaults


if TYPE_CHECKING:
    from transformers import Seq2SeqTrainingArguments, TrainerState

    from ..hparams.tpo_args import TPOFinetuningArguments


logger = logging.get_logger("llamafactory.train.tpo")

SETTINGS_FILE = "tpo_settings.json"
TRAINER_STATE_FILE = "trainer_state.json"
# tpo_* keys that change what is logged or what is allowed, not what is optimised.
NON_OBJECTIVE_TPO_KEYS = ("tpo_allow_changed_settings", "tpo_log_tokens", "tpo_precompute_ref")
# LLaMA-Factory's keys that enter the TPO loss (β, loss type, SFT term, smoothing) or its reference model.
PREFERENCE_KEYS = ("pref_beta", "pref_loss", "pref_ftx", "dpo_label_smoothing", "ref_model", "ref_model_adapters")


def objective_settings(
    finetuning_args: "TPOFinetuningArguments", training_args: "Seq2SeqTrainingArguments"
) -> dict[str, Any]:
    """The settings that define the run's objective, as JSON values.

    ``seed`` is one of them: the corrupted images of every step are drawn from noise keyed by seed, step and
    image, so another seed makes the resumed steps optimise other corrupted images than the run did.
    """
    settings = {key: getattr(finetuning_args, key) for key in tpo_defaults() if key not in NON_OBJECTIVE_TPO_KEYS}
    settings.update({key: getattr(finetuning_args, key) for key in PREFERENCE_KEYS})
    settings["seed"] = training_args.seed
    return json.loads(json.dumps(settings))  # compared with what a checkpoint's JSON file holds


def write_settings(folder: str, settings: dict[str, Any]) -> None:
    with open(os.path.join(folder, SETTINGS_FILE), "w", encoding="utf-8") as file:
        json.dump(settings, file, indent=2, sort_keys=True)


def _read_json(path: str) -> Optional[dict[str, Any]]:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as file:
        return json.load(file)


class RecordSettingsCallback(TrainerCallback):
    """Writes the objective settings into each checkpoint, right after the trainer has saved it."""

    def __init__(self, settings: dict[str, Any]):
        self.settings = settings

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:
            checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            write_settings(checkpoint, self.settings)


def resumed_checkpoint(training_args: "Seq2SeqTrainingArguments") -> Optional[str]:
    """The checkpoint the trainer will resume from (``resume_from_checkpoint: true`` means the last one)."""
    checkpoint = training_args.resume_from_checkpoint
    if checkpoint is True:
        return get_last_checkpoint(training_args.output_dir)
    return checkpoint or None


def check_resume(
    training_args: "Seq2SeqTrainingArguments", finetuning_args: "TPOFinetuningArguments"
) -> Optional[int]:
    """Refuse a resume that would extend a finished run or change its objective; return the resumed step."""
    checkpoint = resumed_checkpoint(training_args) if training_args.do_train else None
    if checkpoint is None:
        return None

    state = _read_json(os.path.join(checkpoint, TRAINER_STATE_FILE))
    if state is None:  # transformers then starts at step 0 (or fails to load it): nothing to compare
        return None

    refuse_finished_run(checkpoint, state, training_args)
    refuse_changed_settings(
        checkpoint,
        objective_settings(finetuning_args, training_args),
        allow_changes=finetuning_args.tpo_allow_changed_settings,
    )
    return state["global_step"]


def refuse_finished_run(checkpoint: str, state: dict[str, Any], training_args: "Seq2SeqTrainingArguments") -> None:
    """A run whose checkpoint has reached the step this run ends at has nothing left to train."""
    step = state["global_step"]
    if training_args.max_steps > 0:
        end = f"`max_steps: {training_args.max_steps}`"
        finished = step >= training_args.max_steps
    else:  # the number of steps per epoch is known only once the data is loaded; the checkpoint knows its own
        end = f"`num_train_epochs: {training_args.num_train_epochs}`"
        finished = step >= state["max_steps"] and training_args.num_train_epochs <= state["num_train_epochs"]
    if not finished:
        return

    raise ValueError(
        f"The run in {os.path.dirname(os.path.abspath(checkpoint))} finished at step {step}, and this run would "
        f"resume from its checkpoint {checkpoint} although it ends there ({end}): nothing is left to train, yet "
        f"transformers would train one step past the end and rewrite that run's trainer_state.json and "
        f"all_results.json. To train a new run, set a new `output_dir`, or `overwrite_output_dir: true` without "
        f"`resume_from_checkpoint`; to continue this run, raise `max_steps` (or `num_train_epochs`) past step {step}."
    )


def refuse_changed_settings(checkpoint: str, current: dict[str, Any], allow_changes: bool) -> None:
    """A changed objective setting is refused, naming key, old and new value, unless the user allows it."""
    recorded = _read_json(os.path.join(checkpoint, SETTINGS_FILE))
    if recorded is None:
        logger.warning_rank0(
            f"{checkpoint} has no {SETTINGS_FILE} (it was written by another stage or an older tpo-plugin), so "
            "whether this run's TPO settings match the ones it was trained with cannot be checked."
        )
        return

    # A tpo_* key newer than the checkpoint was trained at its default, which older versions had built in.
    recorded = {**{key: value for key, value in tpo_defaults().items() if key in current}, **recorded}
    # Only keys both know: a key a later plugin version adds is not a change made by the user.
    changes = [
        f"`{key}` was {json.dumps(recorded[key])}, is now {json.dumps(current[key])}"
        for key in sorted(recorded.keys() & current.keys())
        if recorded[key] != current[key]
    ]
    if not changes:
        return
    if allow_changes:
        logger.warning_rank0(
            f"Resuming {checkpoint} with changed objective settings, as `tpo_allow_changed_settings: true` "
            f"allows: {'; '.join(changes)}. Checkpoints from here on record the new settings."
        )
        return

    raise ValueError(
        f"Resuming {checkpoint} would continue its run with another objective: {'; '.join(changes)}. Set these "
        "keys back to the checkpoint's values, or set `tpo_allow_changed_settings: true` if the change is intended."
    )


def whole_run_train_loss(state: "TrainerState", session_train_loss: float, resumed_step: int) -> float:
    """The mean loss per step over the whole run, for a run resumed at ``resumed_step``.

    transformers' ``train_loss`` is the sum of this session's step losses divided by all steps. The steps up
    to the resume come from the log history the checkpoint carried: each logged ``loss`` is the mean over the
    steps since the previous log. Steps between a checkpoint's last log and the checkpoint itself are in no
    log (transformers drops their loss on resume) and are left out of the mean; with ``logging_steps``
    dividing ``save_steps`` there are none.
    """
    session_steps = state.global_step - resumed_step
    session_sum = session_train_loss * state.global_step
    earlier_sum, earlier_steps, last_logged = 0.0, 0, 0
    for entry in state.log_history:
        if "loss" in entry and entry["step"] <= resumed_step:
            earlier_sum += entry["loss"] * (entry["step"] - last_logged)
            earlier_steps += entry["step"] - last_logged
            last_logged = entry["step"]
    return (earlier_sum + session_sum) / max(earlier_steps + session_steps, 1)


def report_whole_run_train_loss(state: "TrainerState", metrics: dict[str, float], resumed_step: int) -> None:
    """Put the whole run's mean loss in ``metrics`` (all_results.json) and the final log entry (trainer_state)."""
    train_loss = whole_run_train_loss(state, metrics["train_loss"], resumed_step)
    metrics["train_loss"] = train_loss
    if state.log_history and "train_loss" in state.log_history[-1]:
        state.log_history[-1]["train_loss"] = train_loss
