"""A non-finite loss stops the run with a message naming the step; the last checkpoint stays loadable."""

import re

import pytest
import torch
from transformers import AutoModelForImageTextToText

from conftest import run_cli, train_config, write_yaml


pytestmark = pytest.mark.e2e


def test_absurd_learning_rate_stops_at_the_first_non_finite_step(model_dirs, dataset_dir, tmp_path):
    output_dir = tmp_path / "out"
    config = train_config(
        model_dirs["qwen2_vl"],
        "qwen2_vl",
        dataset_dir,
        output_dir,
        finetuning_type="full",
        lora_target=None,
        learning_rate=1.0e8,
        max_grad_norm=0.0,
        max_steps=4,
        save_strategy="steps",
        save_steps=1,
    )
    result = run_cli(["train", str(write_yaml(tmp_path / "tpo.yaml", config))], cwd=tmp_path, check=False)

    assert result.returncode != 0
    match = re.search(r"FloatingPointError: Stage tpo stopped at step (\d+): ", result.stderr)
    assert match, result.stderr[-3000:]
    stopped_at = int(match.group(1))
    assert "non-finite (nan/inf)" in result.stderr or "not finite (nan/inf)" in result.stderr
    assert f"{output_dir} are intact" in result.stderr
    checkpoints = [f"checkpoint-{step}" for step in range(1, stopped_at)]
    assert sorted(path.name for path in output_dir.glob("checkpoint-*")) == checkpoints
    assert not (output_dir / "model.safetensors").exists()  # nothing that looks like a finished run
    model = AutoModelForImageTextToText.from_pretrained(output_dir / checkpoints[-1])
    assert all(torch.isfinite(parameter).all() for parameter in model.parameters())


def test_non_finite_loss_or_score_is_refused_with_the_step():
    from types import SimpleNamespace

    from tpo_plugin.training.trainer import CustomTPOTrainer

    trainer = SimpleNamespace(
        accelerator=SimpleNamespace(num_processes=1),
        state=SimpleNamespace(global_step=6),
        args=SimpleNamespace(output_dir="saves/run"),
    )
    finite = torch.tensor([0.7, 0.6])
    CustomTPOTrainer._stop_unless_finite(trainer, finite, torch.zeros(4, 3))
    for losses, scores in [
        (torch.tensor([0.7, float("nan")]), torch.zeros(4, 3)),
        (finite, torch.full((4, 3), -torch.inf)),
    ]:
        with pytest.raises(FloatingPointError, match="stopped at step 7: the loss or a visual score is not finite"):
            CustomTPOTrainer._stop_unless_finite(trainer, losses, scores)
