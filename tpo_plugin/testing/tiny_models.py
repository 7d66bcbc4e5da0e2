"""Tiny random-weight vision-language models, built locally, for tests and the offline demo.

LLaMA-Factory can only train a model it loads from a directory, and no model may be downloaded here. This
module writes such a directory from nothing: a byte-level BPE tokenizer trained on a built-in corpus, a
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
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessor,
    Gemma3Processor,
    Glm4vConfig,
    Glm4vForConditionalGeneration,
    Glm4vImageProcessor,
    Glm4vMoeConfig,
    Glm4vMoeForConditionalGeneration,
    Glm4vProcessor,
    Glm4vVideoProcessor,
    GotOcr2ImageProcessor,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    InternVLVideoProcessor,
    Llama4Config,
    Llama4ForConditionalGeneration,
    Llama4ImageProcessor,
    Llama4Processor,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
    LlavaNextVideoProcessor,
    LlavaNextVideoVideoProcessor,
    LlavaProcessor,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MllamaConfig,
    MllamaForConditionalGeneration,
    MllamaImageProcessor,
    MllamaProcessor,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    PixtralImageProcessor,
    PixtralProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
    Qwen3_5Config,
    Qwen3_5ForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
    SiglipImageProcessor,
    VideoLlavaConfig,
    VideoLlavaForConditionalGeneration,
    VideoLlavaImageProcessor,
    VideoLlavaProcessor,
    VideoLlavaVideoProcessor,
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

# An upper bound: the corpus runs out of merges first, at about 520 tokens (256 of them single bytes).
_VOCAB_SIZE = 768
_PATCH_SIZE = 14
_LLAVA_IMAGE_SIZE = 2 * _PATCH_SIZE  # 2 x 2 patches: 4 image tokens per image, the CLS token dropped


def _llava_resize() -> dict[str, dict[str, int]]:
    """The CLIP-style resize and centre crop to ``_LLAVA_IMAGE_SIZE`` of every LLaVA family's processors."""
    return {
        "size": {"shortest_edge": _LLAVA_IMAGE_SIZE},
        "crop_size": {"height": _LLAVA_IMAGE_SIZE, "width": _LLAVA_IMAGE_SIZE},
    }


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
        **_llava_resize(),
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
        **_llava_resize(),
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


_INTERNVL_IMAGE_SIZE = 4 * _PATCH_SIZE  # 4 x 4 patches, pixel-shuffled (downsample ratio 0.5) into 4 tokens
_INTERNVL_SPECIAL_TOKENS = _QWEN2_VL_SPECIAL_TOKENS + ["<img>", "</img>", "<IMG_CONTEXT>", "<video>"]


def _build_internvl() -> tuple[InternVLForConditionalGeneration, InternVLProcessor]:
    """InternVL (the transformers port): an InternViT on one 56 x 56 tile per image, pixel-shuffled into 4
    ``<IMG_CONTEXT>`` tokens between ``<img>`` and ``</img>``, in front of a Qwen2 with Qwen's chat tokens."""
    bpe = _train_tokenizer(_INTERNVL_SPECIAL_TOKENS)
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        extra_special_tokens={
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
    )
    text_config = {
        **_TEXT,
        "model_type": "qwen2",
        "vocab_size": len(tokenizer),
        "max_position_embeddings": _MAX_POSITIONS,
        "bos_token_id": None,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision_config = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": [_INTERNVL_IMAGE_SIZE] * 2,
        "patch_size": [_PATCH_SIZE] * 2,
    }
    image_tokens = (_INTERNVL_IMAGE_SIZE // _PATCH_SIZE // 2) ** 2
    config = InternVLConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=image_tokens,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    size = {"height": _INTERNVL_IMAGE_SIZE, "width": _INTERNVL_IMAGE_SIZE}
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size=size, crop_to_patches=False),
        tokenizer=tokenizer,
        video_processor=InternVLVideoProcessor(size=size),
        image_seq_length=image_tokens,
    )
    return InternVLForConditionalGeneration(config), processor


def _special_tokenizer(special_tokens: list[str], **tokens: object) -> PreTrainedTokenizerFast:
    """A byte-level BPE whose first ids are ``special_tokens``; ``tokens`` name its eos, pad, bos, unk and
    ``extra_special_tokens`` (LLaMA-Factory's templates add bos themselves, so the tokenizer never does)."""
    bpe = _train_tokenizer(special_tokens)
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, **{"unk_token": None, **tokens})


def _text_sizes(tokenizer: PreTrainedTokenizerFast) -> dict:
    """The shared tiny text-model sizes, with the tokenizer's vocabulary and special ids."""
    return {
        **_TEXT,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": _MAX_POSITIONS,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


_SIGLIP_IMAGE_SIZE = 4 * _PATCH_SIZE  # 4 x 4 patches
_SIGLIP_VISION = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": _SIGLIP_IMAGE_SIZE,
    "patch_size": _PATCH_SIZE,
}
_GEMMA_SPECIAL_TOKENS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
]


def _gemma_text(tokenizer: PreTrainedTokenizerFast) -> dict:
    """A two-layer Gemma 3 text model: one sliding-window layer, one global, as Gemma 3 alternates them."""
    head_dim = _TEXT["hidden_size"] // _TEXT["num_attention_heads"]
    return {
        **_text_sizes(tokenizer),
        "head_dim": head_dim,
        "query_pre_attn_scalar": head_dim,
        "sliding_window": 16,
        "layer_types": ["sliding_attention", "full_attention"],
    }


def _build_gemma3() -> tuple[Gemma3ForConditionalGeneration, Gemma3Processor]:
    """Gemma 3: SigLIP on 56 x 56 images (4 x 4 patches, average-pooled to 4 soft tokens between
    ``<start_of_image>`` and ``<end_of_image>``), a Gemma 3 text model with bidirectional attention on images."""
    tokenizer = _special_tokenizer(
        _GEMMA_SPECIAL_TOKENS,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
    )
    image_tokens = 4
    config = Gemma3Config(
        text_config=_gemma_text(tokenizer),
        vision_config=_SIGLIP_VISION,
        mm_tokens_per_image=image_tokens,
        boi_token_index=tokenizer.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tokenizer.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=tokenizer.convert_tokens_to_ids("<image_soft_token>"),
    )
    model = Gemma3ForConditionalGeneration(config)
    # Gemma 3 initialises its image projection with zeros, which would make every image look the same.
    torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.5)
    image_processor = Gemma3ImageProcessor(size={"height": _SIGLIP_IMAGE_SIZE, "width": _SIGLIP_IMAGE_SIZE})
    return model, Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=image_tokens)


def _build_paligemma() -> tuple[PaliGemmaForConditionalGeneration, PaliGemmaProcessor]:
    """PaliGemma: SigLIP on 56 x 56 images, 16 image tokens prefixed to the prompt, a Gemma text model
    attending bidirectionally over image and prompt."""
    tokenizer = _special_tokenizer(
        _GEMMA_SPECIAL_TOKENS[:4] + ["<image>"],
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )
    image_tokens = (_SIGLIP_IMAGE_SIZE // _PATCH_SIZE) ** 2
    head_dim = _TEXT["hidden_size"] // _TEXT["num_attention_heads"]
    text_config = {**_text_sizes(tokenizer), "model_type": "gemma", "head_dim": head_dim}
    config = PaliGemmaConfig(
        text_config=text_config,
        vision_config={**_SIGLIP_VISION, "projection_dim": _TEXT["hidden_size"]},
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        projection_dim=_TEXT["hidden_size"],
        hidden_size=_TEXT["hidden_size"],
    )
    image_processor = SiglipImageProcessor(size={"height": _SIGLIP_IMAGE_SIZE, "width": _SIGLIP_IMAGE_SIZE})
    image_processor.image_seq_length = image_tokens
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return PaliGemmaForConditionalGeneration(config), processor


_MISTRAL_SPECIAL_TOKENS = [
    "<unk>",
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "[IMG]",
    "[IMG_BREAK]",
    "[IMG_END]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
    "[TOOL_CALLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
    "<pad>",
]
_PIXTRAL_LONGEST_EDGE = 4 * _PATCH_SIZE


def _pixtral_parts(spatial_merge_size: int) -> tuple[PreTrainedTokenizerFast, dict, dict, PixtralProcessor]:
    """Tokenizer, Mistral text config, Pixtral vision config and processor shared by Pixtral and Mistral 3.

    A 56 x 56 image is 4 x 4 patches; each row of image tokens ends in ``[IMG_BREAK]``, the last in ``[IMG_END]``.
    """
    tokenizer = _special_tokenizer(
        _MISTRAL_SPECIAL_TOKENS,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "[IMG]"},
    )
    text_config = {**_text_sizes(tokenizer), "model_type": "mistral", "sliding_window": None}
    head_dim = 64 // 4
    vision_config = {
        "model_type": "pixtral",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "head_dim": head_dim,
        "image_size": _PIXTRAL_LONGEST_EDGE,
        "patch_size": _PATCH_SIZE,
    }
    image_processor = PixtralImageProcessor(
        size={"longest_edge": _PIXTRAL_LONGEST_EDGE}, patch_size=_PATCH_SIZE * spatial_merge_size
    )
    processor = PixtralProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=_PATCH_SIZE,
        spatial_merge_size=spatial_merge_size,
    )
    return tokenizer, text_config, vision_config, processor


def _build_pixtral() -> tuple[LlavaForConditionalGeneration, PixtralProcessor]:
    """Pixtral (a LLaVA with a Pixtral vision encoder, variable image sizes, one token per patch) before a Mistral."""
    tokenizer, text_config, vision_config, processor = _pixtral_parts(spatial_merge_size=1)
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
    )
    return LlavaForConditionalGeneration(config), processor


def _build_mistral3() -> tuple[Mistral3ForConditionalGeneration, PixtralProcessor]:
    """Mistral 3 (Mistral-Small-3.1): a Pixtral vision encoder whose 2 x 2 patches are merged into one token."""
    tokenizer, text_config, vision_config, processor = _pixtral_parts(spatial_merge_size=2)
    config = Mistral3Config(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=2,
        vision_feature_layer=-1,
    )
    return Mistral3ForConditionalGeneration(config), processor


_GLM4V_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "[gMASK]",
    "<sop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
    "<|image|>",
    "<|video|>",
    "<think>",
    "</think>",
    "<answer>",
    "</answer>",
]


def _build_glm4v() -> tuple[Glm4vForConditionalGeneration, Glm4vProcessor]:
    """GLM-4.1V: Qwen2-VL-like dynamic resolution (14-pixel patches, 2 x 2 merged) with learned, interpolated
    position embeddings; a GLM-4 text model with partial rotary M-RoPE; a 56 x 56 image becomes 4 tokens."""
    tokenizer = _special_tokenizer(
        _GLM4V_SPECIAL_TOKENS,
        eos_token="<|user|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image|>", "video_token": "<|video|>"},
    )
    head_dim = _TEXT["hidden_size"] // _TEXT["num_attention_heads"]
    rotary = head_dim // 2  # partial_rotary_factor 0.5, as GLM-4.1V
    text_config = {
        **_text_sizes(tokenizer),
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 1e4,
            "partial_rotary_factor": 0.5,
            "mrope_section": _mrope_section(rotary),
        },
    }
    text_config.pop("bos_token_id")
    text_config.pop("eos_token_id")
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in _GLM4V_TOKEN_IDS.items()}
    config = Glm4vConfig(
        text_config=text_config,
        vision_config={
            "depth": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_heads": 4,
            "image_size": 4 * _PATCH_SIZE,
            "patch_size": _PATCH_SIZE,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": _TEXT["hidden_size"],
        },
        **ids,
    )
    pixels = {
        "size": {"shortest_edge": SMALL_IMAGE_PIXELS["min_pixels"], "longest_edge": SMALL_IMAGE_PIXELS["max_pixels"]}
    }
    processor = Glm4vProcessor(
        image_processor=Glm4vImageProcessor(**pixels),
        tokenizer=tokenizer,
        video_processor=Glm4vVideoProcessor(**pixels),
    )
    return Glm4vForConditionalGeneration(config), processor


_GLM4V_TOKEN_IDS = {
    "image_token_id": "<|image|>",
    "video_token_id": "<|video|>",
    "image_start_token_id": "<|begin_of_image|>",
    "image_end_token_id": "<|end_of_image|>",
    "video_start_token_id": "<|begin_of_video|>",
    "video_end_token_id": "<|end_of_video|>",
}


def _build_qwen3_vl_moe() -> tuple[Qwen3VLMoeForConditionalGeneration, Qwen3VLProcessor]:
    """Qwen3-VL MoE: Qwen3-VL's vision tower and processor before a text model of 4 experts, 2 active per token."""
    dense, processor = _build_qwen3_vl()
    text_config = dense.config.text_config.to_dict()
    for key in ("model_type", "architectures", "dtype", "transformers_version"):
        text_config.pop(key, None)
    text_config.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, decoder_sparse_step=1)
    config = Qwen3VLMoeConfig(
        text_config=text_config,
        vision_config={**dense.config.vision_config.to_dict(), "model_type": "qwen3_vl_moe"},
        **_qwen_token_ids(processor.tokenizer),
    )
    return Qwen3VLMoeForConditionalGeneration(config), processor


def _build_glm4v_moe() -> tuple[Glm4vMoeForConditionalGeneration, Glm4vProcessor]:
    """GLM-4.5V: GLM-4.1V's vision tower and processor before a text model of 4 routed experts (2 active per
    token) and a shared one, the first layer dense."""
    dense, processor = _build_glm4v()
    text_config = {
        key: value
        for key, value in dense.config.text_config.to_dict().items()
        if key not in ("model_type", "architectures", "dtype", "transformers_version")
    }
    text_config.update(
        num_key_value_heads=_TEXT["num_key_value_heads"],
        moe_intermediate_size=64,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
    )
    vision_config = {**dense.config.vision_config.to_dict(), "model_type": "glm4v_moe_vision"}
    ids = {name: getattr(dense.config, name) for name in _GLM4V_TOKEN_IDS}
    config = Glm4vMoeConfig(text_config=text_config, vision_config=vision_config, **ids)
    return Glm4vMoeForConditionalGeneration(config), processor


_LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|python_tag|>",
    "<|finetune_right_pad_id|>",
    "<|image|>",
]
_MLLAMA_TILE_SIZE = 2 * _PATCH_SIZE  # a 56 x 56 image fills 2 x 2 tiles of 2 x 2 patches


def _build_mllama() -> tuple[MllamaForConditionalGeneration, MllamaProcessor]:
    """Llama 3.2 Vision (Mllama): a tiled vision encoder whose features reach the text model only through
    cross-attention layers; one ``<|image|>`` token per image in the text."""
    tokenizer = _special_tokenizer(
        _LLAMA3_SPECIAL_TOKENS,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
        extra_special_tokens={"image_token": "<|image|>"},
    )
    max_tiles = 4
    vision_config = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_global_layers": 1,
        "attention_heads": 4,
        "intermediate_layers_indices": [0],
        "vision_output_dim": 2 * 64,  # the last hidden state and one intermediate layer, concatenated
        "image_size": _MLLAMA_TILE_SIZE,
        "patch_size": _PATCH_SIZE,
        "max_num_tiles": max_tiles,
        "supported_aspect_ratios": [[1, 1], [1, 2], [2, 1], [1, 3], [3, 1], [1, 4], [2, 2], [4, 1]],
    }
    text_config = {**_text_sizes(tokenizer), "cross_attention_layers": [1]}
    config = MllamaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids("<|image|>"),
    )
    image_processor = MllamaImageProcessor(
        size={"height": _MLLAMA_TILE_SIZE, "width": _MLLAMA_TILE_SIZE}, max_image_tiles=max_tiles
    )
    model = MllamaForConditionalGeneration(config)
    # The cross-attention gates start closed (tanh(0) = 0), which would hide every image from the text model.
    for name, param in model.named_parameters():
        if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
            torch.nn.init.constant_(param, 1.0)
    return model, MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer)


_LLAVA_VIDEO_SPECIAL_TOKENS = _LLAVA_SPECIAL_TOKENS + ["<video>"]


def _llava_video_tokenizer() -> PreTrainedTokenizerFast:
    """LLaVA-1.5's tokenizer with a ``<video>`` token, as the video LLaVAs have."""
    return _special_tokenizer(
        _LLAVA_VIDEO_SPECIAL_TOKENS,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
    )


def _llava_text_and_vision(tokenizer: PreTrainedTokenizerFast) -> tuple[dict, dict]:
    """LLaVA-1.5's tiny CLIP (28 x 28 images, 2 x 2 patches + CLS) and Llama, as configs."""
    vision = {
        "model_type": "clip_vision_model",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": _LLAVA_IMAGE_SIZE,
        "patch_size": _PATCH_SIZE,
        "projection_dim": 64,
    }
    return {**_text_sizes(tokenizer), "model_type": "llama"}, vision


def _build_video_llava() -> tuple[VideoLlavaForConditionalGeneration, VideoLlavaProcessor]:
    """Video-LLaVA: one CLIP tower for images and one for videos in front of a Llama; images as in LLaVA-1.5."""
    tokenizer = _llava_video_tokenizer()
    text_config, vision_config = _llava_text_and_vision(tokenizer)
    config = VideoLlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_seq_length=(_LLAVA_IMAGE_SIZE // _PATCH_SIZE) ** 2,
        video_seq_length=8 * ((_LLAVA_IMAGE_SIZE // _PATCH_SIZE) ** 2 + 1),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    processor = VideoLlavaProcessor(
        image_processor=VideoLlavaImageProcessor(
            **_llava_resize(),
        ),
        video_processor=VideoLlavaVideoProcessor(
            **_llava_resize(),
        ),
        tokenizer=tokenizer,
        patch_size=_PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return VideoLlavaForConditionalGeneration(config), processor


def _build_llava_next_video() -> tuple[LlavaNextVideoForConditionalGeneration, LlavaNextVideoProcessor]:
    """LLaVA-NeXT-Video: LLaVA-NeXT's any-resolution images, plus pooled video frames, before a Llama."""
    tokenizer = _llava_video_tokenizer()
    text_config, vision_config = _llava_text_and_vision(tokenizer)
    config = LlavaNextVideoConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=_LLAVA_NEXT_PINPOINTS,
        image_seq_length=(_LLAVA_IMAGE_SIZE // _PATCH_SIZE) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        spatial_pool_stride=2,
    )
    processor = LlavaNextVideoProcessor(
        image_processor=LlavaNextImageProcessor(**_llava_resize(), image_grid_pinpoints=_LLAVA_NEXT_PINPOINTS),
        video_processor=LlavaNextVideoVideoProcessor(**_llava_resize()),
        tokenizer=tokenizer,
        patch_size=_PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return LlavaNextVideoForConditionalGeneration(config), processor


_LLAMA4_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|header_start|>",
    "<|header_end|>",
    "<|eot|>",
    "<|eom|>",
    "<|finetune_right_pad|>",
    "<|image_start|>",
    "<|image_end|>",
    "<|image|>",
    "<|patch|>",
    "<|tile_x_separator|>",
    "<|tile_y_separator|>",
]
_LLAMA4_TILE_SIZE = 4 * _PATCH_SIZE  # a 56 x 56 image is one tile of 4 x 4 patches, pixel-shuffled into 4 tokens


def _build_llama4() -> tuple[Llama4ForConditionalGeneration, Llama4Processor]:
    """Llama 4: a vision encoder with 2-D rotary patches and pixel shuffle before a mixture-of-experts text model
    (2 experts, 1 active, and a shared one); an image is ``<|image_start|><|image|>`` and its ``<|patch|>`` tokens.

    Its image processor returns bfloat16 pixels, as Meta's code does, so the model trains in bfloat16 only.
    """
    tokenizer = _special_tokenizer(
        _LLAMA4_SPECIAL_TOKENS,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot|>",
        pad_token="<|finetune_right_pad|>",
    )
    head_dim = _TEXT["hidden_size"] // _TEXT["num_attention_heads"]
    text_config = {
        **_text_sizes(tokenizer),
        "intermediate_size_mlp": _TEXT["intermediate_size"],
        "head_dim": head_dim,
        "num_local_experts": 2,
        "num_experts_per_tok": 1,
        "attention_chunk_size": _MAX_POSITIONS,
    }
    vision_hidden, shuffle_ratio = 64, 0.5
    vision_config = {
        "hidden_size": vision_hidden,
        "intermediate_size": int(vision_hidden / shuffle_ratio**2),  # the pixel-shuffled width, as in Llama 4
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": _LLAMA4_TILE_SIZE,
        "patch_size": _PATCH_SIZE,
        "pixel_shuffle_ratio": shuffle_ratio,
        "projector_input_dim": _TEXT["hidden_size"],
        "projector_output_dim": _TEXT["hidden_size"],
        "vision_output_dim": _TEXT["hidden_size"],
    }
    config = Llama4Config(
        vision_config=vision_config,
        text_config=text_config,
        boi_token_index=tokenizer.convert_tokens_to_ids("<|image_start|>"),
        eoi_token_index=tokenizer.convert_tokens_to_ids("<|image_end|>"),
        image_token_index=tokenizer.convert_tokens_to_ids("<|patch|>"),
    )
    processor = Llama4Processor(
        image_processor=Llama4ImageProcessor(
            size={"height": _LLAMA4_TILE_SIZE, "width": _LLAMA4_TILE_SIZE}, max_patches=4
        ),
        tokenizer=tokenizer,
        patch_size=_PATCH_SIZE,
        pixel_shuffle_ratio=shuffle_ratio,
        fake_image_token="<|image|>",
        image_token="<|patch|>",
    )
    model = Llama4ForConditionalGeneration(config)
    # A strong image signal: the model runs in bfloat16 (see above), whose rounding would drown a faint one.
    torch.nn.init.normal_(model.multi_modal_projector.linear_1.weight, std=0.5)
    return model, processor


def _build_qwen3_5() -> tuple[Qwen3_5ForConditionalGeneration, Qwen3VLProcessor]:
    """Qwen3.5: Qwen3-VL's vision tower (without deepstack) and processor before a hybrid text model, one
    gated-delta-net linear-attention layer and one full-attention layer with partial rotary M-RoPE."""
    dense, processor = _build_qwen3_vl()
    tokenizer = processor.tokenizer
    head_dim = _TEXT["hidden_size"] // _TEXT["num_attention_heads"]
    text_config = {
        **_text_sizes(tokenizer),
        "head_dim": head_dim,
        "layer_types": ["linear_attention", "full_attention"],
        "linear_key_head_dim": head_dim,
        "linear_value_head_dim": head_dim,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 1e7,
            "partial_rotary_factor": 0.25,
            "mrope_interleaved": True,
            "mrope_section": _mrope_section(head_dim // 4),
        },
    }
    text_config.pop("bos_token_id")
    vision_config = {
        key: value
        for key, value in dense.config.vision_config.to_dict().items()
        if key not in ("model_type", "deepstack_visual_indexes", "architectures", "dtype", "transformers_version")
    }
    config = Qwen3_5Config(text_config=text_config, vision_config=vision_config, **_qwen_token_ids(tokenizer))
    return Qwen3_5ForConditionalGeneration(config), processor


_BUILDERS = {
    "qwen2_vl": _build_qwen2_vl,
    "llava": _build_llava,
    "qwen2_5_vl": _build_qwen2_5_vl,
    "qwen3_vl": _build_qwen3_vl,
    "llava_next": _build_llava_next,
    "internvl": _build_internvl,
    "gemma3": _build_gemma3,
    "paligemma": _build_paligemma,
    "pixtral": _build_pixtral,
    "mistral3": _build_mistral3,
    "glm4v": _build_glm4v,
    "qwen3_vl_moe": _build_qwen3_vl_moe,
    "glm4v_moe": _build_glm4v_moe,
    "mllama": _build_mllama,
    "video_llava": _build_video_llava,
    "llava_next_video": _build_llava_next_video,
    "llama4": _build_llama4,
    "qwen3_5": _build_qwen3_5,
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
