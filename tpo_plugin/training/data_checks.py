"""Check the run's data and template before the model is loaded, naming the dataset, sample and field of each problem.

LLaMA-Factory finds some of these problems only while it tokenises (with a traceback that names no
sample) and others not at all: a missing image file surfaces in the middle of training, an empty answer
trains silently. The checks run on the datasets as LLaMA-Factory has aligned them (``_prompt``,
``_response``, ``_images``), so paths are the ones training would open.
"""

import os
from io import BytesIO
from typing import TYPE_CHECKING, Any, Iterable, Optional

from llamafactory.data import loader
from llamafactory.data.parser import get_dataset_list
from llamafactory.extras import logging
from llamafactory.extras.constants import IMAGE_PLACEHOLDER
from PIL import Image

from ..compat import require


if TYPE_CHECKING:
    from llamafactory.hparams import DataArguments, ModelArguments


logger = logging.get_logger("llamafactory.train.tpo")


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


def check_ranking_datasets(data_args: "DataArguments") -> None:
    """TPO trains on preference pairs: every dataset must be marked ``"ranking": true``."""
    for names in (data_args.dataset, data_args.eval_dataset):
        for name, dataset_attr in zip(names or [], get_dataset_list(names, data_args.dataset_dir), strict=True):
            if not dataset_attr.ranking:
                raise ValueError(
                    f"Dataset `{name}` ({dataset_attr}) is not a ranking (preference) dataset, but stage tpo "
                    'trains on chosen/rejected pairs: mark it `"ranking": true` in '
                    f"{data_args.dataset_dir}/dataset_info.json and give it `chosen` and `rejected` columns."
                )


def check_image_template(template: Any, template_name: Optional[str]) -> None:
    """TPO corrupts images, so the template's multimodal plugin must turn images into model inputs."""
    if template.mm_plugin.image_token is None:
        raise ValueError(
            f"Template `{template_name}` has no multimodal plugin for images, but stage tpo needs one; "
            "use the vision-language template of your model (e.g. qwen2_vl, qwen2_5_vl, qwen3_vl, llava, intern_vl)."
        )


def check_pairs(model_args: "ModelArguments", data_args: "DataArguments", training_args: Any) -> None:
    """Refuse bad samples (named) and image-free training data; image-less pairs train as DPO pairs (weight 1)."""
    for split, names in (("training", data_args.dataset), ("evaluation", data_args.eval_dataset)):
        datasets = aligned_datasets(names, model_args, data_args, training_args)
        if any(getattr(dataset, "column_names", None) is None for dataset in datasets.values()):
            logger.warning_rank0(f"The {split} data is streamed, so stage tpo cannot check it before training.")
            continue

        num_pairs, without_image = check_preference_data(datasets, IMAGE_PLACEHOLDER)
        if split == "training" and num_pairs and without_image == num_pairs:
            raise ValueError(
                "No training pair has an image, but stage tpo weights tokens by how much they depend on the image; "
                "check the `images` column of the dataset, or train with `stage: dpo`."
            )
        if without_image:
            logger.warning_rank0(
                f"{without_image} of {num_pairs} {split} pairs have no image; "
                "they train as plain DPO pairs (weight 1)."
            )


def aligned_datasets(dataset_names: list[str] | None, model_args: Any, data_args: Any, training_args: Any) -> dict:
    """Each dataset as LLaMA-Factory aligns it before tokenising (``_prompt``, ``_response``, ``_images`` ...)."""
    if not dataset_names:
        return {}
    merged = require(loader, "_get_merged_dataset")
    return merged(dataset_names, model_args, data_args, training_args, stage="rm", return_dict=True)
