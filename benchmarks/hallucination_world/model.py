"""The experiment's tiny Qwen2-VL (about 1 M parameters), random weights, with a tokenizer that knows the world.

``tpo_plugin.testing.tiny_models`` trains its tokenizer on a generic corpus; here the corpus is the world's own text
(plus the chat template's), so every object name, "Yes" and "No" is one token and a caption is a handful of
tokens. The model is built with ``tiny_models``' Qwen2-VL helpers (special tokens, config, processor), only a
little larger, because it has to learn to see from scratch: 112 x 112 images become 4 x 4 = 16 image tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast, Qwen2VLForConditionalGeneration

from tpo_plugin.testing.tiny_models import (
    _QWEN2_VL_SPECIAL_TOKENS,
    SMALL_IMAGE_PIXELS,
    _save,
    _train_tokenizer,
    qwen2_vl_config,
    qwen2_vl_processor,
    qwen2_vl_tokenizer,
)

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
_TEMPLATE_TEXT = ["system\nYou are a helpful assistant.\nuser\nassistant\n"]
_MARKER = "world_model.json"


def build_world_model(output_dir: Path, seed: int) -> Path:
    """Write the random-weight model, tokenizer and processor into ``output_dir`` (once per seed)."""
    marker = output_dir / _MARKER
    if marker.exists() and json.loads(marker.read_text()).get("seed") == seed:
        return output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _world_tokenizer()
    text = {**MODEL_SHAPE["text"], "vocab_size": len(tokenizer), "max_position_embeddings": 512}
    config = qwen2_vl_config(tokenizer, text, MODEL_SHAPE["vision"], rope_theta=1e4)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration(config)
    _save(model, qwen2_vl_processor(tokenizer, **SMALL_IMAGE_PIXELS), output_dir)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    marker.write_text(json.dumps({"seed": seed, "parameters": parameters, "shape": MODEL_SHAPE}, indent=1))
    return output_dir


def _world_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the world's text until no merge is left, Qwen's special tokens first."""
    corpus = tokenizer_corpus() + _TEMPLATE_TEXT
    return qwen2_vl_tokenizer(_train_tokenizer(_QWEN2_VL_SPECIAL_TOKENS, corpus, vocab_size=512))
