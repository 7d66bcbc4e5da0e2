"""The corrupted multimodal inputs of a training batch (docs/method.md §1): the one place that draws noise.

Each image is corrupted (:func:`tpo_plugin.method.noise.corrupt_image`) after LLaMA-Factory has opened
and resized it, and then goes through the model family's own image processor exactly like the clean
one: this works for every multimodal template and yields the same image tokens and grid. A video is
corrupted frame by frame, after LLaMA-Factory's frame sampling and resizing, and goes through the family's
video processor: same frame count, grid and video tokens as the clean video.

The step key is the global step while training and a fixed key while evaluating, so the same run
repeats exactly, also after a resume from a checkpoint, whatever the data order; with
``tpo_noise_per: sample`` one fixed key serves every step, so each image has one corrupted copy.
"""

from typing import Any, Optional

import torch
from PIL import Image

from ...integration.internals import image_resizer, video_frame_loader
from ...method.noise import corrupt_image
from .image_modes import eight_bit_rgb, open_image
from .keys import SAMPLE_KEY


def regularize_images(mm_plugin: Any, images: list[Any], processor: Any) -> list[Image.Image]:
    """Open and resize images exactly as ``mm_plugin.get_mm_inputs`` does, after converting the modes its
    ``convert("RGB")`` destroys (16-bit, float, alpha) to the 8-bit RGB they show."""
    resize = image_resizer(mm_plugin, processor)
    return resize([eight_bit_rgb(open_image(image)) for image in images])


# Inputs the corrupted images do not change, so the clean batch's hold. Built from the token ids (and image sizes):
# Mllama's cross_attention_mask from the padded chosen rows here would also cover their padding. Built from a
# video file's timing (frame rate, sampled frame indices), which decoded frames no longer carry.
CLEAN_BATCH_KEYS = (
    "token_type_ids",
    "mm_token_type_ids",
    "cross_attention_mask",
    "second_per_grid_ts",
    "video_metadata",
)


class ImageCorrupter:
    """Builds the corrupted multimodal inputs of a pairwise batch with the model family's own processor."""

    def __init__(
        self, template: Any, processor: Any, corruption: str, noise_step: int, seed: int, noise_per: str = "step"
    ):
        self.mm_plugin = template.mm_plugin
        self.processor = processor
        self.corruption = corruption
        self.noise_step = noise_step
        self.seed = seed
        self.noise_per = noise_per

    def load_images(self, images: list[Any]) -> list[Image.Image]:
        """Open and resize the images of one sample once, as LLaMA-Factory's processor would."""
        return regularize_images(self.mm_plugin, images, self.processor) if images else []

    def load_videos(self, videos: list[Any]) -> list[list[Image.Image]]:
        """The frames of each video of one sample, sampled and resized as LLaMA-Factory's processor does."""
        return video_frame_loader(self.mm_plugin, self.processor)(videos) if videos else []

    def corrupted_frames(self, frames: list[Image.Image], step_key: int) -> list[Image.Image]:
        """The corrupted copy of one video's frames, each with noise of its own (keyed by its index too)."""
        noise_key = self.noise_key(step_key)
        return [
            corrupt_image(frame, self.corruption, self.noise_step, self.seed, noise_key, frame=index)
            for index, frame in enumerate(frames)
        ]

    def noise_key(self, step_key: int) -> int:
        """The key of the noise a batch at ``step_key`` (a global step or ``EVAL_STEP_KEY``) is corrupted with."""
        return SAMPLE_KEY if self.noise_per == "sample" else step_key

    def corrupted_inputs(
        self,
        pair_images: list[list[Image.Image]],
        batch: dict[str, Any],
        step_key: int,
        pair_videos: Optional[list[list[list[Image.Image]]]] = None,
    ) -> Optional[dict[str, Any]]:
        """The batch's multimodal tensors recomputed from corrupted images and video frames, or ``None`` if it has
        neither.

        ``pair_images[i]`` are the images of pair i and ``pair_videos[i]`` the frames of its videos, shared by its
        chosen row i and rejected row n + i: one corrupted copy per image or frame serves both rows (and the
        policy and the reference model).
        """
        num_pairs = len(pair_images)
        pair_videos = pair_videos or [[] for _ in range(num_pairs)]
        if not any(pair_images) and not any(pair_videos):
            return None

        noise_key = self.noise_key(step_key)
        corrupted_images = [
            [corrupt_image(image, self.corruption, self.noise_step, self.seed, noise_key) for image in images]
            for images in pair_images
        ]
        corrupted_videos = [[self.corrupted_frames(frames, step_key) for frames in videos] for videos in pair_videos]
        # Process each corrupted image once, for the chosen rows, and reuse the tensors for the rejected rows:
        # the multimodal tensors list images (or rows) along dim 0 in row order, so the rejected rows' tensors
        # equal the chosen rows'. _check_same_layout below verifies the result against the clean batch.
        chosen_inputs = self.mm_plugin.get_mm_inputs(
            [image for images in corrupted_images for image in images],
            [frames for videos in corrupted_videos for frames in videos],
            [],
            [len(images) for images in corrupted_images],
            [len(videos) for videos in corrupted_videos],
            [0] * num_pairs,
            batch["input_ids"][:num_pairs].tolist(),
            self.processor,
        )
        mm_inputs = {key: _repeat_rows(value) for key, value in chosen_inputs.items()}
        for key in CLEAN_BATCH_KEYS:
            mm_inputs.pop(key, None)

        _check_same_layout(mm_inputs, batch)
        return mm_inputs


def _repeat_rows(value: Any) -> Any:
    """The chosen rows' multimodal input, repeated for the rejected rows."""
    if isinstance(value, torch.Tensor):
        return torch.cat([value, value])
    return value + value if isinstance(value, list) else value


def _check_same_layout(corrupted: dict[str, Any], clean: dict[str, Any]) -> None:
    """Corrupted images and frames must differ from the clean ones in pixel values only, never in tokens or grid."""
    for key, value in corrupted.items():
        clean_value = clean.get(key)
        if clean_value is None:
            raise RuntimeError(f"The corrupted images produced `{key}`, which the clean batch does not have.")

        if isinstance(value, torch.Tensor):
            same = value.shape == clean_value.shape and (
                value.is_floating_point() or torch.equal(value, clean_value.to(value.device))
            )
        else:
            same = value == clean_value

        if not same:
            raise RuntimeError(
                f"The corrupted images changed `{key}` (image or video tokens, frames or grid); only pixel values may "
                "change."
            )
