"""Corrupting one image with forward-diffusion noise (docs/method.md §1).

The noise is added in [0, 1] pixel space to an image that is already opened and resized, clamped to
[0, 1] (the reference code wraps around instead) and quantised back to 8 bits, so the corrupted image
can go through a model family's own image processor exactly like the clean one.

The noise is reproducible: it is drawn from a generator seeded with the training seed, a step key and
a digest of the image's pixels (and, for a video frame, its index), so the same (seed, step key, image) always
gives the same noise, whichever process draws it.
"""

import hashlib

import numpy as np
import torch
from PIL import Image


NUM_NOISE_STEPS = 1000


def noise_schedule(num_steps: int = NUM_NOISE_STEPS) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Return ``(sqrt(alpha_bar_k), sqrt(1 - alpha_bar_k))`` for k = 0 .. num_steps - 1 (docs/method.md Eq. 1).

    ``beta_t = sigmoid(linspace(-6, 6, T)) * (5e-3 - 1e-5) + 1e-5`` and ``alpha_bar_k = prod_{i<=k} (1 - beta_i)``.
    """
    betas = torch.sigmoid(torch.linspace(-6, 6, num_steps, dtype=torch.float64)) * (5e-3 - 1e-5) + 1e-5
    alpha_bar = torch.cumprod(1.0 - betas, dim=0)
    return alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt()


_SQRT_ALPHA_BAR, _SQRT_ONE_MINUS_ALPHA_BAR = noise_schedule()


def add_diffusion_noise(image: torch.Tensor, noise: torch.Tensor, noise_step: int) -> torch.Tensor:
    r"""Forward diffusion to step k, clamped to pixel range: ``clamp(sqrt(ab_k) v + sqrt(1 - ab_k) eps, 0, 1)``.

    ``image`` holds pixel values in [0, 1]; ``noise`` is standard normal of the same shape (docs/method.md Eq. 2).
    """
    signal_scale = _SQRT_ALPHA_BAR[noise_step].item()
    noise_scale = _SQRT_ONE_MINUS_ALPHA_BAR[noise_step].item()
    return (signal_scale * image + noise_scale * noise).clamp_(0.0, 1.0)


def noise_seed(seed: int, step_key: int, image: Image.Image, frame: int | None = None) -> int:
    """A 63-bit generator seed from the training seed, the step key, the image's pixels and, for a video frame,
    its index (two equal frames of a still scene get independent noise)."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(f"{seed}/{step_key}/{image.mode}/{image.size}".encode())
    if frame is not None:
        digest.update(f"/frame {frame}".encode())
    digest.update(image.tobytes())
    return int.from_bytes(digest.digest(), "little") >> 1


def corrupt_image(
    image: Image.Image, corruption: str, noise_step: int, seed: int, step_key: int, frame: int | None = None
) -> Image.Image:
    """The corrupted copy of one RGB image (or frame ``frame`` of a video): diffusion noise at ``noise_step``, or a
    white image of the same size."""
    if corruption == "blank":
        return Image.new(image.mode, image.size, (255,) * len(image.getbands()))

    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
    generator = torch.Generator().manual_seed(noise_seed(seed, step_key, image, frame))
    noise = torch.randn(pixels.shape, generator=generator, dtype=torch.float32)
    noisy = add_diffusion_noise(pixels, noise, noise_step)
    return Image.fromarray((noisy * 255.0).round_().to(torch.uint8).numpy())
