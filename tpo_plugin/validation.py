"""Check preference data before the model is loaded, naming the dataset, sample and field of each problem.

LLaMA-Factory finds some of these problems only while it tokenises (with a traceback that names no
sample) and others not at all: a missing image file surfaces in the middle of training, an empty answer
trains silently. The checks run on the datasets as LLaMA-Factory has aligned them (``_prompt``,
``_response``, ``_images``), so paths are the ones training would open.
"""

import os
from io import BytesIO
from typing import Any, Iterable

from PIL import Image


MAX_REPORTED_PROBLEMS = 10


def image_problem(image: Any) -> str | None:
    """Why an image entry cannot be used, or ``None`` if it opens and decodes."""
    try:
        if isinstance(image, str):
            if not os.path.isfile(image):
                where = (
                    ""
                    if os.path.isabs(image)
                    else " (relative paths are looked up in `media_dir`, default `dataset_dir`)"
                )
                return f"image `{image}` does not exist{where}"
            source = image
        elif isinstance(image, dict) and image.get("bytes") is not None:
            source = BytesIO(image["bytes"])
        elif isinstance(image, dict) and image.get("path"):
            return image_problem(image["path"])
        elif isinstance(image, Image.Image):
            return None
        else:
            return f"image entry of type {type(image).__name__} is neither a path nor image bytes"

        with Image.open(source) as opened:
            opened.verify()
    except Exception as error:  # PIL raises many kinds; each means the same to the user
        return f"image `{image if isinstance(image, str) else '<bytes>'}` cannot be decoded ({error})"
    return None


def pair_problems(row: dict[str, Any], image_placeholder: str = "<image>") -> list[str]:
    """Problems of one aligned preference sample."""
    problems = []
    responses = row.get("_response") or []
    if len(responses) != 2 or not row.get("_prompt"):
        problems.append("is not a prompt with a chosen and a rejected answer (check its roles and turn order)")
    for side, response in zip(("chosen", "rejected"), responses, strict=False):
        if not str(response.get("content", "")).strip():
            problems.append(f"field `{side}` is empty")

    images = row.get("_images") or []
    placeholders = sum(
        str(message.get("content", "")).count(image_placeholder) for message in row.get("_prompt") or []
    )
    if placeholders != len(images):
        problems.append(f"has {placeholders} {image_placeholder} placeholder(s) but {len(images)} image(s)")
    problems.extend(problem for problem in map(image_problem, images) if problem)
    return problems


def check_preference_data(
    datasets: dict[str, Iterable[dict[str, Any]]], image_placeholder: str = "<image>"
) -> tuple[int, int]:
    """Raise one ``ValueError`` listing the problems of all samples; return (pairs, pairs without image).

    ``datasets`` maps each dataset name to its aligned rows.
    """
    problems, num_pairs, without_image = [], 0, 0
    for name, rows in datasets.items():
        for index, row in enumerate(rows):
            num_pairs += 1
            without_image += not row.get("_images")
            problems.extend(
                f"dataset `{name}`, sample {index}: {problem}" for problem in pair_problems(row, image_placeholder)
            )

    if problems:
        shown = "\n  ".join(problems[:MAX_REPORTED_PROBLEMS])
        more = (
            f"\n  ... and {len(problems) - MAX_REPORTED_PROBLEMS} more"
            if len(problems) > MAX_REPORTED_PROBLEMS
            else ""
        )
        raise ValueError(
            f"The preference data has {len(problems)} problem(s); fix them before training:\n  {shown}{more}"
        )
    return num_pairs, without_image
