"""Pairwise batches that also carry each pair's loaded images, for the corrupted-image passes."""

from dataclasses import dataclass
from typing import Any, Optional

from llamafactory.data import PairwiseDataCollatorWithPadding

from .corruption import EVAL_STEP_KEY, ImageCorrupter
from .reference_scores import PAIR_KEY
from .step_keys import STEP_FIELD


PAIR_IMAGES_KEY = "tpo_images"  # batch key under which each pair's loaded images reach the trainer
CORRUPTED_INPUTS_KEY = "tpo_corrupted_inputs"  # the corrupted images' multimodal tensors, built here
NOISE_KEY = "tpo_noise_key"  # the noise key they were built with (None: not built here)


@dataclass
class TPODataCollatorWithPadding(PairwiseDataCollatorWithPadding):
    r"""LLaMA-Factory's pairwise collator, plus ``batch["tpo_images"][i]``: the images of pair i.

    Each image is opened and resized once here; the clean batch is built from these images and the
    same ones are corrupted, so clean and corrupted inputs share size, tokens and grid. The corrupted
    images' tensors are built here too (``batch["tpo_corrupted_inputs"]``, ``None`` without images), which
    ``dataloader_num_workers`` overlaps with the training step, keyed by the step the training samples
    carry (:mod:`.step_keys`), or by the evaluation key for samples that carry none (evaluation, the
    reference pass, the token view). ``batch["tpo_noise_key"]`` names the key; the trainer rebuilds them when
    it is not the one the step needs.
    """

    image_corrupter: Optional[ImageCorrupter] = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        steps = {feature.pop(STEP_FIELD, EVAL_STEP_KEY) for feature in features}
        pair_images = []
        for feature in features:
            feature["images"] = self.image_corrupter.load_images(feature.get("images") or [])
            pair_images.append(feature["images"])

        batch = super().__call__(features)
        batch[PAIR_IMAGES_KEY] = pair_images
        # Samples of different steps in one batch: only Accelerate's repeated samples that even out the last
        # batches across processes do that; the trainer builds that batch's corrupted inputs itself.
        batch[NOISE_KEY] = None
        if len(steps) == 1:
            step = steps.pop()
            batch[NOISE_KEY] = self.image_corrupter.noise_key(step)
            batch[CORRUPTED_INPUTS_KEY] = self.image_corrupter.corrupted_inputs(pair_images, batch, step)
        if features and PAIR_KEY in features[0]:  # the datasets carry pair keys with tpo_precompute_ref
            batch[PAIR_KEY] = [feature[PAIR_KEY] for feature in features]
        return batch
