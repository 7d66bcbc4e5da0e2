"""The experiment's tiny Qwen2-VL (about 1 M parameters), random weights, with a tokenizer that knows the world.

``tpo_plugin.tiny_models`` trains its tokenizer on a generic corpus; here the corpus is the world's own text
(plus the chat template's), so every object name, "Yes" and "No" is one token and a caption is a handful of
tokens. The model is built like ``tiny_models``' Qwen2-VL (same special tokens, M-RoPE split, processor), only
a little larger, because it has to learn to see from scratch: 112 x 112 images become 4 x 4 = 16 image tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

from tpo_plugin.tiny_models import _QWEN2_VL_SPECIAL_TOKENS, _mrope_section, _save

from .world import tokenizer_corpus


MODEL_SHAPE = {
    "text": {
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    "vision": {"depth": 2, "embed_dim": 96, "num_heads": 4, "mlp_ratio": 2},
}
_PATCH_SIZE = 14
_TEMPLATE_TEXT = ["system\nYou are a helpful assistant.\nuser\nassistant\n"]
_MARKER = "world_model.json"


def build_world_model(output_dir: Path, seed: int) -> Path:
    """Write the random-weight model, tokenizer and processor into ``output_dir`` (once per seed)."""
    marker = output_dir / _MARKER
    if marker.exists() and json.loads(marker.read_text()).get("seed") == seed:
        return output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _world_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration(_config(tokenizer))
    merged = (_PATCH_SIZE * 2) ** 2  # pixels per image token
    pixels = {"min_pixels": 4 * merged, "max_pixels": 16 * merged}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**pixels),
    )
    _save(model, processor, output_dir)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    marker.write_text(json.dumps({"seed": seed, "parameters": parameters, "shape": MODEL_SHAPE}, indent=1))
    return output_dir


def _world_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the world's text until no merge is left, Qwen's special tokens first."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=_QWEN2_VL_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(tokenizer_corpus() + _TEMPLATE_TEXT, trainer=trainer)
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )


def _config(tokenizer: PreTrainedTokenizerFast) -> Qwen2VLConfig:
    text, vision = MODEL_SHAPE["text"], MODEL_SHAPE["vision"]
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in _QWEN2_VL_SPECIAL_TOKENS}
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    return Qwen2VLConfig(
        text_config=dict(
            **text,
            vocab_size=len(tokenizer),
            max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": _mrope_section(head_dim)},
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
    )
