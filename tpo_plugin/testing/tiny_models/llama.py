"""Meta's Llama families: Llama 3.2 Vision (Mllama) and Llama 4.

They share no code beyond the shared module (their tokenizers, vision encoders and the way images reach the text
model all differ: cross-attention for Mllama, pixel-shuffled patch tokens and a mixture-of-experts text model for
Llama 4); they are grouped as Meta's Llama models, each initialised so that images are not hidden from the text
model.
"""

from __future__ import annotations

import torch
from transformers import (
    Llama4Config,
    Llama4ForConditionalGeneration,
    Llama4ImageProcessor,
    Llama4Processor,
    MllamaConfig,
    MllamaForConditionalGeneration,
    MllamaImageProcessor,
    MllamaProcessor,
)

from .common import _MAX_POSITIONS, _PATCH_SIZE, _TEXT, _special_tokenizer, _text_sizes


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


BUILDERS = {
    "mllama": _build_mllama,
    "llama4": _build_llama4,
}
"""This group's families, by name, and their builders (see the package's ``_BUILDERS``)."""
