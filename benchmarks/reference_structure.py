"""TPO computed with the reference code's structure, as the baseline the plugin's trainer is measured against.

The reference code (github.com/alibaba/TPO, docs/method.md §10) runs every branch as its own forward pass:
policy and reference model, each on the chosen and the rejected answers, each with the clean and the
corrupted image, 4 + 4 forwards of n rows, each re-encoding its images in the vision tower, and turns every
forward's logits into a float32 full-vocabulary log-softmax before gathering the target tokens.

``ReferenceStructureTPOTrainer`` does exactly that and nothing else differently: it replaces only how the
plugin's trainer computes per-token scores, so the corrupted images, the token weights, the loss and the
logged metrics are the plugin's and both trainers produce the same losses (``tests/test_benchmarks.py``
checks the first two steps). The corrupted batch is prepared once per step, as the reference code's data
loader prepares a sample's corrupted image once per load.
"""

from typing import Any, Literal

import torch

from tpo_plugin.method.objective import IGNORE_INDEX, TokenScores
from tpo_plugin.training.batch.keys import PAIR_IMAGES_KEY
from tpo_plugin.training.trainer import CustomTPOTrainer


def split_rows(inputs: dict[str, Any], rows: slice, images_per_row: list[int]) -> dict[str, Any]:
    """The model inputs of rows ``rows`` of a padded batch, their images' pixels and grids included.

    Handles LLaMA-Factory's layouts: per-row tensors ``(B, ...)``, M-RoPE ``position_ids`` ``(k, B, L)``,
    ``image_grid_thw`` (one row per image) with Qwen2-VL's patch-flattened ``pixel_values``, and
    ``pixel_values`` with one entry per image (LLaVA).
    """
    num_rows = len(images_per_row)
    first_image, end_image = sum(images_per_row[: rows.start]), sum(images_per_row[: rows.stop])
    part = {}
    for key, value in inputs.items():
        if not isinstance(value, torch.Tensor):
            part[key] = value
        elif key == "image_grid_thw":
            part[key] = value[first_image:end_image]
        elif key == "pixel_values" and "image_grid_thw" in inputs:
            patches = inputs["image_grid_thw"].prod(dim=-1)
            part[key] = value[int(patches[:first_image].sum()) : int(patches[:end_image].sum())]
        elif key == "pixel_values" and value.size(0) == sum(images_per_row):
            part[key] = value[first_image:end_image]
        elif key == "position_ids" and value.dim() == 3:
            part[key] = value[:, rows]
        elif value.size(0) == num_rows:
            part[key] = value[rows]
        else:
            raise ValueError(f"Cannot split batch entry `{key}` of shape {tuple(value.shape)} into rows.")
    return part


def full_vocab_token_scores(logits: torch.Tensor, labels: torch.Tensor) -> TokenScores:
    """Target logit and log-probability through a float32 log-softmax over the whole vocabulary (reference code)."""
    labels = labels[:, 1:]
    logits = logits[:, :-1].float()
    mask = labels != IGNORE_INDEX
    targets = labels.masked_fill(~mask, 0).unsqueeze(-1)
    target_logp = torch.log_softmax(logits, dim=-1).gather(-1, targets).squeeze(-1)
    target_logit = logits.gather(-1, targets).squeeze(-1)
    return TokenScores(target_logit * mask, target_logp * mask, mask)


class ReferenceStructureTPOTrainer(CustomTPOTrainer):
    """The plugin's TPO trainer with the reference code's 8 separate forwards and float32 log-softmax.

    Only ``_token_scores`` differs: the plugin's trainer turns every batch of rows (one pass, or several
    passes joined into one batch) into per-token scores through it. Here it splits those rows into
    branches of n rows, one answer side under one image condition, and runs one forward per branch.
    Each step checks that all 8 branches went through it, so that a change of the plugin's trainer
    cannot silently turn this baseline into the optimised trainer.
    """

    def get_batch_loss_metrics(
        self, model, batch: dict[str, Any], train_eval: Literal["train", "eval"] = "train"
    ) -> tuple[torch.Tensor, dict[str, float]]:
        pair_images = batch[PAIR_IMAGES_KEY]
        self._images_per_row = [len(images) for images in pair_images] * 2  # chosen rows, then rejected rows
        self._scored_rows = 0
        loss, metrics = super().get_batch_loss_metrics(model, batch, train_eval)
        passes = 4 if any(pair_images) else 2  # policy and reference, clean (and corrupted)
        if self._scored_rows != passes * len(self._images_per_row):
            raise RuntimeError(
                f"CustomTPOTrainer scored {self._scored_rows} rows through `_token_scores`, not {passes} x "
                f"{len(self._images_per_row)}: its structure changed, update benchmarks/reference_structure.py."
            )
        return loss, metrics

    def _token_scores(
        self, model, inputs: dict[str, Any], labels: torch.Tensor, passes: int = 1, reference: bool = False
    ) -> tuple[TokenScores, torch.Tensor]:
        """One forward per branch of n rows; the scores and each row's mean logit, rows in the order given.

        Every branch encodes its images anew, as the reference code does: the plugin's image feature cache
        (``passes``, ``reference``) is not used.
        """
        batch_rows, num_pairs = len(self._images_per_row), len(self._images_per_row) // 2
        if labels.size(0) % batch_rows:
            raise RuntimeError(
                f"`_token_scores` got {labels.size(0)} rows, not a multiple of the batch's {batch_rows}: "
                "CustomTPOTrainer's structure changed, update benchmarks/reference_structure.py."
            )
        self._scored_rows += labels.size(0)
        images_per_row = self._images_per_row * (labels.size(0) // batch_rows)  # joined passes repeat the layout
        scores, mean_logits = [], []
        for start in range(0, labels.size(0), num_pairs):
            rows = slice(start, start + num_pairs)
            logits = model(**split_rows(inputs, rows, images_per_row), return_dict=True, use_cache=False).logits
            scores.append(full_vocab_token_scores(logits, labels[rows]))
            mean_logits.append(logits.detach().float().mean(dim=(1, 2)))
        return TokenScores(*(torch.cat(field) for field in zip(*scores, strict=True))), torch.cat(mean_logits)
