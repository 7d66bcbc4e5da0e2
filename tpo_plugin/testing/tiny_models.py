"""Tiny random-weight vision-language models, built locally, for tests and the offline demo.

LLaMA-Factory can only train a model it loads from a directory, and no model may be downloaded here. This
module writes such a directory from nothing: a byte-level BPE tokenizer trained on a built-in corpus, a
model of well under a million parameters with random weights, and the family's processor. LLaMA-Factory
then runs its real pipeline on it (template, multimodal plugin, LoRA or full fine-tuning) in seconds on a
CPU.

The families, one per kind of multimodal plugin in LLaMA-Factory and the Qwen generations users train:

* ``qwen2_vl``: Qwen2-VL, whose image tokens depend on the image size (dynamic resolution, M-RoPE);
* ``llava``: LLaVA-1.5, a CLIP vision tower in front of a Llama, with a fixed number of image tokens;
* ``qwen2_5_vl``: Qwen2.5-VL (windowed vision attention, SwiGLU merger), trained with the ``qwen2_vl`` template;
* ``qwen3_vl``: Qwen3-VL dense (16-pixel patches, learned position embeddings, deepstack features, QK-norm);
* ``llava_next``: LLaVA-NeXT, LLaVA with any-resolution tiles (the image tokens depend on the image size).

Only the standard library, torch, tokenizers, PIL and transformers are imported, never llamafactory, so
tests can build a model before LLaMA-Factory is configured.
"""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import random
import tempfile

import torch
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)


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
}
"""Supported families, each mapped to the LLaMA-Factory ``template`` that trains it."""

# Written last into a finished build, so that a directory holding it is complete. Bump the version when
# the builder changes, so that stale builds in a reused directory are rebuilt rather than trusted.
_MARKER = "tiny_model.json"
_BUILD_VERSION = 1

# An upper bound: the corpus runs out of merges first, at about 520 tokens (256 of them single bytes).
_VOCAB_SIZE = 768
_PATCH_SIZE = 14
_LLAVA_IMAGE_SIZE = 2 * _PATCH_SIZE  # 2 x 2 patches: 4 image tokens per image, the CLS token dropped

# Text model shared by both families: 4 heads of 32 dimensions, so Qwen2-VL's M-RoPE has 16 frequencies
# to split between time, height and width.
_TEXT = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
_MAX_POSITIONS = 2048

_QWEN2_VL_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
_LLAVA_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<image>", "<pad>"]

_COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "orange": (240, 140, 30),
    "purple": (140, 60, 180),
    "pink": (240, 130, 180),
    "brown": (130, 80, 40),
    "black": (20, 20, 20),
    "white": (245, 245, 245),
}
_SHAPES = ["circle", "square", "triangle"]
_OBJECTS = ["ball", "box", "cup", "car", "dog", "cat", "bird", "tree", "flower", "house", "apple", "kite"] + _SHAPES
_SENTENCES = [
    "A {colour} {obj}.",
    "There is a {colour} {obj} in the picture.",
    "The image shows a {colour} {obj} on a plain background.",
    "I can see one {colour} {obj} and nothing else.",
]
# Chat-template boilerplate and prompts of the tests, so that they encode to few tokens.
_FIXED_TEXT = [
    "You are a helpful assistant.",
    (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    ),
    "system\nuser\nassistant\nUSER: ASSISTANT:",
    "What is in the picture? What colour is it? Describe the image. What shape do you see?",
    "Yes. No. It is small. It is large. The picture is empty. A red ball and a dog.",
]


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


def make_demo_images(output_dir: str | os.PathLike, count: int, size: int = 56, seed: int = 0) -> list[pathlib.Path]:
    """Draw ``count`` PNGs of one coloured shape each on a light background; return their paths.

    The content is in the file name, ``{index:03d}-{colour}-{shape}.png`` (for example
    ``000-red-circle.png``), so that a caller can write truthful and false answers about each image.
    """
    output_dir = pathlib.Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for index in range(count):
        colour, shape = rng.choice([c for c in _COLOURS if c != "white"]), rng.choice(_SHAPES)
        path = output_dir / f"{index:03d}-{colour}-{shape}.png"
        _draw_shape(shape, _COLOURS[colour], size, rng).save(path)
        paths.append(path)
    return paths


def _draw_shape(shape: str, fill: tuple[int, int, int], size: int, rng: random.Random) -> Image.Image:
    """One shape, half the image wide, at a random spot, so images of the same content still differ."""
    background = tuple(rng.randint(225, 255) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    extent = size // 2
    left, top = rng.randint(0, size - extent), rng.randint(0, size - extent)
    box = (left, top, left + extent - 1, top + extent - 1)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(left + extent // 2, top), (box[2], box[3]), (left, box[3])], fill=fill)
    return image


def _corpus() -> list[str]:
    """A few hundred short sentences about coloured objects, plus the chat templates' fixed text."""
    combos = itertools.product(_SENTENCES, _COLOURS, _OBJECTS)
    return [sentence.format(colour=c, obj=o) for sentence, c, o in combos] + _FIXED_TEXT


def _train_tokenizer(
    special_tokens: list[str], corpus: list[str] | None = None, vocab_size: int = _VOCAB_SIZE
) -> Tokenizer:
    """Train a byte-level BPE on ``corpus`` (the built-in one by default); the special tokens take the first ids.

    Byte-level BPE encodes any text, so prompts outside the corpus still work, only in more tokens.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus() if corpus is None else corpus, trainer=trainer)
    return tokenizer


def _build_qwen2_vl() -> tuple[Qwen2VLForConditionalGeneration, Qwen2VLProcessor]:
    """Qwen2-VL with Qwen's special tokens; a 56 x 56 image becomes 4 x 4 patches, merged into 4 tokens."""
    tokenizer = qwen2_vl_tokenizer(_train_tokenizer(_QWEN2_VL_SPECIAL_TOKENS))
    text = {**_TEXT, "vocab_size": len(tokenizer), "max_position_embeddings": _MAX_POSITIONS}
    vision = {"depth": 2, "embed_dim": 64, "num_heads": 4, "mlp_ratio": 2}
    config = qwen2_vl_config(tokenizer, text, vision, rope_theta=1e6)
    return Qwen2VLForConditionalGeneration(config), qwen2_vl_processor(tokenizer, **SMALL_IMAGE_PIXELS)


# At least 2 x 2 merged tokens, at most 4 x 4: a 56 x 56 image gives 4 tokens, a large one 16.
SMALL_IMAGE_PIXELS = {"min_pixels": 4 * (_PATCH_SIZE * 2) ** 2, "max_pixels": 16 * (_PATCH_SIZE * 2) ** 2}


def qwen2_vl_tokenizer(bpe: Tokenizer) -> PreTrainedTokenizerFast:
    """A trained byte-level BPE whose first ids are ``_QWEN2_VL_SPECIAL_TOKENS``, as Qwen2-VL's tokenizer."""
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",  # as in Qwen2-VL-Instruct; LLaMA-Factory's template replaces it with the same
        pad_token="<|endoftext|>",
        unk_token=None,
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )


def qwen2_vl_config(
    tokenizer: PreTrainedTokenizerFast, text: dict, vision: dict, rope_theta: float, **config: object
) -> Qwen2VLConfig:
    """A Qwen2-VL config of the given text and vision shapes, its special token ids taken from ``tokenizer``.

    ``text`` holds the text model's sizes, vocabulary and positions included; ``vision`` the vision tower's
    (depth, embed_dim, num_heads, mlp_ratio); the merger projects straight into the text model.
    """
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in _QWEN2_VL_SPECIAL_TOKENS}
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    return Qwen2VLConfig(
        text_config=dict(
            **text,
            # M-RoPE splits the head_dim / 2 rotary frequencies between time, height and width.
            rope_parameters={
                "rope_type": "default",
                "rope_theta": rope_theta,
                "mrope_section": _mrope_section(head_dim),
            },
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config={
            **vision,
            "hidden_size": text["hidden_size"],
            "patch_size": _PATCH_SIZE,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        **config,
    )


def qwen2_vl_processor(tokenizer: PreTrainedTokenizerFast, **pixels: int) -> Qwen2VLProcessor:
    """Qwen2-VL's processor around ``tokenizer``; ``pixels`` (min_pixels, max_pixels) bound the image size."""
    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**pixels),
    )


def _mrope_section(head_dim: int) -> list[int]:
    """Split ``head_dim // 2`` frequencies as the real Qwen2-VL does (1/4 time, 3/8 height, 3/8 width)."""
    half = head_dim // 2
    spatial = 3 * half // 8
    return [half - 2 * spatial, spatial, spatial]


def _build_llava() -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """LLaVA-1.5: CLIP on 28 x 28 images (2 x 2 patches + CLS), a Llama, ``<image>`` expanded to 4 tokens."""
    bpe = _train_tokenizer(_LLAVA_SPECIAL_TOKENS)
    # Like Llama's tokenizer, prepend <s> when asked for special tokens (LLaMA-Factory never asks).
    bos_id = bpe.token_to_id("<s>")
    bpe.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )

    vision_config = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=_LLAVA_IMAGE_SIZE,
        patch_size=_PATCH_SIZE,
        projection_dim=64,
    )
    text_config = LlamaConfig(
        **_TEXT,
        vocab_size=len(tokenizer),
        max_position_embeddings=_MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    num_patches = (_LLAVA_IMAGE_SIZE // _PATCH_SIZE) ** 2
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=num_patches,
        vision_feature_select_strategy="default",  # drop CLS: one token per patch
        vision_feature_layer=-2,
    )
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": _LLAVA_IMAGE_SIZE},
        crop_size={"height": _LLAVA_IMAGE_SIZE, "width": _LLAVA_IMAGE_SIZE},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=_PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, which "default" then drops
        image_token="<image>",
    )
    return LlavaForConditionalGeneration(config), processor


def _build_qwen2_5_vl() -> tuple[Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor]:
    """Qwen2.5-VL with Qwen's special tokens: windowed vision attention (one window of 2 x 2 merged tokens) in
    the first block, full attention in the second; a 56 x 56 image becomes 4 tokens, as for Qwen2-VL."""
    tokenizer = qwen2_vl_tokenizer(_train_tokenizer(_QWEN2_VL_SPECIAL_TOKENS))
    text = {**_TEXT, "vocab_size": len(tokenizer), "max_position_embeddings": _MAX_POSITIONS}
    ids = _qwen_token_ids(tokenizer)
    config = Qwen2_5_VLConfig(
        text_config=_qwen_text_config(tokenizer, text, rope_theta=1e6),
        vision_config={
            "depth": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_heads": 4,
            "out_hidden_size": text["hidden_size"],
            "patch_size": _PATCH_SIZE,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 2 * 2 * _PATCH_SIZE,
            "fullatt_block_indexes": [1],
        },
        **ids,
    )
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**SMALL_IMAGE_PIXELS),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**SMALL_IMAGE_PIXELS),
    )
    return Qwen2_5_VLForConditionalGeneration(config), processor


_QWEN3_VL_PATCH_SIZE = 16
# As SMALL_IMAGE_PIXELS for 16-pixel patches: a 56 x 56 image is resized to 64 x 64, 2 x 2 merged tokens.
_QWEN3_VL_PIXELS = {
    "min_pixels": 4 * (_QWEN3_VL_PATCH_SIZE * 2) ** 2,
    "max_pixels": 16 * (_QWEN3_VL_PATCH_SIZE * 2) ** 2,
}


def _build_qwen3_vl() -> tuple[Qwen3VLForConditionalGeneration, Qwen3VLProcessor]:
    """Qwen3-VL (dense): 16-pixel patches with learned position embeddings, deepstack features from both vision
    blocks, interleaved M-RoPE and QK-norm in the text model; a 56 x 56 image becomes 4 tokens."""
    tokenizer = qwen2_vl_tokenizer(_train_tokenizer(_QWEN2_VL_SPECIAL_TOKENS + ["<think>", "</think>"]))
    text = {**_TEXT, "vocab_size": len(tokenizer), "max_position_embeddings": _MAX_POSITIONS}
    text_config = _qwen_text_config(tokenizer, text, rope_theta=5e6)
    text_config["rope_parameters"]["mrope_interleaved"] = True
    text_config["head_dim"] = text["hidden_size"] // text["num_attention_heads"]
    text_config.pop("bos_token_id")
    text_config.pop("eos_token_id")
    config = Qwen3VLConfig(
        text_config=text_config,
        vision_config={
            "depth": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_heads": 4,
            "out_hidden_size": text["hidden_size"],
            "patch_size": _QWEN3_VL_PATCH_SIZE,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "num_position_embeddings": 16,  # a 4 x 4 grid, interpolated to other sizes
            "deepstack_visual_indexes": [0, 1],
        },
        **_qwen_token_ids(tokenizer),
    )
    image_processor = Qwen2VLImageProcessor(
        patch_size=_QWEN3_VL_PATCH_SIZE, image_mean=[0.5] * 3, image_std=[0.5] * 3, **_QWEN3_VL_PIXELS
    )
    video_processor = Qwen3VLVideoProcessor(
        patch_size=_QWEN3_VL_PATCH_SIZE, image_mean=[0.5] * 3, image_std=[0.5] * 3, **_QWEN3_VL_PIXELS
    )
    processor = Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor)
    return Qwen3VLForConditionalGeneration(config), processor


def _qwen_token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """The vision token ids a Qwen-VL config names, taken from ``tokenizer``."""
    names = {"image": "<|image_pad|>", "video": "<|video_pad|>"}
    ids = {f"{kind}_token_id": tokenizer.convert_tokens_to_ids(token) for kind, token in names.items()}
    ids["vision_start_token_id"] = tokenizer.convert_tokens_to_ids("<|vision_start|>")
    ids["vision_end_token_id"] = tokenizer.convert_tokens_to_ids("<|vision_end|>")
    return ids


def _qwen_text_config(tokenizer: PreTrainedTokenizerFast, text: dict, rope_theta: float) -> dict:
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    return dict(
        **text,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta, "mrope_section": _mrope_section(head_dim)},
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


# LLaVA-NeXT's any-resolution grids: an image is cut into 1 or 2 x 2 tiles of 28 x 28 beside a 28 x 28 overview.
_LLAVA_NEXT_PINPOINTS = [[28, 28], [28, 56], [56, 28], [56, 56]]


def _build_llava_next() -> tuple[LlavaNextForConditionalGeneration, LlavaNextProcessor]:
    """LLaVA-NeXT: LLaVA-1.5's tokenizer, tiny CLIP and Llama; each image an overview plus any-resolution tiles."""
    llava, llava_processor = _build_llava()
    tokenizer = llava_processor.tokenizer
    config = LlavaNextConfig(
        vision_config=llava.config.vision_config,
        text_config=llava.config.text_config,
        image_token_index=llava.config.image_token_index,
        image_grid_pinpoints=_LLAVA_NEXT_PINPOINTS,
        image_seq_length=llava.config.image_seq_length,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": _LLAVA_IMAGE_SIZE},
        crop_size={"height": _LLAVA_IMAGE_SIZE, "width": _LLAVA_IMAGE_SIZE},
        image_grid_pinpoints=_LLAVA_NEXT_PINPOINTS,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=_PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, which "default" then drops
        image_token="<image>",
    )
    return LlavaNextForConditionalGeneration(config), processor


_BUILDERS = {
    "qwen2_vl": _build_qwen2_vl,
    "llava": _build_llava,
    "qwen2_5_vl": _build_qwen2_5_vl,
    "qwen3_vl": _build_qwen3_vl,
    "llava_next": _build_llava_next,
}


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
