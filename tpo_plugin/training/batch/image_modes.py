"""Images of every PIL mode as the 8-bit RGB picture they show, before LLaMA-Factory converts them.

LLaMA-Factory 0.9.5 (``mm_plugin._preprocess_image``) calls ``image.convert("RGB")``, which is right for
8-bit modes (1, L, P, RGB, RGBX, CMYK, YCbCr, HSV) but destroys others: PIL clips 16- and 32-bit integers
to 255 (a 16-bit greyscale scan becomes all white), clips floats in [0, 1] to black, and drops the alpha
channel (a black drawing on a transparent background becomes all black). Those modes are converted here,
keeping the content; modes with no defined conversion are refused, naming the file and the mode.
"""

from io import BytesIO
from typing import Any

import numpy as np
from PIL import Image


# Modes whose RGB conversion by PIL shows what the file shows; LLaMA-Factory may convert them itself.
EIGHT_BIT_MODES = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "HSV")
ALPHA_MODES = ("LA", "PA", "RGBA", "RGBa")
WHITE = (255, 255, 255, 255)  # transparent areas are shown on white, as transformers' convert_to_rgb does
SUPPORTED_MODES = EIGHT_BIT_MODES + ALPHA_MODES + ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


class UnsupportedImageModeError(ValueError):
    """An image whose pixel values have no defined 8-bit RGB picture."""


def eight_bit_rgb(image: Image.Image) -> Image.Image:
    """``image`` as LLaMA-Factory's RGB conversion should see it: unchanged where that conversion is right."""
    mode = image.mode
    if mode in EIGHT_BIT_MODES and not image.has_transparency_data:
        return image
    if mode.startswith("I;16"):  # the file declares 16 bits: 0..65535 is black..white
        return _grey(np.asarray(image, dtype=np.float64) / 65535)
    if mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        return _grey(values / _white_level(values, mode))
    if mode in ALPHA_MODES or image.has_transparency_data:  # also P, L, RGB with a transparent colour
        return Image.alpha_composite(Image.new("RGBA", image.size, WHITE), image.convert("RGBA")).convert("RGB")
    raise UnsupportedImageModeError(
        f"has PIL mode {mode}, which has no defined 8-bit RGB conversion; save it as RGB "
        f"(supported modes: {', '.join(SUPPORTED_MODES)})"
    )


def mode_problem(image: Image.Image) -> str | None:
    """Why ``image`` cannot be converted to 8-bit RGB, or ``None``; loads pixels only for 32-bit modes."""
    try:
        if image.mode in ("I", "F"):
            _white_level(np.asarray(image, dtype=np.float64), image.mode)
        elif image.mode not in SUPPORTED_MODES:
            eight_bit_rgb(image)
    except UnsupportedImageModeError as error:
        return str(error)
    return None


def _white_level(values: np.ndarray, mode: str) -> float:
    """The value shown as white. 32-bit pixels carry no range, so it is read from the values: floats in
    [0, 1] (scientific images) or [0, 255]; integers in 0..255 (8-bit data saved as 32 bits) or 0..65535
    (PIL opens some 16-bit files as I). Anything else has no defined brightness and is refused."""
    if not np.isfinite(values).all():
        raise UnsupportedImageModeError(f"has PIL mode {mode} with non-finite pixel values")
    low, high = float(values.min()), float(values.max())
    levels = (1.0, 255.0) if mode == "F" else (255.0, 65535.0)
    for level in levels:
        if low >= 0 and high <= level:
            return level
    raise UnsupportedImageModeError(
        f"has PIL mode {mode} with pixel values in [{low:g}, {high:g}], outside "
        f"{' or '.join(f'[0, {level:g}]' for level in levels)}, so its brightness is undefined; save it as 8-bit"
    )


def _grey(unit: np.ndarray) -> Image.Image:
    """A greyscale picture from values in [0, 1], as 8-bit RGB."""
    return Image.fromarray(np.round(unit * 255).astype(np.uint8)).convert("RGB")


def open_image(image: Any) -> Any:
    """A path, bytes or ``{"bytes", "path"}`` entry opened as LLaMA-Factory's ``_regularize_images`` opens it."""
    if isinstance(image, str):
        return Image.open(image)
    if isinstance(image, bytes):
        return Image.open(BytesIO(image))
    if isinstance(image, dict):
        return Image.open(BytesIO(image["bytes"])) if image.get("bytes") is not None else Image.open(image["path"])
    return image
