"""Pairwise batches that also carry each pair's loaded images, for the corrupted-image passes."""

from dataclasses import dataclass
from typing import Any, Optional

from llamafactory.data import PairwiseDataCollatorWithPadding

from .corruption import SAMPLE_KEY, ImageCorrupter
from .reference_scores import PAIR_KEY


PAIR_IMAGES_KEY = "tpo_images"  # batch key under which each pair's loaded images reach the trainer
CORRUPTED_INPUTS_KEY = "tpo_corrupted_inputs"  # the corrupted images' multimodal tensors, when built here


@dataclass
class TPODataCollatorWithPadding(PairwiseDataCollatorWithPadding):
    r"""LLaMA-Factory's pairwise collator, plus ``batch["tpo_images"][i]``: the images of pair i.

    Each image is opened and resized once here; the clean batch is built from these images and the
    same ones are corrupted, so clean and corrupted inputs share size, tokens and grid. With
    ``tpo_noise_per: sample`` the noise does not depend on the training step, so the corrupted images'
    tensors are built here too (``batch["tpo_corrupted_inputs"]``, ``None`` without images), which
    ``dataloader_num_workers`` overlaps with the training step; otherwise the trainer builds them.
    """

    image_corrupter: Optional[ImageCorrupter] = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        pair_images = []
        for feature in features:
            feature["images"] = self.image_corrupter.load_images(feature.get("images") or [])
            pair_images.append(feature["images"])

        batch = super().__call__(features)
        batch[PAIR_IMAGES_KEY] = pair_images
        if self.image_corrupter.noise_per == "sample":  # the noise is known here: build it in the loader's workers
            batch[CORRUPTED_INPUTS_KEY] = self.image_corrupter.corrupted_inputs(pair_images, batch, SAMPLE_KEY)
        if features and PAIR_KEY in features[0]:  # the datasets carry pair keys with tpo_precompute_ref
            batch[PAIR_KEY] = [feature[PAIR_KEY] for feature in features]
        return batch
