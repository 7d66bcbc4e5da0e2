"""Mistral's families: Pixtral and Mistral 3 (Mistral-Small-3.1).

Both put Pixtral's variable-size vision encoder before a Mistral text model, with Mistral's special tokens and
Pixtral's processor; ``_pixtral_parts`` builds that tokenizer, both configs and the processor for either. They
differ in the wrapper (a LLaVA for Pixtral, Mistral 3's own) and in whether 2 x 2 patches merge into one token.
"""

from __future__ import annotations

from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    PixtralImageProcessor,
    PixtralProcessor,
    PreTrainedTokenizerFast,
)

from .common import _PATCH_SIZE, _special_tokenizer, _text_sizes


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


BUILDERS = {
    "pixtral": _build_pixtral,
    "mistral3": _build_mistral3,
}
"""This group's families, by name, and their builders (see the package's ``_BUILDERS``)."""
