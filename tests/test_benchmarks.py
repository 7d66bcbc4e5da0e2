"""The benchmark harness (benchmarks/bench_tpo.py) runs on a CPU and prints its JSON line, and the baseline it
times with the reference code's structure trains exactly like the plugin's trainer. Benchmarks are not
tests: no timing is asserted here."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import user_env


pytestmark = pytest.mark.e2e

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
VARIANTS = {"dpo", "tpo", "tpo_detach", "tpo_precompute", "tpo_detach_precompute", "tpo_reference_structure"}


def test_harness_prints_json_line_and_reference_structure_trains_like_tpo(tmp_path):
    command = [sys.executable, str(BENCHMARKS / "bench_tpo.py"), "--device", "cpu", "--work-dir", str(tmp_path)]
    command += ["--warmup-steps", "0", "--measured-steps", "2", "--batch-pairs", "2"]
    command += ["--image-size", "56", "--answer-tokens", "16", "--question-tokens", "8"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=user_env())
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"

    lines = [line for line in result.stdout.splitlines() if line.startswith('{"benchmark": "tpo_vs_dpo"')]
    assert len(lines) == 1, result.stdout
    report = json.loads(lines[0])
    assert report["device"] and {"torch", "transformers", "llamafactory", "tpo-plugin"} <= set(report["versions"])
    assert list(report["configurations"]) == ["lora"]
    lora = report["configurations"]["lora"]
    assert set(lora["variants"]) == VARIANTS
    for name, summary in lora["variants"].items():
        assert "error" not in summary, (name, summary)
        assert summary["measured_steps"] == 2
        assert summary["s_per_step"] > 0 and summary["pairs_per_s"] > 0 and summary["peak_memory_bytes"] > 0
        assert summary["s_before_first_step"] >= 0
    assert lora["variants"]["tpo_reference_structure"]["trainer"] == "ReferenceStructureTPOTrainer"
    assert set(lora["ratios"]) == {f"{name}/dpo" for name in VARIANTS - {"dpo"}} | {"tpo_reference_structure/tpo"}
    for name, ratios in lora["ratios"].items():
        assert all(math.isfinite(value) and value > 0 for value in ratios.values()), (name, ratios)
    assert "| tpo_reference_structure |" in result.stdout and "| tpo_precompute |" in result.stdout  # Markdown
    # the precomputed reference gives the live reference's first loss (policy = reference at step 1: log 2)
    assert lora["variants"]["tpo_precompute"]["first_steps_logs"][0]["loss"] == pytest.approx(math.log(2), abs=1e-4)

    # "Results must not change": step 1 (forwards, and through grad_norm the backward) and step 2.
    check = lora["reference_structure_check"]
    for key in ["loss", "grad_norm", "logps/chosen", "tpo/score_chosen", "tpo/weight_rejected"]:
        assert f"step1/{key}" in check["rel_diff"] and f"step2/{key}" in check["rel_diff"], key
    assert check["max_rel_diff"] < 1e-5, check


# Counted in a fresh interpreter, as the benchmark builds it. Built in an xdist worker after other test files had
# loaded models, it once came out with its lm_head untied (2.44 B parameters): the count depends on a process's
# history (transformers' ``from_pretrained`` replaces ``PreTrainedModel.tie_weights`` class-wide while it loads).
_COUNT_QWEN2_VL_2B = """
import importlib.util, json, sys
import torch
from transformers import Qwen2VLForConditionalGeneration
spec = importlib.util.spec_from_file_location("bench_models", sys.argv[1])
models = importlib.util.module_from_spec(spec)
spec.loader.exec_module(models)
config, processor = models.config_and_processor("qwen2-vl-2b")
with torch.device("meta"):
    model = Qwen2VLForConditionalGeneration(config)
print(json.dumps({
    "parameters": sum(param.numel() for param in model.parameters()),
    "tokenizer_length": len(processor.tokenizer),
    "vocab_size": config.text_config.vocab_size,
    "image_pad_id": processor.tokenizer.convert_tokens_to_ids("<|image_pad|>"),
    "image_token_id": config.image_token_id,
}))
"""


def test_gpu_model_has_qwen2_vl_2b_shape():
    command = [sys.executable, "-c", _COUNT_QWEN2_VL_2B, str(BENCHMARKS / "models.py")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=user_env())
    assert result.returncode == 0, result.stderr[-3000:]
    shape = json.loads(result.stdout.splitlines()[-1])
    assert shape["parameters"] == 2_208_985_600  # Qwen2-VL-2B-Instruct's count
    assert shape["tokenizer_length"] == shape["vocab_size"] == 151936
    assert shape["image_pad_id"] == shape["image_token_id"]


def test_narrow_model_keeps_the_2b_cost_balance_at_an_eighth_of_the_widths():
    spec = importlib.util.spec_from_file_location("bench_models", BENCHMARKS / "models.py")
    models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(models)
    full, narrow = models.SHAPES["qwen2-vl-2b"], models.SHAPES["qwen2-vl-2b-narrow"]
    for part, widths in (("text", ("hidden_size", "intermediate_size", "vocab_size")), ("vision", ("embed_dim",))):
        for key in widths:
            assert narrow[part][key] * 8 == full[part][key], (part, key)
    assert narrow["text"]["num_hidden_layers"] == full["text"]["num_hidden_layers"]
    assert narrow["vision"]["depth"] == full["vision"]["depth"]
    assert narrow["vision"]["mlp_ratio"] == full["vision"]["mlp_ratio"]
