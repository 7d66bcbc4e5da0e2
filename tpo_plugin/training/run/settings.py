"""What defines a TPO run's objective, recorded with each checkpoint and checked on resume.

A resume (an explicit ``resume_from_checkpoint``, or LLaMA-Factory's automatic one from the last checkpoint
of ``output_dir`` when ``overwrite_output_dir`` is false) continues the run that wrote the checkpoint. Two
things would silently make it something else, and both are refused before the model loads:

- settings that define the objective differ from those the checkpoint was trained with;
- the checkpoint is at or past the step this run ends at (its run finished, or ``max_steps`` or
  ``num_train_epochs`` was lowered below it): nothing is left to train, yet transformers would go on and rewrite
  the final model, ``trainer_state.json`` and ``all_results.json`` with the checkpoint's. With ``max_steps`` this
  is refused before anything loads; with ``num_train_epochs`` the run's length is known once the data is
  (:func:`refuse_resume_past_the_end`, before the model loads).

Also: transformers' ``train_loss`` of a resumed run sums only the resumed steps but divides by all steps;
:func:`whole_run_train_loss` reports the mean over the whole run instead.
"""

import json
import math
import os
from typing import TYPE_CHECKING, Any, Optional

from llamafactory.extras import logging
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, has_length

from ...hparams.tpo_args import tpo_defaults


if TYPE_CHECKING:
    from transformers import Seq2SeqTrainingArguments, TrainerState

    from ...hparams.tpo_args import TPOFinetuningArguments


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
    # Written whole or not at all: a crash mid-write must not leave a half file that stops every later resume.
    path = os.path.join(folder, SETTINGS_FILE)
    with open(path + ".tmp", "w", encoding="utf-8") as file:
        json.dump(settings, file, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)


def _read_json(path: str, advice: str) -> Optional[dict[str, Any]]:
    """The JSON object in ``path``, None if there is no such file; a damaged file is refused with ``advice``."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as file:
        text = file.read()
    try:
        content = json.loads(text)
    except json.JSONDecodeError as error:
        content = error
    if not isinstance(content, dict):
        problem = "is empty" if not text.strip() else f"is not a JSON object ({content})"
        raise ValueError(f"{path} {problem}: it was cut off or damaged (a crash while it was written?). {advice}")
    return content


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
    """Refuse a resume past the end of a ``max_steps`` run or with another objective; return the resumed step."""
    checkpoint, state = _resumed_state(training_args)
    if state is None:
        return None

    if training_args.max_steps > 0:
        refuse_finished_run(checkpoint, state, training_args.max_steps, f"`max_steps: {training_args.max_steps}`")
    refuse_changed_settings(
        checkpoint,
        objective_settings(finetuning_args, training_args),
        allow_changes=finetuning_args.tpo_allow_changed_settings,
    )
    return state["global_step"]


def _resumed_state(training_args: "Seq2SeqTrainingArguments") -> tuple[Optional[str], Optional[dict[str, Any]]]:
    """The checkpoint a training run resumes from and its trainer state (None, None for a new run)."""
    checkpoint = resumed_checkpoint(training_args) if training_args.do_train else None
    if checkpoint is None:
        return None, None
    advice = f"Resume from an earlier checkpoint (`resume_from_checkpoint: PATH`), or delete {checkpoint}."
    # Without a state transformers starts at step 0 (or fails to load it): nothing to compare.
    return checkpoint, _read_json(os.path.join(checkpoint, TRAINER_STATE_FILE), advice)


def steps_per_epoch(num_pairs: int, batch_size: int, world_size: int, accumulation: int, drop_last: bool) -> int:
    """Optimizer steps per epoch as transformers' Trainer counts them (``set_initial_training_values``).

    Each process gets its share of the batches as accelerate shards them (``even_batches``: the last share is
    filled up), and a step takes ``accumulation`` of its batches, the last step of an epoch fewer.
    """

    def share(items: int, parts: int) -> int:
        return items // parts if drop_last else -(-items // parts)

    batches_per_process = share(share(num_pairs, batch_size), world_size)
    return max(-(-batches_per_process // accumulation), 1)


def refuse_resume_past_the_end(training_args: "Seq2SeqTrainingArguments", train_dataset: Any) -> None:
    """With ``num_train_epochs`` the run's length depends on the data: refuse, once it is loaded, a resume from a
    checkpoint at or past the run's last step (``max_steps`` runs were checked by :func:`check_resume`)."""
    checkpoint, state = _resumed_state(training_args)
    if state is None or training_args.max_steps > 0 or not has_length(train_dataset):
        return

    num_pairs, world_size = len(train_dataset), training_args.world_size
    batch_size, accumulation = training_args.train_batch_size, training_args.gradient_accumulation_steps
    per_epoch = steps_per_epoch(num_pairs, batch_size, world_size, accumulation, training_args.dataloader_drop_last)
    end = math.ceil(training_args.num_train_epochs * per_epoch)
    length = (
        f"`num_train_epochs: {training_args.num_train_epochs}` of {per_epoch} steps each, for {num_pairs} pairs in "
        f"batches of {batch_size} on each of {world_size} device(s) with `gradient_accumulation_steps: {accumulation}`"
    )
    refuse_finished_run(checkpoint, state, end, length)


def refuse_finished_run(checkpoint: str, state: dict[str, Any], end: int, length: str) -> None:
    """A checkpoint at or past the step this run ends at (``end``, set by ``length``) leaves nothing to train."""
    step = state["global_step"]
    if step < end:
        return

    if step >= state.get("max_steps", step + 1):
        run = os.path.dirname(os.path.abspath(checkpoint))
        head = f"The run in {run} finished at step {step}, and this run would resume from its checkpoint"
    else:
        head = "This run would resume from the checkpoint"
    raise ValueError(
        f"{head} {checkpoint} (step {step}) although it ends at step {end} ({length}): nothing is left to train, "
        "yet transformers would go on and rewrite the final model, trainer_state.json and all_results.json in "
        "`output_dir`. To train a new run, set a new `output_dir`, or `overwrite_output_dir: true` without "
        f"`resume_from_checkpoint`; to continue this run, raise `max_steps` (or `num_train_epochs`) past step {step}."
    )


def refuse_changed_settings(checkpoint: str, current: dict[str, Any], allow_changes: bool) -> None:
    """A changed objective setting is refused, naming key, old and new value, unless the user allows it."""
    advice = (
        "Delete it to resume without checking that this run's TPO settings match the checkpoint's, or resume from "
        "an earlier checkpoint (`resume_from_checkpoint: PATH`)."
    )
    recorded = _read_json(os.path.join(checkpoint, SETTINGS_FILE), advice)
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
