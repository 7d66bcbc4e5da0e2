"""Google's families: Gemma 3 and PaliGemma.

Both put the same tiny SigLIP (``_SIGLIP_VISION``, 56 x 56 images of 4 x 4 patches) before a Gemma text model, and
both tokenizers start from Gemma's special tokens (``_GEMMA_SPECIAL_TOKENS``); Gemma 3 pools the patches into soft
tokens between image markers, PaliGemma prefixes one token per patch to the prompt.
"""

from __future__ import annotations

import torch
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessor,
    Gemma3Processor,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    PreTrainedTokenizerFast,
    SiglipImageProcessor,
)

from .common import _PATCH_SIZE, _TEXT, _special_tokenizer, _text_sizes


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


BUILDERS = {
    "gemma3": _build_gemma3,
    "paligemma": _build_paligemma,
}
"""This group's families, by name, and their builders (see the package's ``_BUILDERS``)."""
