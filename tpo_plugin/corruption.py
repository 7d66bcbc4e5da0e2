"""Corrupted copies of the training images (TPO_METHOD §1).

The noise is added in [0, 1] pixel space to the image LLaMA-Factory has already opened and resized,
clamped to [0, 1] (the reference code wraps around instead) and quantised back to 8 bits, so the
corrupted image then goes through the model family's own image processor exactly like the clean one:
this works for every multimodal template and yields the same image tokens and grid.

The noise is reproducible: it is drawn from a generator seeded with the training seed, a step key
(the global step while training, a fixed key while evaluating) and a digest of the image's pixels,
so the same run repeats exactly, also after a resume from a checkpoint, whatever the data order.
"""

import hashlib
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image

from .patches import regularize_images


NUM_NOISE_STEPS = 1000
EVAL_STEP_KEY = -1  # every evaluation uses the same noise, so evaluations at different steps compare


def noise_schedule(num_steps: int = NUM_NOISE_STEPS) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Return ``(sqrt(alpha_bar_k), sqrt(1 - alpha_bar_k))`` for k = 0 .. num_steps - 1 (TPO_METHOD §1).

    ``beta_t = sigmoid(linspace(-6, 6, T)) * (5e-3 - 1e-5) + 1e-5`` and ``alpha_bar_k = prod_{i<=k} (1 - beta_i)``.
    """
    betas = torch.sigmoid(torch.linspace(-6, 6, num_steps, dtype=torch.float64)) * (5e-3 - 1e-5) + 1e-5
    alpha_bar = torch.cumprod(1.0 - betas, dim=0)
    return alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt()


_SQRT_ALPHA_BAR, _SQRT_ONE_MINUS_ALPHA_BAR = noise_schedule()


def add_diffusion_noise(image: torch.Tensor, noise: torch.Tensor, noise_step: int) -> torch.Tensor:
    r"""Forward diffusion to step k, clamped to pixel range: ``clamp(sqrt(ab_k) v + sqrt(1 - ab_k) eps, 0, 1)``.

    ``image`` holds pixel values in [0, 1]; ``noise`` is standard normal of the same shape (TPO_METHOD §1).
    """
    signal_scale = _SQRT_ALPHA_BAR[noise_step].item()
    noise_scale = _SQRT_ONE_MINUS_ALPHA_BAR[noise_step].item()
    return (signal_scale * image + noise_scale * noise).clamp_(0.0, 1.0)


def noise_seed(seed: int, step_key: int, image: Image.Image) -> int:
    """A 63-bit generator seed from the training seed, the step key and the image's pixels."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(f"{seed}/{step_key}/{image.mode}/{image.size}".encode())
    digest.update(image.tobytes())
    return int.from_bytes(digest.digest(), "little") >> 1


def corrupt_image(image: Image.Image, corruption: str, noise_step: int, seed: int, step_key: int) -> Image.Image:
    """The corrupted copy of one RGB image: diffusion noise at ``noise_step``, or a white image of the same size."""
    if corruption == "blank":
        return Image.new(image.mode, image.size, (255,) * len(image.getbands()))

    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
    generator = torch.Generator().manual_seed(noise_seed(seed, step_key, image))
    noise = torch.randn(pixels.shape, generator=generator, dtype=torch.float32)
    noisy = add_diffusion_noise(pixels, noise, noise_step)
    return Image.fromarray((noisy * 255.0).round_().to(torch.uint8).numpy())


class ImageCorrupter:
    """Builds the corrupted multimodal inputs of a pairwise batch with the model family's own processor."""

    def __init__(self, template: Any, processor: Any, corruption: str, noise_step: int, seed: int):
        self.mm_plugin = template.mm_plugin
        self.processor = processor
        self.corruption = corruption
        self.noise_step = noise_step
        self.seed = seed

    def load_images(self, images: list[Any]) -> list[Image.Image]:
        """Open and resize the images of one sample once, as LLaMA-Factory's processor would."""
        return regularize_images(self.mm_plugin, images, self.processor) if images else []

    def corrupted_inputs(
        self, pair_images: list[list[Image.Image]], batch: dict[str, Any], step_key: int
    ) -> Optional[dict[str, Any]]:
        """The batch's multimodal tensors recomputed from corrupted images, or ``None`` if it has no image.

        ``pair_images[i]`` are the images of pair i, shared by its chosen row i and rejected row n + i:
        one corrupted copy per image serves both rows (and the policy and the reference model).
        """
        if not any(pair_images):
            return None

        corrupted = [
            [corrupt_image(image, self.corruption, self.noise_step, self.seed, step_key) for image in images]
            for images in pair_images
        ]
        # Process each corrupted image once, for the chosen rows, and reuse the tensors for the rejected rows:
        # the multimodal tensors list images (or rows) along dim 0 in row order, so the rejected rows' tensors
        # equal the chosen rows'. _check_same_layout below verifies the result against the clean batch.
        num_pairs = len(pair_images)
        chosen_inputs = self.mm_plugin.get_mm_inputs(
            [image for images in corrupted for image in images],
            [],
            [],
            [len(images) for images in corrupted],
            [0] * num_pairs,
            [0] * num_pairs,
            batch["input_ids"][:num_pairs].tolist(),
            self.processor,
        )
        mm_inputs = {key: _repeat_rows(value) for key, value in chosen_inputs.items()}
        for text_level_key in ("token_type_ids", "mm_token_type_ids"):  # identical to the clean batch's
            mm_inputs.pop(text_level_key, None)

        _check_same_layout(mm_inputs, batch)
        return mm_inputs


def _repeat_rows(value: Any) -> Any:
    """The chosen rows' multimodal input, repeated for the rejected rows."""
    if isinstance(value, torch.Tensor):
        return torch.cat([value, value])
    return value + value if isinstance(value, list) else value


def _check_same_layout(corrupted: dict[str, Any], clean: dict[str, Any]) -> None:
    """Corrupted images must differ from the clean ones in pixel values only, never in tokens or grid."""
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
                f"The corrupted images changed `{key}` (image tokens or grid); only pixel values may change."
            )
