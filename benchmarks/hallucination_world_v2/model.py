"""v1's tiny Qwen2-VL (same shape, :data:`benchmarks.hallucination_world.model.MODEL_SHAPE`), with a tokenizer
that also knows the word world's questions, so ``park`` and the other places are single tokens.

Both kinds of world use this one model, so they differ only in their data. Captions tokenise as in v1.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import Qwen2VLForConditionalGeneration

from benchmarks.hallucination_world.model import _TEMPLATE_TEXT, MODEL_SHAPE
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


_MARKER = "world_model.json"


def build_world_model(output_dir: Path, seed: int) -> Path:
    """Write the random-weight model (init seed ``seed``), tokenizer and processor into ``output_dir`` (once)."""
    marker = output_dir / _MARKER
    if marker.exists() and json.loads(marker.read_text()).get("seed") == seed:
        return output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = qwen2_vl_tokenizer(
        _train_tokenizer(_QWEN2_VL_SPECIAL_TOKENS, tokenizer_corpus() + _TEMPLATE_TEXT, vocab_size=512)
    )
    text = {**MODEL_SHAPE["text"], "vocab_size": len(tokenizer), "max_position_embeddings": 512}
    config = qwen2_vl_config(tokenizer, text, MODEL_SHAPE["vision"], rope_theta=1e4)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration(config)
    _save(model, qwen2_vl_processor(tokenizer, **SMALL_IMAGE_PIXELS), output_dir)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    info = {"seed": seed, "parameters": parameters, "vocab_size": len(tokenizer), "shape": MODEL_SHAPE}
    marker.write_text(json.dumps(info, indent=1))
    return output_dir
