"""Exact resume: the steps after a resume from a checkpoint log the same losses and TPO metrics as the
uninterrupted run, because the corrupted images are keyed by seed, global step and image."""

import pytest

from conftest import assert_resumed_steps_equal, run_cli, train_config, write_yaml


pytestmark = pytest.mark.e2e

COMPARED = ["loss", "rewards/margins", "logps/chosen", "tpo/score_chosen", "tpo/score_rejected", "tpo/weight_chosen"]


@pytest.mark.parametrize("finetuning_type", ["lora", "full"])
def test_resumed_steps_equal_uninterrupted_steps(finetuning_type, model_dirs, dataset_dir, tmp_path):
    common = dict(max_steps=4, save_strategy="steps", save_steps=2, finetuning_type=finetuning_type)
    if finetuning_type == "full":
        common["lora_target"] = None
    uninterrupted = tmp_path / "uninterrupted"
    config = train_config(model_dirs["qwen2_vl"], "qwen2_vl", dataset_dir, uninterrupted, **common)
    run_cli(["train", str(write_yaml(tmp_path / "a.yaml", config))], cwd=tmp_path)

    resumed = tmp_path / "resumed"
    config = train_config(
        model_dirs["qwen2_vl"],
        "qwen2_vl",
        dataset_dir,
        resumed,
        resume_from_checkpoint=str(uninterrupted / "checkpoint-2"),
        **common,
    )
    run_cli(["train", str(write_yaml(tmp_path / "b.yaml", config))], cwd=tmp_path)

    assert_resumed_steps_equal(uninterrupted, resumed, 2, [3, 4], COMPARED)
