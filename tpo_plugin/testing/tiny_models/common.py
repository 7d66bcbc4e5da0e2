"""The pieces every family shares: the tiny text-model sizes, the corpus, the tokenizer trainer and the demo images.

Each family's tokenizer is a byte-level BPE trained here on the same built-in corpus (sentences about the coloured
shapes that :func:`make_demo_images` draws, plus the chat templates' fixed text); only its special tokens differ.
Every text model has the sizes of ``_TEXT``, and every vision tower cuts images into ``_PATCH_SIZE`` patches
(Qwen3-VL's 16-pixel patches aside). ``SMALL_IMAGE_PIXELS`` and ``_mrope_section`` are Qwen2-VL's dynamic
resolution and M-RoPE split, kept here because GLM-4V and Qwen3.5 use them as well; ``_QWEN2_VL_SPECIAL_TOKENS``
because InternVL's text model is a Qwen2 that speaks Qwen's chat tokens.
"""

from __future__ import annotations

import itertools
import os
import pathlib
import random

from PIL import Image, ImageDraw
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast


# An upper bound: the corpus runs out of merges first, at about 520 tokens (256 of them single bytes).
_VOCAB_SIZE = 768
_PATCH_SIZE = 14


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


# At least 2 x 2 merged tokens, at most 4 x 4: a 56 x 56 image gives 4 tokens, a large one 16.
SMALL_IMAGE_PIXELS = {"min_pixels": 4 * (_PATCH_SIZE * 2) ** 2, "max_pixels": 16 * (_PATCH_SIZE * 2) ** 2}


def _mrope_section(head_dim: int) -> list[int]:
    """Split ``head_dim // 2`` frequencies as the real Qwen2-VL does (1/4 time, 3/8 height, 3/8 width)."""
    half = head_dim // 2
    spatial = 3 * half // 8
    return [half - 2 * spatial, spatial, spatial]


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
