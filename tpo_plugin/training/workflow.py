"""``run_tpo``: the lifecycle of ``stage: tpo``, step for step LLaMA-Factory's ``run_dpo``; and
``build_tpo_run``, the one place that checks, loads and wires a run (also for ``tpo-plugin inspect`` and the
benchmarks).

It differs from ``run_dpo`` only where TPO differs: it refuses data TPO cannot use before the model
is loaded, its collator hands the trainer each pair's images, and its trainer adds the corrupted-image
passes and the token weights.
"""

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
from llamafactory.extras import logging
from llamafactory.extras.misc import calculate_tps
from llamafactory.extras.ploting import plot_loss
from llamafactory.model import load_model, load_tokenizer
from llamafactory.train.trainer_utils import create_modelcard_and_push, create_ref_model

from ..compat import untested_llamafactory
from .batch.collator import corrupter_and_collator
from .checks.data import check_data_arguments, check_image_template, check_pairs
from .checks.families import check_template_family
from .diagnostics.token_view import TokenLogCallback, set_aside_earlier_token_log
from .reference.model import check_reference_model
from .reference.scores import ReferenceScoresCallback, with_pair_keys
from .run.forking import single_threaded_torch_in_forked_children
from .run.settings import (
    RecordSettingsCallback,
    check_resume,
    objective_settings,
    refuse_resume_past_the_end,
    report_whole_run_train_loss,
    write_settings,
)
from .run.stopping import StopOnSignalCallback


if TYPE_CHECKING:
    from llamafactory.hparams import DataArguments, ModelArguments
    from transformers import Seq2SeqTrainingArguments, TrainerCallback

    from ..hparams.tpo_args import TPOFinetuningArguments
    from .trainer import CustomTPOTrainer


# A child of LLaMA-Factory's logger, so TPO's messages share its handler, format and rank filtering.
logger = logging.get_logger("llamafactory.train.tpo")

PLOT_KEYS = [
    "loss",
    "rewards/accuracies",
    "rewards/margins",
    "tpo/score_chosen",
    "tpo/score_rejected",
    "tpo/weight_chosen",
    "tpo/weight_rejected",
    "tpo/score_drift_chosen",
    "tpo/score_drift_rejected",
    "tpo/normalizer_drift",
    "tpo/weight_term_share",
    "tpo/conditional_margin",
    "tpo/anchor_reward",
]


@dataclass
class TPORun:
    """What :func:`build_tpo_run` wires: the trainer, and what ``run_tpo`` and ``tpo-plugin inspect`` read besides."""

    trainer: "CustomTPOTrainer"
    dataset_module: dict[str, Any]
    tokenizer_module: dict[str, Any]
    settings: dict[str, Any]  # the objective's settings, recorded with every checkpoint
    resumed_step: Optional[int]  # the step of the checkpoint this run resumes, if any
    stop_on_signal: StopOnSignalCallback
    reference_is_policy: bool  # evaluation only, without ref_model: rewards cannot be computed


def build_tpo_run(
    model_args: "ModelArguments",
    data_args: "DataArguments",
    training_args: "Seq2SeqTrainingArguments",
    finetuning_args: "TPOFinetuningArguments",
    callbacks: Optional[list["TrainerCallback"]] = None,
    trainer_class: Optional[type] = None,
) -> TPORun:
    """Check, load and wire a ``stage: tpo`` run up to a trainer ready to train: the one place that does it.

    ``run_tpo`` trains with it, ``tpo-plugin inspect`` runs its passes, the benchmarks time it with another
    ``trainer_class`` (default: :class:`~.trainer.CustomTPOTrainer`). Data TPO cannot use is refused before the
    model is loaded.
    """
    if warning := untested_llamafactory():
        logger.warning_rank0(warning)
    single_threaded_torch_in_forked_children()  # the data checks run torch before get_dataset forks its workers
    check_data_arguments(data_args)
    resumed_step = check_resume(training_args, finetuning_args)  # a finished run or another objective: refused
    settings = objective_settings(finetuning_args, training_args)
    tokenizer_module = load_tokenizer(model_args)
    tokenizer = tokenizer_module["tokenizer"]
    check_reference_model(model_args, finetuning_args, tokenizer)  # before the template adds tokens to the policy's
    template = get_template_and_fix_tokenizer(tokenizer, data_args)
    check_image_template(template, data_args.template)
    check_template_family(data_args.template)
    check_pairs(template, tokenizer_module, model_args, data_args, training_args)
    dataset_module = get_dataset(template, model_args, data_args, training_args, stage="rm", **tokenizer_module)
    refuse_resume_past_the_end(training_args, dataset_module.get("train_dataset"))  # needs the number of pairs
    precompute_reference = finetuning_args.tpo_precompute_ref and training_args.do_train
    if precompute_reference:
        dataset_module, keyed_datasets, identity = with_pair_keys(
            dataset_module, model_args, data_args, training_args, finetuning_args, settings
        )
    model = load_model(tokenizer, model_args, finetuning_args, training_args.do_train)
    _, data_collator = corrupter_and_collator(
        template, model, tokenizer_module, data_args, finetuning_args, training_args.seed
    )

    # Create reference model: the adapter-disabled policy for LoRA, else a frozen copy (or `ref_model`)
    if finetuning_args.ref_model is None and (not training_args.do_train):  # use the model itself
        ref_model = model
    else:
        ref_model = create_ref_model(model_args, finetuning_args)

    if trainer_class is None:
        from .trainer import CustomTPOTrainer as trainer_class

    trainer = trainer_class(
        model=model,
        ref_model=ref_model,
        args=training_args,
        finetuning_args=finetuning_args,
        data_collator=data_collator,
        callbacks=callbacks,
        **dataset_module,
        **tokenizer_module,
    )
    stop_on_signal = StopOnSignalCallback(trainer.accelerator)
    if training_args.do_train:
        trainer.add_callback(stop_on_signal)
        trainer.add_callback(RecordSettingsCallback(settings))
        if precompute_reference:
            trainer.add_callback(ReferenceScoresCallback(trainer, keyed_datasets, identity, stop_on_signal))
        if finetuning_args.tpo_log_tokens > 0:
            trainer.add_callback(TokenLogCallback(trainer))
    return TPORun(
        trainer, dataset_module, tokenizer_module, settings, resumed_step, stop_on_signal, ref_model is model
    )


def run_tpo(
    model_args: "ModelArguments",
    data_args: "DataArguments",
    training_args: "Seq2SeqTrainingArguments",
    finetuning_args: "TPOFinetuningArguments",
    callbacks: Optional[list["TrainerCallback"]] = None,
    trainer_class: Optional[type] = None,
):
    logger.info(
        f"Stage tpo on rank {training_args.process_index}: noise_step={finetuning_args.tpo_noise_step}, "
        f"corruption={finetuning_args.tpo_corruption}, reward_on={finetuning_args.tpo_reward_on}, "
        f"reward_offset={finetuning_args.tpo_reward_offset}, score={finetuning_args.tpo_score}, "
        f"detach_reward={finetuning_args.tpo_detach_reward}, weighting={finetuning_args.tpo_weighting}, "
        f"weight_clip={finetuning_args.tpo_weight_clip}, conditional_weight={finetuning_args.tpo_conditional_weight}, "
        f"anchor_weight={finetuning_args.tpo_anchor_weight}, "
        f"pref_loss={finetuning_args.pref_loss}, "
        f"pref_beta={finetuning_args.pref_beta}."
    )
    run = build_tpo_run(model_args, data_args, training_args, finetuning_args, callbacks, trainer_class)
    trainer, dataset_module, settings = run.trainer, run.dataset_module, run.settings

    # Training
    if training_args.do_train:
        stop_on_signal = run.stop_on_signal
        set_aside_earlier_token_log(training_args)  # a new run's token history must not continue another's
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        if stop_on_signal.stopped:  # a checkpoint, not a finished model: nothing may look like one
            checkpoint = os.path.join(training_args.output_dir, f"checkpoint-{trainer.state.global_step}")
            logger.warning_rank0(
                f"Training was interrupted at step {trainer.state.global_step}; {checkpoint} holds it. "
                f"Resume with `resume_from_checkpoint: {checkpoint}`."
            )
            raise SystemExit(stop_on_signal.exit_code())

        trainer.save_model()
        if training_args.should_save:
            write_settings(training_args.output_dir, settings)
        if run.resumed_step is not None:  # transformers' train_loss divides the resumed steps' sum by all steps
            report_whole_run_train_loss(trainer.state, train_result.metrics, run.resumed_step)
        if finetuning_args.include_effective_tokens_per_second:
            train_result.metrics["effective_tokens_per_sec"] = calculate_tps(
                dataset_module["train_dataset"], train_result.metrics, stage="rm"
            )

        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()
        if trainer.is_world_process_zero() and finetuning_args.plot_loss:
            keys = list(PLOT_KEYS)
            if isinstance(dataset_module.get("eval_dataset"), dict):
                keys += [f"eval_{key}_loss" for key in dataset_module["eval_dataset"].keys()]
            else:
                keys += ["eval_loss"]

            plot_loss(training_args.output_dir, keys=keys)

    # Evaluation
    if training_args.do_eval:
        metrics = trainer.evaluate(metric_key_prefix="eval")
        if run.reference_is_policy:  # unable to compute rewards if reference model is the model itself
            remove_keys = [key for key in metrics.keys() if "rewards" in key]
            for key in remove_keys:
                metrics.pop(key)
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    # Create model card
    create_modelcard_and_push(trainer, model_args, data_args, training_args, finetuning_args)
