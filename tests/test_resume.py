"""Exact resume: the steps after a resume from a checkpoint log the same losses and TPO metrics as the
uninterrupted run, because the corrupted images are keyed by seed, global step and image."""

import json

import pytest

from tpo_plugin.training.run.stability import MONITOR_STATE_FILE

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
    # the stability monitor went on from what checkpoint-2 said it had seen: the same state at step 4
    seen = [json.loads((run / "checkpoint-4" / MONITOR_STATE_FILE).read_text()) for run in (uninterrupted, resumed)]
    assert len(seen[0]["window"]) == 4 and seen[0]["warned"] is False
    assert seen[1]["best_chosen_logp"] is None and seen[1]["warned"] is False  # no 5-step window has ended yet
    resumed_means, uninterrupted_means = ([mean for step in state["window"] for mean in step] for state in seen[::-1])
    assert len(resumed_means) == 12 and resumed_means == pytest.approx(uninterrupted_means, abs=1e-5)
