"""The LLaVA families: LLaVA-1.5, LLaVA-NeXT, Video-LLaVA and LLaVA-NeXT-Video.

All four put a tiny CLIP vision tower (28 x 28 images, 2 x 2 patches plus CLS, the CLS token dropped) in front of a
Llama, with LLaVA's special tokens and the same CLIP-style resize and crop (``_llava_resize``). LLaVA-NeXT is built
from LLaVA-1.5 (its tokenizer, CLIP and Llama) and adds any-resolution tiles; the two video LLaVAs add a
``<video>`` token (``_llava_video_tokenizer``) and share their text and vision configs (``_llava_text_and_vision``).
"""

from __future__ import annotations

from tokenizers import processors
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
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
    LlavaNextVideoProcessor,
    LlavaNextVideoVideoProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    VideoLlavaConfig,
    VideoLlavaForConditionalGeneration,
    VideoLlavaImageProcessor,
    VideoLlavaProcessor,
    VideoLlavaVideoProcessor,
)

from .common import _MAX_POSITIONS, _PATCH_SIZE, _TEXT, _special_tokenizer, _text_sizes, _train_tokenizer


_LLAVA_IMAGE_SIZE = 2 * _PATCH_SIZE  # 2 x 2 patches: 4 image tokens per image, the CLS token dropped


def _llava_resize() -> dict[str, dict[str, int]]:
    """The CLIP-style resize and centre crop to ``_LLAVA_IMAGE_SIZE`` of every LLaVA family's processors."""
    return {
        "size": {"shortest_edge": _LLAVA_IMAGE_SIZE},
        "crop_size": {"height": _LLAVA_IMAGE_SIZE, "width": _LLAVA_IMAGE_SIZE},
    }


_LLAVA_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<image>", "<pad>"]


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


BUILDERS = {
    "llava": _build_llava,
    "llava_next": _build_llava_next,
    "video_llava": _build_video_llava,
    "llava_next_video": _build_llava_next_video,
}
"""This group's families, by name, and their builders (see the package's ``_BUILDERS``)."""
