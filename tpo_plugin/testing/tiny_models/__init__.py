"""Tiny random-weight vision-language models, built locally, for tests and the offline demo.

LLaMA-Factory can only train a model it loads from a directory, and no model may be downloaded here. This
package writes such a directory from nothing: a byte-level BPE tokenizer trained on a built-in corpus, a
model of well under a million parameters with random weights, and the family's processor. LLaMA-Factory
then runs its real pipeline on it (template, multimodal plugin, LoRA or full fine-tuning) in seconds on a
CPU.

The families, one per architecture of a LLaMA-Factory image template (``FAMILIES`` maps each to its template):

* ``qwen2_vl``: Qwen2-VL, whose image tokens depend on the image size (dynamic resolution, M-RoPE);
* ``llava``: LLaVA-1.5, a CLIP vision tower in front of a Llama, with a fixed number of image tokens;
* ``qwen2_5_vl``: Qwen2.5-VL (windowed vision attention, SwiGLU merger), trained with the ``qwen2_vl`` template;
* ``qwen3_vl``: Qwen3-VL dense (16-pixel patches, learned position embeddings, deepstack features, QK-norm);
* ``llava_next``: LLaVA-NeXT, LLaVA with any-resolution tiles (the image tokens depend on the image size);
* ``internvl``: InternVL, the transformers port (InternViT tiles, pixel shuffle, a Qwen2);
* ``gemma3``, ``paligemma``: SigLIP before Gemma 3 (pooled soft tokens) or Gemma (image tokens as a prefix);
* ``pixtral``, ``mistral3``: Pixtral's variable-size vision encoder before a Mistral, in a LLaVA or Mistral 3;
* ``glm4v``, ``glm4v_moe``: GLM-4.1V and GLM-4.5V (MoE text), Qwen2-VL-like dynamic resolution;
* ``qwen3_vl_moe``, ``qwen3_5``: Qwen3-VL with a MoE text model; Qwen3.5's hybrid linear-attention text model;
* ``video_llava``, ``llava_next_video``: the video LLaVAs, whose image path TPO corrupts;
* ``mllama``: Llama 3.2 Vision, images reaching the text model through cross-attention;
* ``llama4``: Llama 4 (pixel shuffle, MoE text), bfloat16 only.

The builders live in one module per family group (``qwen``, ``llava``, ``internvl``, ``gemma``, ``mistral``,
``glm``, ``llama``), each listing its own in a ``BUILDERS`` dict of family name to builder; the groups import only
``common`` (the text sizes, corpus, tokenizer trainer and demo images that all families share), never each
other. This module is the registry that gathers them (``_BUILDERS``) and the build itself: it seeds, calls the
family's builder and writes the directory with its completion marker.

Only the standard library, torch, tokenizers, PIL and transformers are imported, never llamafactory, so
tests can build a model before LLaMA-Factory is configured.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from collections.abc import Callable

import torch

from . import gemma, glm, internvl, llama, llava, mistral, qwen

# Re-exported: the benchmarks build their own Qwen2-VLs with the same tokenizer, config and processor helpers.
from .common import _QWEN2_VL_SPECIAL_TOKENS as _QWEN2_VL_SPECIAL_TOKENS
from .common import SMALL_IMAGE_PIXELS as SMALL_IMAGE_PIXELS
from .common import _train_tokenizer as _train_tokenizer
from .common import make_demo_images
from .qwen import qwen2_vl_config as qwen2_vl_config
from .qwen import qwen2_vl_processor as qwen2_vl_processor
from .qwen import qwen2_vl_tokenizer as qwen2_vl_tokenizer


__all__ = ["FAMILIES", "OFFLINE_ENV", "build_tiny_model", "make_demo_images"]

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DISABLE_VERSION_CHECK": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_DISABLED": "true",
}
"""Environment for LLaMA-Factory processes that must not reach any hub (the tiny models are local)."""

FAMILIES = {
    "qwen2_vl": "qwen2_vl",
    "llava": "llava",
    "qwen2_5_vl": "qwen2_vl",
    "qwen3_vl": "qwen3_vl",
    "llava_next": "llava_next",
    "internvl": "intern_vl",
    "gemma3": "gemma3",
    "paligemma": "paligemma",
    "pixtral": "pixtral",
    "mistral3": "mistral_small",
    "glm4v": "glm4v",
    "qwen3_vl_moe": "qwen3_vl",
    "glm4v_moe": "glm4_5v",
    "mllama": "mllama",
    "video_llava": "video_llava",
    "llava_next_video": "llava_next_video",
    "llama4": "llama4",
    "qwen3_5": "qwen3_5",
}
"""Supported families, each mapped to the LLaMA-Factory ``template`` that trains it."""

# Written last into a finished build, so that a directory holding it is complete. Bump the version when
# the builder changes, so that stale builds in a reused directory are rebuilt rather than trusted.
_MARKER = "tiny_model.json"
_BUILD_VERSION = 1


_GROUPS = (qwen, llava, internvl, gemma, mistral, glm, llama)


def _registry() -> dict[str, Callable[[], tuple]]:
    """Every group's ``BUILDERS``, in the order of ``FAMILIES``; each family registered once, none missing."""
    builders = {}
    for group in _GROUPS:
        for family, build in group.BUILDERS.items():
            if family in builders:
                raise ValueError(f"Family {family!r} is registered by two groups.")
            builders[family] = build
    if builders.keys() != FAMILIES.keys():
        raise ValueError(f"Builders {sorted(builders)} do not match FAMILIES {sorted(FAMILIES)}.")
    return {family: builders[family] for family in FAMILIES}


_BUILDERS = _registry()
"""Family name -> builder: a function of no arguments returning the random-weight model and its processor."""


def build_tiny_model(family: str, output_dir: str | os.PathLike, seed: int = 0) -> pathlib.Path:
    """Build a tiny random-weight model, its tokenizer and processor into ``output_dir``; return the directory.

    The directory loads with ``AutoModelForImageTextToText``, ``AutoTokenizer`` and ``AutoProcessor`` and
    trains with LLaMA-Factory under the template ``FAMILIES[family]``. The files depend only on
    ``family`` and ``seed``, byte for byte, and the caller's torch RNG state is left untouched. A
    directory that already holds a complete build of the same family, seed and builder version is
    returned as it is, so tests can share one build; anything else there of an earlier build is replaced.
    """
    if family not in FAMILIES:
        raise ValueError(f"Unknown family {family!r}; expected one of {sorted(FAMILIES)}.")

    output_dir = pathlib.Path(output_dir)
    identity = {"family": family, "seed": seed, "version": _BUILD_VERSION}
    if _is_complete(output_dir, identity):
        return output_dir

    output_dir.mkdir(parents=True, exist_ok=True)
    _remove_previous_build(output_dir, identity)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, processor = _BUILDERS[family]()

    files = _save(model, processor, output_dir)
    _write_json_atomically(output_dir / _MARKER, {**identity, "files": files})
    return output_dir


def _save(model, processor, output_dir: pathlib.Path) -> list[str]:
    """Save model, tokenizer and processor; return the names of the files written.

    Everything is saved into a staging directory first and then moved file by file: each file appears
    whole, and a concurrent build of the same seed (pytest-xdist) only swaps in identical bytes.
    """
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".building-") as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)  # the tokenizer too
        names = sorted(path.name for path in pathlib.Path(staging).iterdir())
        for name in names:
            os.replace(pathlib.Path(staging, name), output_dir / name)
    return names


def _is_complete(output_dir: pathlib.Path, identity: dict) -> bool:
    """Whether ``output_dir`` holds a finished build of ``identity``, all its files still present."""
    marker = _read_marker(output_dir)
    if marker is None or {key: marker.get(key) for key in identity} != identity:
        return False
    files = marker.get("files") or []
    return bool(files) and all((output_dir / name).is_file() for name in files)


def _remove_previous_build(output_dir: pathlib.Path, identity: dict) -> None:
    """Drop the marker first (the directory is about to change), then the files of the build it recorded.

    Another family may write files this one does not, and those must not linger beside the new build. A
    build of the same identity is left alone: it is about to be overwritten with identical bytes, and it
    may be a concurrent builder's finished work that a reader is already using.
    """
    previous = _read_marker(output_dir) or {}
    if {key: previous.get(key) for key in identity} == identity:
        return
    (output_dir / _MARKER).unlink(missing_ok=True)
    for name in previous.get("files") or []:
        (output_dir / name).unlink(missing_ok=True)


def _read_marker(output_dir: pathlib.Path) -> dict | None:
    """The marker of a finished build in ``output_dir``, or None if there is none or it is unreadable."""
    try:
        marker = json.loads((output_dir / _MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _write_json_atomically(path: pathlib.Path, payload: dict) -> None:
    """Write through a temporary file and rename it, so a reader never sees half a marker."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(payload, indent=2, sort_keys=True))
    os.replace(temporary, path)
