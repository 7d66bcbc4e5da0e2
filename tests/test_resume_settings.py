"""Resuming continues the same run or is refused before the model loads: a finished run is not extended or
rewritten, a changed objective setting is refused unless allowed, and a resumed run's train_loss is the mean
over all its steps."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from conftest import log_history, run_cli, train_config, train_logs, write_yaml


pytestmark = pytest.mark.e2e

MODEL_LOADED = "trainable params"  # LLaMA-Factory's log line once the model is loaded


@pytest.fixture(scope="module")
def finished_run(model_dirs, dataset_dir, tmp_path_factory) -> tuple[dict, Path]:
    """A finished two-step run with a checkpoint at its last step, as a user would leave it."""
    root = tmp_path_factory.mktemp("finished")
    output_dir = root / "out"
    config = train_config(
        model_dirs["qwen2_vl"],
        "qwen2_vl",
        dataset_dir,
        output_dir,
        overwrite_output_dir=False,
        save_strategy="steps",
        save_steps=2,
    )
    run_cli(["train", str(write_yaml(root / "run.yaml", config))], cwd=root)
    return config, output_dir


def copy_of(finished_run, tmp_path: Path, **overrides) -> tuple[dict, Path]:
    config, output_dir = finished_run
    copy = tmp_path / "out"
    shutil.copytree(output_dir, copy)
    return {**config, "output_dir": str(copy), **overrides}, copy


def file_digests(folder: Path) -> dict[str, str]:
    files = [path for path in folder.rglob("*") if path.is_file()]
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest() for path in files}


def test_rerunning_a_finished_run_is_refused_and_leaves_its_files_untouched(finished_run, tmp_path):
    config, output_dir = copy_of(finished_run, tmp_path)
    before = file_digests(output_dir)

    result = run_cli(["train", str(write_yaml(tmp_path / "again.yaml", config))], cwd=tmp_path, check=False)
    output = result.stdout + result.stderr

    assert result.returncode != 0
    assert f"The run in {output_dir} finished at step 2" in output
    for advice in ("a new `output_dir`", "`overwrite_output_dir: true`", "raise `max_steps` (or `num_train_epochs`)"):
        assert advice in output
    assert MODEL_LOADED not in output
    assert file_digests(output_dir) == before


@pytest.mark.parametrize("resume", ["automatic", "explicit"])
def test_a_changed_objective_setting_is_refused_with_key_old_and_new_value(resume, finished_run, tmp_path):
    config, output_dir = copy_of(finished_run, tmp_path, max_steps=3, tpo_noise_step=100, pref_beta=0.2)
    if resume == "explicit":
        config.update(overwrite_output_dir=True, resume_from_checkpoint=str(output_dir / "checkpoint-2"))

    result = run_cli(["train", str(write_yaml(tmp_path / "changed.yaml", config))], cwd=tmp_path, check=False)
    output = result.stdout + result.stderr

    assert result.returncode != 0
    assert f"Resuming {output_dir / 'checkpoint-2'} would continue its run with another objective" in output
    assert "`pref_beta` was 0.1, is now 0.2; `tpo_noise_step` was 500, is now 100" in output
    assert "`tpo_allow_changed_settings: true`" in output
    assert MODEL_LOADED not in output
    assert not (output_dir / "checkpoint-3").exists()


def test_an_allowed_change_continues_and_train_loss_is_the_mean_of_all_steps(finished_run, tmp_path):
    allowed = dict(max_steps=3, tpo_noise_step=100, tpo_allow_changed_settings=True)
    config, output_dir = copy_of(finished_run, tmp_path, **allowed)

    result = run_cli(["train", str(write_yaml(tmp_path / "allowed.yaml", config))], cwd=tmp_path)

    assert "`tpo_noise_step` was 500, is now 100" in result.stdout + result.stderr
    losses = [entry["loss"] for entry in train_logs(output_dir)]
    assert [entry["step"] for entry in train_logs(output_dir)] == [1, 2, 3]
    recorded = {"checkpoint-2": 500, "checkpoint-3": 100, ".": 100}  # each checkpoint, and the final model
    for folder, noise_step in recorded.items():
        settings = json.loads((output_dir / folder / "tpo_settings.json").read_text())
        assert settings["tpo_noise_step"] == noise_step, folder

    mean_of_all_steps = sum(losses) / len(losses)
    transformers_value = losses[-1] / len(losses)  # the resumed step's loss over all steps
    assert mean_of_all_steps != pytest.approx(transformers_value, abs=1e-6)
    train_loss = json.loads((output_dir / "all_results.json").read_text())["train_loss"]
    assert train_loss == pytest.approx(mean_of_all_steps, abs=1e-6)
    assert log_history(output_dir)[-1]["train_loss"] == pytest.approx(mean_of_all_steps, abs=1e-6)


@pytest.mark.parametrize("weighting, refused", [("log_additive", False), ("multiplicative", True)])
def test_a_key_newer_than_the_checkpoint_counts_as_its_default(tmp_path, weighting, refused):
    from tpo_plugin.training.run_settings import SETTINGS_FILE, refuse_changed_settings

    # a checkpoint written before tpo_weighting existed trained with the log-additive objective
    (tmp_path / SETTINGS_FILE).write_text(json.dumps({"tpo_noise_step": 500, "pref_beta": 0.1}))
    current = {"tpo_noise_step": 500, "tpo_weighting": weighting, "pref_beta": 0.1}
    if refused:
        with pytest.raises(ValueError, match='`tpo_weighting` was "log_additive", is now "multiplicative"'):
            refuse_changed_settings(str(tmp_path), current, allow_changes=False)
    else:
        refuse_changed_settings(str(tmp_path), current, allow_changes=False)
