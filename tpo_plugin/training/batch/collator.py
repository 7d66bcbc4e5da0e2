"""Pairwise batches that also carry each pair's loaded images and their corrupted inputs, and their unpacking."""

from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional

import torch
from llamafactory.data import PairwiseDataCollatorWithPadding
from llamafactory.extras import logging
from llamafactory.extras.constants import IGNORE_INDEX

from .corruption import ImageCorrupter
from .keys import (
    CORRUPTED_INPUTS_KEY,
    EVAL_STEP_KEY,
    NOISE_KEY,
    PAIR_IMAGES_KEY,
    PAIR_KEY,
    PAIR_VIDEOS_KEY,
    STEP_FIELD,
)


logger = logging.get_logger("llamafactory.train.tpo")


class PairBatch(NamedTuple):
    """A collated TPO batch taken apart for the forward passes; rows chosen then rejected."""

    inputs: dict[str, Any]  # the clean model inputs
    corrupted_inputs: Optional[dict[str, Any]]  # the same with the corrupted images; None when it has no image
    labels: torch.Tensor  # (2n, L)
    has_image: torch.Tensor  # (2n,) bool: the row's pair has an image or a video
    pair_keys: Optional[list[str]]  # the pairs' keys, with tpo_precompute_ref


@dataclass
class TPODataCollatorWithPadding(PairwiseDataCollatorWithPadding):
    r"""LLaMA-Factory's pairwise collator, plus ``batch["tpo_images"][i]``: the images of pair i, and
    ``batch["tpo_videos"][i]``: the frames of its videos.

    Each image is opened and resized once here; the clean batch is built from these images and the
    same ones are corrupted, so clean and corrupted inputs share size, tokens and grid. Videos are decoded
    into the frames LLaMA-Factory samples; the clean batch is LLaMA-Factory's own (it decodes the video file
    again, keeping the file's timing), and the frames are corrupted. The corrupted images' tensors are built
    here too (``batch["tpo_corrupted_inputs"]``, ``None`` without images), which
    ``dataloader_num_workers`` overlaps with the training step, keyed by the step the training samples
    carry (:mod:`.step_keys`), or by the evaluation key for samples that carry none (evaluation, the
    reference pass, the token view). ``batch["tpo_noise_key"]`` names the key; :meth:`unpack` rebuilds them
    when it is not the one the step needs.
    """

    image_corrupter: Optional[ImageCorrupter] = None
    corrupted_outside_the_loader: bool = field(default=False, init=False, repr=False)  # said once per run

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        steps = {feature.pop(STEP_FIELD, EVAL_STEP_KEY) for feature in features}
        pair_images, pair_videos = [], []
        for feature in features:
            feature["images"] = self.image_corrupter.load_images(feature.get("images") or [])
            pair_images.append(feature["images"])
            pair_videos.append(self.image_corrupter.load_videos(feature.get("videos") or []))

        batch = super().__call__(features)
        batch[PAIR_IMAGES_KEY] = pair_images
        batch[PAIR_VIDEOS_KEY] = pair_videos
        # Samples of different steps in one batch: only Accelerate's repeated samples that even out the last
        # batches across processes do that; unpack builds that batch's corrupted inputs.
        batch[NOISE_KEY] = None
        if len(steps) == 1:
            step = steps.pop()
            batch[NOISE_KEY] = self.image_corrupter.noise_key(step)
            batch[CORRUPTED_INPUTS_KEY] = self.image_corrupter.corrupted_inputs(pair_images, batch, step, pair_videos)
        if features and PAIR_KEY in features[0]:  # the datasets carry pair keys with tpo_precompute_ref
            batch[PAIR_KEY] = [feature[PAIR_KEY] for feature in features]
        return batch

    def unpack(self, batch: dict[str, Any], step_key: int) -> PairBatch:
        """A collated batch as clean and corrupted model inputs, labels, image flags and pair keys.

        The corrupted inputs are those built in the loader when their noise key is the one of ``step_key`` (a
        global step or ``EVAL_STEP_KEY``), else they are built now: results never depend on the loader's guess.
        """
        inputs = dict(batch)
        pair_images, pair_videos = inputs.pop(PAIR_IMAGES_KEY), inputs.pop(PAIR_VIDEOS_KEY)
        pair_keys = inputs.pop(PAIR_KEY, None)
        labels = inputs.pop("labels")
        visual = [len(images) + len(videos) > 0 for images, videos in zip(pair_images, pair_videos, strict=True)]
        has_image = torch.tensor(visual * 2, device=labels.device)
        corrupted_mm_inputs = inputs.pop(CORRUPTED_INPUTS_KEY, None)
        if inputs.pop(NOISE_KEY, None) != self.image_corrupter.noise_key(step_key):
            if not self.corrupted_outside_the_loader:
                self.corrupted_outside_the_loader = True
                logger.info(
                    f"Stage tpo, step {step_key + 1}: the data loader did not know which step this batch trains "
                    f"at, so its images were corrupted in the step (same result, only slower); said once per run."
                )
            corrupted_mm_inputs = self.image_corrupter.corrupted_inputs(pair_images, inputs, step_key, pair_videos)
        corrupted_inputs = None if corrupted_mm_inputs is None else {**inputs, **corrupted_mm_inputs}
        return PairBatch(inputs, corrupted_inputs, labels, has_image, pair_keys)


def corrupter_and_collator(
    template: Any,
    model: Any,
    tokenizer_module: dict[str, Any],
    data_args: Any,
    finetuning_args: Any,
    seed: int,
) -> tuple[ImageCorrupter, TPODataCollatorWithPadding]:
    """The run's image corrupter and the collator that hands it each pair's images."""
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
