"""``run_tpo``: the lifecycle of ``stage: tpo``, step for step LLaMA-Factory's ``run_dpo``.

It differs from ``run_dpo`` only where TPO differs: it refuses data TPO cannot use before the model
is loaded, its collator hands the trainer each pair's images, and its trainer adds the corrupted-image
passes and the token weights.
"""

import os
from typing import TYPE_CHECKING, Any, Optional

from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
from llamafactory.extras import logging
from llamafactory.extras.constants import IGNORE_INDEX
from llamafactory.extras.misc import calculate_tps
from llamafactory.extras.ploting import plot_loss
from llamafactory.model import load_model, load_tokenizer
from llamafactory.train.trainer_utils import create_modelcard_and_push, create_ref_model
from transformers import TrainerCallback

from ..compat import untested_llamafactory
from .collator import TPODataCollatorWithPadding
from .corruption import ImageCorrupter
from .data_checks import check_data_arguments, check_image_template, check_pairs
from .families import check_template_family
from .forking import single_threaded_torch_in_forked_children
from .reference_model import check_reference_model
from .reference_scores import (
    SCORES_FILE,
    ReferenceScores,
    add_pair_keys,
    data_digest,
    identity_digest,
    keyed_datasets,
    reference_identity,
)
from .run_settings import (
    RecordSettingsCallback,
    check_resume,
    objective_settings,
    refuse_resume_past_the_end,
    report_whole_run_train_loss,
    write_settings,
)
from .stopping import PassInterrupted, StopOnSignalCallback, any_rank
from .token_view import set_aside_earlier_token_log


if TYPE_CHECKING:
    from llamafactory.hparams import DataArguments, ModelArguments
    from transformers import Seq2SeqTrainingArguments

    from ..hparams.tpo_args import TPOFinetuningArguments


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
]


def run_tpo(
    model_args: "ModelArguments",
    data_args: "DataArguments",
    training_args: "Seq2SeqTrainingArguments",
    finetuning_args: "TPOFinetuningArguments",
    callbacks: Optional[list["TrainerCallback"]] = None,
):
    logger.info(
        f"Stage tpo on rank {training_args.process_index}: noise_step={finetuning_args.tpo_noise_step}, "
        f"corruption={finetuning_args.tpo_corruption}, reward_on={finetuning_args.tpo_reward_on}, "
        f"reward_offset={finetuning_args.tpo_reward_offset}, score={finetuning_args.tpo_score}, "
        f"detach_reward={finetuning_args.tpo_detach_reward}, weighting={finetuning_args.tpo_weighting}, "
        f"weight_clip={finetuning_args.tpo_weight_clip}, "
        f"pref_loss={finetuning_args.pref_loss}, "
        f"pref_beta={finetuning_args.pref_beta}."
    )
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
    reference_store = None
    if finetuning_args.tpo_precompute_ref and training_args.do_train:
        dataset_module = add_pair_keys(dataset_module)
        datasets = keyed_datasets(dataset_module)
        identity = reference_identity(
            model_args, data_args, training_args, finetuning_args, settings, data_digest(datasets)
        )
        reference_store = (datasets, identity)
    model = load_model(tokenizer, model_args, finetuning_args, training_args.do_train)

    image_corrupter, data_collator = corrupter_and_collator(
        template, model, tokenizer_module, data_args, finetuning_args, training_args.seed
    )

    # Create reference model: the adapter-disabled policy for LoRA, else a frozen copy (or `ref_model`)
    if finetuning_args.ref_model is None and (not training_args.do_train):  # use the model itself
        ref_model = model
    else:
        ref_model = create_ref_model(model_args, finetuning_args)

    from .trainer import CustomTPOTrainer

    trainer = CustomTPOTrainer(
        image_corrupter=image_corrupter,
        model=model,
        ref_model=ref_model,
        args=training_args,
        finetuning_args=finetuning_args,
        data_collator=data_collator,
        callbacks=callbacks,
        **dataset_module,
        **tokenizer_module,
    )

    # Training
    if training_args.do_train:
        stop_on_signal = StopOnSignalCallback(trainer.accelerator)
        trainer.add_callback(stop_on_signal)
        trainer.add_callback(RecordSettingsCallback(settings))
        if reference_store is not None:
            trainer.add_callback(ReferenceScoresCallback(trainer, *reference_store, stop_on_signal))
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
        if resumed_step is not None:  # transformers' train_loss divides the resumed steps' sum by all steps
            report_whole_run_train_loss(trainer.state, train_result.metrics, resumed_step)
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
        if id(model) == id(ref_model):  # unable to compute rewards if reference model is the model itself
            remove_keys = [key for key in metrics.keys() if "rewards" in key]
            for key in remove_keys:
                metrics.pop(key)
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    # Create model card
    create_modelcard_and_push(trainer, model_args, data_args, training_args, finetuning_args)


def corrupter_and_collator(
    template: Any,
    model: Any,
    tokenizer_module: dict[str, Any],
    data_args: "DataArguments",
    finetuning_args: "TPOFinetuningArguments",
    seed: int,
) -> tuple[ImageCorrupter, TPODataCollatorWithPadding]:
    """The run's image corrupter and the collator that hands it each pair's images (also used by ``inspect``)."""
    image_corrupter = ImageCorrupter(
        template=template,
        processor=tokenizer_module["processor"],
        corruption=finetuning_args.tpo_corruption,
        noise_step=finetuning_args.tpo_noise_step,
        seed=seed,
        noise_per=finetuning_args.tpo_noise_per,
    )
    tokenizer = tokenizer_module["tokenizer"]
    data_collator = TPODataCollatorWithPadding(
        template=template,
        model=model,
        pad_to_multiple_of=8,
        label_pad_token_id=IGNORE_INDEX if data_args.ignore_pad_token_for_loss else tokenizer.pad_token_id,
        image_corrupter=image_corrupter,
        **tokenizer_module,
    )
    return image_corrupter, data_collator


class ReferenceScoresCallback(TrainerCallback):
    """When training begins (the model wrapped for DeepSpeed or DDP), load or compute the reference scores.

    Stored scores are reused when their digest matches this run's, else every rank computes its share anew
    and rank 0 stores them; from then on the trainer never runs the reference model. A stop signal during
    the computation ends the run after the current batch, with nothing stored and nothing trained.
    """

    def __init__(
        self, trainer: Any, datasets: list[Any], identity: dict[str, Any], stop_on_signal: StopOnSignalCallback
    ):
        self.trainer = trainer
        self.datasets = datasets
        self.identity = identity
        self.stop_on_signal = stop_on_signal

    def on_train_begin(self, args, state, control, **kwargs):
        digest = identity_digest(self.identity)
        path = os.path.join(args.output_dir, SCORES_FILE)
        scores = ReferenceScores.load(args.output_dir, digest)
        if any_rank(self.trainer.accelerator, scores is None):
            num_pairs = sum(len(dataset) for dataset in self.datasets)
            reason = "they are not stored yet" if not os.path.isfile(path) else "what they depend on changed"
            logger.info_rank0(f"Computing the reference scores of {num_pairs} pairs once ({reason}): {path}.")
            try:
                scores = self.trainer.compute_reference_scores(self.datasets, digest, self.stop_on_signal.requested)
            except PassInterrupted as interrupted:
                logger.warning_rank0(
                    f"Interrupted while computing the reference scores, {interrupted}: nothing was stored and "
                    f"nothing trained. Run the same command again to compute them."
                )
                raise SystemExit(self.stop_on_signal.exit_code()) from None
            if args.should_save:
                scores.save(args.output_dir, self.identity)
        else:
            logger.info_rank0(f"Reusing the reference scores stored in {path}.")
        self.trainer.use_reference_scores(scores)
