"""The per-token visual scores, weights and log-probabilities of pairs, computed with the trainer's own passes,
and the token log that ``tpo_log_tokens`` keeps of them during training (:class:`TokenLogCallback`).

The trainer's ``batch_token_scores`` runs exactly the forwards of a TPO step (same corruption, noise
keyed as an evaluation step, same batching) and :func:`token_visual_scores_and_log_weights` turns them into
``s`` and ``log c`` (docs/method.md §2–§3), for the policy and for the reference model. ``tpo-plugin inspect`` and
``tpo_log_tokens`` both read them from here, so what they show is what the loss uses.
"""

import json
import os
import time
from typing import TYPE_CHECKING, Any, Optional

import torch
from llamafactory.extras import logging
from transformers import TrainerCallback

from ...method.objective import IGNORE_INDEX, TokenScores, token_visual_scores_and_log_weights
from ..batch.keys import EVAL_STEP_KEY
from ..run.settings import resumed_checkpoint


if TYPE_CHECKING:
    from transformers import Seq2SeqTrainingArguments


logger = logging.get_logger("llamafactory.train.tpo")

TOKENS_LOG_FILE = "tpo_tokens.jsonl"  # what tpo_log_tokens appends to, in output_dir
SIDES = ("chosen", "rejected")
LOGGED = ("tokens", "visual_score", "weight")  # per side and step in tpo_tokens.jsonl


def reference_description(trainer: Any) -> str:
    """Which model is the reference, in words (the trainer's ``_reference_context`` picks it the same way)."""
    ref_model = trainer.finetuning_args.ref_model
    if trainer.ref_model is None:
        return "the policy with its adapter disabled (LoRA without ref_model)"
    if ref_model is not None:
        return f"ref_model {ref_model}"
    if trainer.ref_model is trainer.model:
        return "the same model as the policy"
    return "a frozen copy of model_name_or_path (the policy's initial weights)"


def _side_values(scores: TokenScores, score: torch.Tensor, log_weight: torch.Tensor, row: int) -> dict[str, list]:
    mask = scores.mask[row]
    return {
        "visual_score": score[row][mask].tolist(),
        "weight": log_weight[row][mask].exp().tolist(),
        "logp": scores.logp[row][mask].tolist(),
    }


@torch.no_grad()
def batch_token_views(trainer: Any, batch: dict[str, Any]) -> list[dict[str, Any]]:
    """Per pair of a collated batch: each side's response token ids and the policy's and reference's s, c, log p.

    The model is put in eval mode (as an evaluation step runs it) and restored afterwards.
    """
    args = trainer.finetuning_args
    weighting = {"score_kind": args.tpo_score, "reward_on": args.tpo_reward_on, "offset": args.tpo_reward_offset}
    model = trainer.model
    was_training = model.training
    model.eval()
    try:
        inputs = trainer._prepare_inputs(batch)
        scores = trainer.batch_token_scores(model, inputs, EVAL_STEP_KEY, reference_scores=True)
    finally:
        model.train(was_training)

    policy = token_visual_scores_and_log_weights(
        scores.policy_clean, scores.policy_corrupted, scores.has_image, **weighting
    )
    reference = token_visual_scores_and_log_weights(
        scores.ref_clean, scores.ref_corrupted, scores.has_image, **weighting
    )
    num_pairs = scores.labels.size(0) // 2
    views = []
    for pair in range(num_pairs):
        view = {}
        for offset, side in enumerate(SIDES):
            row = pair + offset * num_pairs
            labels = scores.labels[row]
            view[side] = {
                "token_ids": labels[labels != IGNORE_INDEX].tolist(),  # response tokens in order, as the mask has them
                **_side_values(scores.policy_clean, *policy, row),
                "reference": _side_values(scores.ref_clean, *reference, row),
            }
        views.append(view)
    return views


def pair_token_views(trainer: Any, rows: list[dict[str, Any]], tokenizer: Any) -> list[dict[str, Any]]:
    """Token views of dataset rows (LLaMA-Factory's encoded pairs), collated by the trainer's own collator.

    Pairs go through the passes ``per_device_eval_batch_size`` at a time, as an evaluation would batch them.
    Each side gets ``tokens``: every response token decoded on its own.
    """
    batch_size = max(1, trainer.args.per_device_eval_batch_size)
    views = []
    for start in range(0, len(rows), batch_size):
        features = [dict(row) for row in rows[start : start + batch_size]]  # the collator alters its features
        views += batch_token_views(trainer, trainer.data_collator(features))
    for view in views:
        for side in SIDES:
            ids = view[side].pop("token_ids")
            view[side] = {"tokens": [tokenizer.decode([token]) for token in ids], **view[side]}
    return views


class TokenLogCallback(TrainerCallback):
    """At every training logging step, append the per-token s and c of the first ``tpo_log_tokens`` training
    pairs to ``OUTPUT_DIR/tpo_tokens.jsonl`` (``tpo-plugin inspect --history`` renders it)."""

    def __init__(self, trainer: Any):
        self.trainer = trainer

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:  # a training logging step (evaluation logs `eval_loss`, the end `train_loss`)
            log_token_view(self.trainer)


def log_token_view(trainer: Any) -> None:
    """Append the per-token s and c of the first ``tpo_log_tokens`` training pairs to ``tpo_tokens.jsonl``.

    Every rank runs the passes (under ZeRO-3 or FSDP all ranks must run the same modules); rank 0 writes.
    """
    dataset = trainer.train_dataset
    rows = [dataset[index] for index in range(min(trainer.finetuning_args.tpo_log_tokens, len(dataset)))]
    views = pair_token_views(trainer, rows, trainer.processing_class)
    if not trainer.is_world_process_zero():
        return

    step = trainer.state.global_step
    os.makedirs(trainer.args.output_dir, exist_ok=True)
    with open(os.path.join(trainer.args.output_dir, TOKENS_LOG_FILE), "a", encoding="utf-8") as file:
        for pair, view in enumerate(views):
            for side in SIDES:
                record = {"step": step, "pair": pair, "side": side, **{key: view[side][key] for key in LOGGED}}
                file.write(json.dumps(record) + "\n")


def set_aside_earlier_token_log(training_args: "Seq2SeqTrainingArguments") -> Optional[str]:
    """Rename the ``tpo_tokens.jsonl`` of an earlier run in ``output_dir`` unless this run resumes one of its
    checkpoints: the log is appended to, and a new run's steps would otherwise sit among the earlier run's.

    The earlier log keeps its data, under a name stamped with its last write; returns that name.
    """
    output_dir = training_args.output_dir
    path = os.path.join(output_dir, TOKENS_LOG_FILE)
    checkpoint = resumed_checkpoint(training_args)
    continues = checkpoint is not None and os.path.dirname(os.path.abspath(checkpoint)) == os.path.abspath(output_dir)
    if continues or not training_args.should_save or not os.path.isfile(path):
        return None

    stem, extension = os.path.splitext(path)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(os.path.getmtime(path)))
    target, number = f"{stem}.{stamp}{extension}", 1
    while os.path.exists(target):  # never replace an earlier set-aside log
        number += 1
        target = f"{stem}.{stamp}-{number}{extension}"
    os.rename(path, target)
    logger.info_rank0(
        f"This run starts anew (it resumes no checkpoint of {output_dir}), so the token log of the earlier run "
        f"there, {path}, was moved to {target}; `tpo-plugin inspect --history {target}` shows it."
    )
    return target
