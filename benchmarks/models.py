"""Random-weight Qwen2-VL models of a given shape, built from a config: nothing is downloaded.

``qwen2-vl-2b`` has Qwen2-VL-2B-Instruct's exact shape (2.21 B parameters: text hidden 1536 x 28 layers,
12 heads, 2 KV heads, intermediate 8960, vocabulary 151936, tied embeddings; vision depth 32, embed 1280,
16 heads, merger into 1536, patch 14, spatial merge 2, temporal patch 2), so its step times stand for the
real model's. ``qwen2-vl-2b-mini`` is the same builder at a few hundred thousand parameters, so the GPU
code path (bf16 weights, a tokenizer padded to the vocabulary, the stock image processor) runs on a CPU.

The tokenizer is the byte-level BPE of :mod:`tpo_plugin.testing.tiny_models`, padded with unused entries to the
model's vocabulary, so logits have the real width and ``len(tokenizer)`` equals ``vocab_size``.

Run as a script to build into a directory (the harness does this in a child process, so that it never
holds GPU memory itself): ``python benchmarks/models.py OUTPUT_DIR --shape qwen2-vl-2b --device cuda``.
"""

import argparse
import json
import math
import pathlib
import sys
import time

import torch
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

from tpo_plugin.testing.tiny_models import (
    _MARKER,
    _QWEN2_VL_SPECIAL_TOKENS,
    _is_complete,
    _remove_previous_build,
    _save,
    _train_tokenizer,
    _write_json_atomically,
    qwen2_vl_config,
    qwen2_vl_processor,
    qwen2_vl_tokenizer,
)


_BUILD_VERSION = 1

SHAPES = {
    # Qwen2-VL-2B-Instruct's config.json, weights aside.
    "qwen2-vl-2b": {
        "text": {
            "hidden_size": 1536,
            "intermediate_size": 8960,
            "num_hidden_layers": 28,
            "num_attention_heads": 12,
            "num_key_value_heads": 2,
            "vocab_size": 151936,
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6,
            "max_window_layers": 28,
        },
        "vision": {"depth": 32, "embed_dim": 1280, "num_heads": 16, "mlp_ratio": 4},
    },
    # Qwen2-VL-2B's depths and cost balance (a 448x448 image in the vision tower ~ a 480-token row in the
    # language model; LM head ~15 % of a row) at 1/8 of its widths and vocabulary: the GPU configuration's
    # arithmetic at ~1/64 of its cost, so a CPU can time how the passes add up.
    "qwen2-vl-2b-narrow": {
        "text": {
            "hidden_size": 192,
            "intermediate_size": 1120,
            "num_hidden_layers": 28,
            "num_attention_heads": 12,
            "num_key_value_heads": 2,
            "vocab_size": 18992,
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6,
            "max_window_layers": 28,
        },
        "vision": {"depth": 32, "embed_dim": 160, "num_heads": 10, "mlp_ratio": 4},
    },
    # The same structure, small enough for a CPU test of the GPU code path.
    "qwen2-vl-2b-mini": {
        "text": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 4096,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6,
            "max_window_layers": 2,
        },
        "vision": {"depth": 2, "embed_dim": 32, "num_heads": 2, "mlp_ratio": 2},
    },
}


def padded_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """tiny_models' Qwen2-VL tokenizer with unused vocabulary entries up to ``vocab_size``."""
    state = json.loads(_train_tokenizer(_QWEN2_VL_SPECIAL_TOKENS).to_str())
    vocab = state["model"]["vocab"]
    if len(vocab) > vocab_size:
        raise ValueError(f"The tokenizer has {len(vocab)} entries, more than the vocabulary of {vocab_size}.")
    for token_id in range(len(vocab), vocab_size):
        vocab[f"<|unused_{token_id}|>"] = token_id  # never produced by a merge: pads the id range only
    return qwen2_vl_tokenizer(Tokenizer.from_str(json.dumps(state)))


def config_and_processor(shape: str) -> tuple[Qwen2VLConfig, Qwen2VLProcessor]:
    """The model config of ``shape`` and a processor whose tokenizer fills its vocabulary."""
    text, vision = SHAPES[shape]["text"], SHAPES[shape]["vision"]
    tokenizer = padded_tokenizer(text["vocab_size"])
    text = {**text, "use_sliding_window": False}
    config = qwen2_vl_config(tokenizer, text, vision, rope_theta=1e6, tie_word_embeddings=True)
    return config, qwen2_vl_processor(tokenizer)  # the stock processor settings of Qwen2-VL-Instruct


def build_qwen2_vl(
    shape: str, output_dir: str | pathlib.Path, device: str = "cpu", dtype: str = "bfloat16", seed: int = 0
) -> pathlib.Path:
    """Build a random-weight Qwen2-VL of ``shape`` with its tokenizer and processor into ``output_dir``.

    A directory that already holds a complete build of the same shape, dtype and seed is reused.
    ``device`` only speeds up the random initialisation (a 2 B model takes ~40 s on a CPU); the saved
    weights are the same kind either way.
    """
    output_dir = pathlib.Path(output_dir)
    identity = {"family": f"bench-{shape}", "seed": seed, "version": _BUILD_VERSION, "dtype": dtype}
    if _is_complete(output_dir, identity):
        return output_dir

    output_dir.mkdir(parents=True, exist_ok=True)
    _remove_previous_build(output_dir, identity)
    config, processor = config_and_processor(shape)
    torch_dtype = getattr(torch, dtype)
    default_dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        torch.set_default_dtype(torch_dtype)
        try:
            model = Qwen2VLForConditionalGeneration(config)
        finally:
            torch.set_default_dtype(default_dtype)
    model.config.dtype = torch_dtype

    files = _save(model, processor, output_dir)
    _write_json_atomically(output_dir / _MARKER, {**identity, "files": files})
    return output_dir


def count_parameters(model_dir: str | pathlib.Path) -> int:
    """Parameters of a saved model, read from its safetensors headers (tied weights counted once)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(pathlib.Path(model_dir).glob("*.safetensors")):
        with safe_open(path, framework="pt") as weights:
            for name in weights.keys():
                total += math.prod(weights.get_slice(name).get_shape())
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2-vl-2b")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    path = build_qwen2_vl(args.shape, args.output_dir, device=args.device, dtype=args.dtype, seed=args.seed)
    print(
        json.dumps(
            {"model_dir": str(path), "parameters": count_parameters(path), "seconds": time.perf_counter() - start}
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
