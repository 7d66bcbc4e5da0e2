"""Qwen's vision-language families: Qwen2-VL, Qwen2.5-VL, Qwen3-VL (dense and MoE) and Qwen3.5.

They share Qwen's special tokens and tokenizer (``qwen2_vl_tokenizer``), dynamic resolution (an image's token count
depends on its size, merged 2 x 2) and M-RoPE. Qwen3-VL MoE and Qwen3.5 are built from the dense Qwen3-VL: its
tokenizer, processor and vision tower, in front of a different text model. ``qwen2_vl_tokenizer``,
``qwen2_vl_config`` and ``qwen2_vl_processor`` are public: the benchmarks build larger Qwen2-VLs with them.
"""

from __future__ import annotations

from tokenizers import Tokenizer, processors
from transformers import (
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
)

from .common import (
    _MAX_POSITIONS,
    _PATCH_SIZE,
    _QWEN2_VL_SPECIAL_TOKENS,
    _TEXT,
    SMALL_IMAGE_PIXELS,
    _mrope_section,
    _text_sizes,
    _train_tokenizer,
)


def _build_qwen2_vl() -> tuple[Qwen2VLForConditionalGeneration, Qwen2VLProcessor]:
    """Qwen2-VL with Qwen's special tokens; a 56 x 56 image becomes 4 x 4 patches, merged into 4 tokens."""
    tokenizer = qwen2_vl_tokenizer(_train_tokenizer(_QWEN2_VL_SPECIAL_TOKENS))
    text = {**_TEXT, "vocab_size": len(tokenizer), "max_position_embeddings": _MAX_POSITIONS}
    vision = {"depth": 2, "embed_dim": 64, "num_heads": 4, "mlp_ratio": 2}
    config = qwen2_vl_config(tokenizer, text, vision, rope_theta=1e6)
    return Qwen2VLForConditionalGeneration(config), qwen2_vl_processor(tokenizer, **SMALL_IMAGE_PIXELS)


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


BUILDERS = {
    "qwen2_vl": _build_qwen2_vl,
    "qwen2_5_vl": _build_qwen2_5_vl,
    "qwen3_vl": _build_qwen3_vl,
    "qwen3_vl_moe": _build_qwen3_vl_moe,
    "qwen3_5": _build_qwen3_5,
}
"""This group's families, by name, and their builders (see the package's ``_BUILDERS``)."""
