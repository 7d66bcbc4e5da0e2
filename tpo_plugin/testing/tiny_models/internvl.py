"""InternVL, the transformers port: an InternViT whose features are pixel-shuffled in front of a Qwen2.

It has a module of its own: its vision side (tiles, pixel shuffle, ``<img>``/``<IMG_CONTEXT>`` tokens, the
GOT-OCR2 image processor) shares nothing with the other families. Its text side speaks Qwen's chat tokens, which
it takes from the shared module (``_QWEN2_VL_SPECIAL_TOKENS``) rather than from the Qwen families.
"""

from __future__ import annotations

from tokenizers import processors
from transformers import (
    GotOcr2ImageProcessor,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    InternVLVideoProcessor,
    PreTrainedTokenizerFast,
)

from .common import _MAX_POSITIONS, _PATCH_SIZE, _QWEN2_VL_SPECIAL_TOKENS, _TEXT, _train_tokenizer


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


BUILDERS = {
    "internvl": _build_internvl,
}
"""This group's families, by name, and their builders (see the package's ``_BUILDERS``)."""
