"""LLaMA-Factory's private helpers that stage tpo reads, each through :func:`tpo_plugin.compat.require`.

Training must open, resize, align and cut data exactly as LLaMA-Factory will, or the corrupted images and the
data checks would disagree with what it trains on; LLaMA-Factory offers that only through private helpers.
They are read here and nowhere else, so a LLaMA-Factory whose internals moved fails at the first use, naming
the helper and the versions the plugin was written for. Together with :mod:`.patches` this module is all that
an upgrade of LLaMA-Factory needs read.
"""

from typing import Any, Callable

from ..compat import require


def image_resizer(mm_plugin: Any, processor: Any) -> Callable[[list[Any]], list[Any]]:
    """Resizes opened images exactly as ``mm_plugin.get_mm_inputs`` does (``BasePlugin._regularize_images``)."""
    regularize = require(mm_plugin, "_regularize_images")
    sizes = {
        "image_max_pixels": getattr(processor, "image_max_pixels", 768 * 768),
        "image_min_pixels": getattr(processor, "image_min_pixels", 32 * 32),
    }
    return lambda images: regularize(images, **sizes)["images"]


def video_frame_loader(mm_plugin: Any, processor: Any) -> Callable[[list[Any]], list[list[Any]]]:
    """Decodes videos into the frames ``mm_plugin.get_mm_inputs`` gives the model: the same frame sampling
    (``video_fps``, ``video_maxlen``) and resizing (``video_max_pixels``), as lists of frames
    (``BasePlugin._regularize_videos``)."""
    regularize = require(mm_plugin, "_regularize_videos")
    settings = {
        "image_max_pixels": getattr(processor, "video_max_pixels", 256 * 256),
        "image_min_pixels": getattr(processor, "video_min_pixels", 16 * 16),
        "video_fps": getattr(processor, "video_fps", 2.0),
        "video_maxlen": getattr(processor, "video_maxlen", 128),
    }
    return lambda videos: regularize(videos, **settings)["videos"]


def aligned_datasets(dataset_names: list[str] | None, model_args: Any, data_args: Any, training_args: Any) -> dict:
    """Each dataset as LLaMA-Factory aligns it before tokenising (``_prompt``, ``_response``, ``_images`` ...),
    by name (``loader._get_merged_dataset``)."""
    if not dataset_names:
        return {}
    from llamafactory.data import loader

    merged = require(loader, "_get_merged_dataset")
    return merged(dataset_names, model_args, data_args, training_args, stage="rm", return_dict=True)


def dataset_attributes(dataset_names: list[str] | None, dataset_dir: str) -> list[Any]:
    """The ``dataset_info.json`` entries of the named datasets (``parser.get_dataset_list``)."""
    from llamafactory.data import parser

    return require(parser, "get_dataset_list")(dataset_names, dataset_dir)


def kept_lengths(source_len: int, target_len: int, cutoff_len: int) -> tuple[int, int]:
    """How many prompt and answer tokens LLaMA-Factory keeps of a pair's row under ``cutoff_len``
    (``processor_utils.infer_seqlen``)."""
    from llamafactory.data.processor import processor_utils

    return require(processor_utils, "infer_seqlen")(source_len, target_len, cutoff_len)
