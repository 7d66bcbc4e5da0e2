"""Zhipu's families: GLM-4.1V and GLM-4.5V (``glm4v``, ``glm4v_moe``).

GLM-4.1V has Qwen2-VL-like dynamic resolution (it borrows the shared ``SMALL_IMAGE_PIXELS`` and M-RoPE split) with
learned, interpolated position embeddings and a GLM-4 text model. GLM-4.5V is built from GLM-4.1V: the same
tokenizer, processor and vision tower before a mixture-of-experts text model, with the same token ids
(``_GLM4V_TOKEN_IDS``).
"""

from __future__ import annotations

from transformers import (
    Glm4vConfig,
    Glm4vForConditionalGeneration,
    Glm4vImageProcessor,
    Glm4vMoeConfig,
    Glm4vMoeForConditionalGeneration,
    Glm4vProcessor,
    Glm4vVideoProcessor,
)

from .common import _PATCH_SIZE, _TEXT, SMALL_IMAGE_PIXELS, _mrope_section, _special_tokenizer, _text_sizes


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


BUILDERS = {
    "glm4v": _build_glm4v,
    "glm4v_moe": _build_glm4v_moe,
}
"""This group's families, by name, and their builders (see the package's ``_BUILDERS``)."""
