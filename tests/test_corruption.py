"""Image corruption (docs/method.md §1): schedule, noise, clamping, reproducibility, blank images."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from tpo_plugin.method.noise import add_diffusion_noise, corrupt_image, noise_schedule, noise_seed


# docs/method.md Eq. 1, reference values: k -> (sqrt(alpha_bar_k), sqrt(1 - alpha_bar_k))
REFERENCE_SCHEDULE = {
    0: (1.0000, 0.0047),
    250: (0.9891, 0.1470),
    500: (0.8630, 0.5052),
    750: (0.5270, 0.8499),
    999: (0.2850, 0.9585),
}


@pytest.mark.parametrize("step", sorted(REFERENCE_SCHEDULE))
def test_noise_schedule_matches_reference_table(step):
    sqrt_alpha_bar, sqrt_one_minus_alpha_bar = noise_schedule()
    expected_signal, expected_noise = REFERENCE_SCHEDULE[step]
    assert sqrt_alpha_bar[step].item() == pytest.approx(expected_signal, abs=5e-5)
    assert sqrt_one_minus_alpha_bar[step].item() == pytest.approx(expected_noise, abs=5e-5)


def reference_alpha_bar(step: int) -> float:
    """alpha_bar_k computed with a plain loop over the betas of docs/method.md Eq. 1."""
    alpha_bar = 1.0
    for t in range(step + 1):
        x = -6.0 + 12.0 * t / 999
        beta = 1.0 / (1.0 + math.exp(-x)) * (5e-3 - 1e-5) + 1e-5
        alpha_bar *= 1.0 - beta
    return alpha_bar


def test_add_diffusion_noise_formula_and_clamp():
    image = torch.tensor([0.0, 0.25, 0.5, 1.0, 0.9, 0.1])
    noise = torch.tensor([0.3, -0.2, 1.0, 2.0, -3.0, -0.05])
    alpha_bar = reference_alpha_bar(750)
    expected = [
        min(1.0, max(0.0, math.sqrt(alpha_bar) * v + math.sqrt(1 - alpha_bar) * e))
        for v, e in zip(image.tolist(), noise.tolist(), strict=True)
    ]
    assert add_diffusion_noise(image, noise, 750).tolist() == pytest.approx(expected, abs=1e-6)
    assert expected[3] == 1.0 and expected[4] == 0.0  # the example does exercise the clamp


def rgb_image(width=20, height=12, seed=0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_diffusion_corruption_pixels_follow_formula():
    image = rgb_image()
    corrupted = corrupt_image(image, "diffusion", 500, seed=42, step_key=7)
    assert corrupted.size == image.size and corrupted.mode == "RGB"

    generator = torch.Generator().manual_seed(noise_seed(42, 7, image))
    noise = torch.randn((12, 20, 3), generator=generator).numpy().astype(np.float64)
    alpha_bar = reference_alpha_bar(500)
    clean = np.asarray(image, dtype=np.float64) / 255.0
    expected = np.clip(math.sqrt(alpha_bar) * clean + math.sqrt(1 - alpha_bar) * noise, 0.0, 1.0)
    expected = np.round(expected * 255.0)
    assert np.abs(np.asarray(corrupted, dtype=np.float64) - expected).max() <= 1.0


def test_noise_is_reproducible_and_keyed_by_seed_step_and_image():
    image = rgb_image()
    first = np.asarray(corrupt_image(image, "diffusion", 500, seed=1, step_key=3))
    again = np.asarray(corrupt_image(image, "diffusion", 500, seed=1, step_key=3))
    np.testing.assert_array_equal(first, again)

    other_step = np.asarray(corrupt_image(image, "diffusion", 500, seed=1, step_key=4))
    other_seed = np.asarray(corrupt_image(image, "diffusion", 500, seed=2, step_key=3))
    assert not np.array_equal(first, other_step)
    assert not np.array_equal(first, other_seed)
    assert noise_seed(1, 3, image) != noise_seed(1, 3, rgb_image(seed=1))


def test_noise_strength_grows_with_step():
    image = Image.new("RGB", (32, 32), (128, 128, 128))
    deviation = [
        np.abs(np.asarray(corrupt_image(image, "diffusion", step, 0, 0), dtype=float) - 128).mean()
        for step in (0, 250, 500, 999)
    ]
    assert deviation[0] < 2.0  # sqrt(1 - alpha_bar_0) = 0.0047: about one grey level
    assert deviation == sorted(deviation)


def test_blank_corruption_is_white_of_same_size():
    image = rgb_image(width=17, height=9)
    blank = corrupt_image(image, "blank", 500, seed=0, step_key=0)
    assert blank.size == (17, 9) and blank.mode == "RGB"
    assert np.asarray(blank).min() == 255
