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
    from tpo_plugin.training.run.settings import SETTINGS_FILE, refuse_changed_settings

    # a checkpoint written before tpo_weighting existed trained with the log-additive objective
    (tmp_path / SETTINGS_FILE).write_text(json.dumps({"tpo_noise_step": 500, "pref_beta": 0.1}))
    current = {"tpo_noise_step": 500, "tpo_weighting": weighting, "pref_beta": 0.1}
    if refused:
        with pytest.raises(ValueError, match='`tpo_weighting` was "log_additive", is now "multiplicative"'):
            refuse_changed_settings(str(tmp_path), current, allow_changes=False)
    else:
        refuse_changed_settings(str(tmp_path), current, allow_changes=False)


def test_lowering_num_train_epochs_below_the_last_checkpoint_is_refused_before_the_model_loads(
    model_dirs, dataset_dir, tmp_path
):
    output_dir = tmp_path / "out"
    config = train_config(
        model_dirs["qwen2_vl"], "qwen2_vl", dataset_dir, output_dir, dataset="one_pair", per_device_train_batch_size=1,
        max_steps=-1, num_train_epochs=2, overwrite_output_dir=False, save_strategy="steps", save_steps=1,
    )  # fmt: skip
    run_cli(["train", str(write_yaml(tmp_path / "two_epochs.yaml", config))], cwd=tmp_path)
    one_epoch = write_yaml(tmp_path / "one_epoch.yaml", {**config, "num_train_epochs": 1})

    # As left: the last checkpoint is the finished run's; then with it removed, an earlier one would be resumed
    # and its adapter and metrics would replace the run's.
    for checkpoint, head in [(2, f"The run in {output_dir} finished at step 2"), (1, "This run would resume")]:
        before = file_digests(output_dir)
        result = run_cli(["train", str(one_epoch)], cwd=tmp_path, check=False)
        output = result.stdout + result.stderr

        assert result.returncode != 0
        assert head in output
        assert f"checkpoint {output_dir / f'checkpoint-{checkpoint}'} (step {checkpoint}) although it ends" in output
        assert "ends at step 1 (`num_train_epochs: 1` of 1 steps each, for 1 pairs in batches of 1" in output
        assert "raise `max_steps` (or `num_train_epochs`)" in output
        assert MODEL_LOADED not in output
        assert file_digests(output_dir) == before
        shutil.rmtree(output_dir / "checkpoint-2", ignore_errors=True)


def training_args(output_dir: Path, **overrides):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(output_dir), do_train=True, report_to="none", use_cpu=True, **overrides)


@pytest.mark.parametrize(
    "num_pairs, batch_size, accumulation, epochs, drop_last",
    [(8, 2, 1, 1.0, False), (7, 2, 3, 2.5, False), (7, 2, 2, 1.5, True), (1, 4, 4, 3.0, False), (9, 2, 2, 0.3, False)],
)
def test_the_run_length_of_num_train_epochs_is_the_trainers(num_pairs, batch_size, accumulation, epochs, drop_last):
    import math

    import torch
    from transformers import Trainer

    from tpo_plugin.training.run.settings import steps_per_epoch

    args = training_args(
        Path("unused"), per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
        num_train_epochs=epochs, dataloader_drop_last=drop_last,
    )  # fmt: skip
    trainer = Trainer(model=torch.nn.Linear(1, 1), args=args, train_dataset=[{"x": [0.0]}] * num_pairs)
    *_, max_steps = trainer.set_initial_training_values(args, trainer.get_train_dataloader())

    assert math.ceil(epochs * steps_per_epoch(num_pairs, batch_size, 1, accumulation, drop_last)) == max_steps


@pytest.mark.parametrize(
    "num_pairs, batch_size, world_size, drop_last",
    [(9, 2, 2, False), (9, 2, 2, True), (10, 1, 4, False), (11, 2, 4, True)],
)
def test_each_process_trains_its_share_of_the_batches_as_accelerate_shards_them(
    num_pairs, batch_size, world_size, drop_last
):
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler, SequentialSampler

    from tpo_plugin.training.run.settings import steps_per_epoch

    batches = BatchSampler(SequentialSampler(range(num_pairs)), batch_size, drop_last)
    shard = BatchSamplerShard(batches, num_processes=world_size, process_index=0, even_batches=True)
    assert steps_per_epoch(num_pairs, batch_size, world_size, 1, drop_last) == len(shard)


def fake_checkpoint(output_dir: Path, step: int, run_steps: int, run_epochs: int) -> Path:
    checkpoint = output_dir / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    state = {"global_step": step, "max_steps": run_steps, "num_train_epochs": run_epochs, "log_history": []}
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    return checkpoint


def test_a_resume_is_refused_exactly_when_the_run_of_num_train_epochs_ends_at_or_before_its_checkpoint(tmp_path):
    from tpo_plugin.training.run.settings import refuse_resume_past_the_end

    sixteen_pairs = [{}] * 16  # 4 steps an epoch in batches of 4
    # a 2.5-epoch run that finished at step 10 (transformers records its epochs as 3), and an earlier checkpoint
    finished = fake_checkpoint(tmp_path, 10, 10, 3)
    earlier = fake_checkpoint(tmp_path, 4, 10, 3)

    def resume(checkpoint: Path, epochs: float) -> None:
        args = training_args(
            tmp_path, resume_from_checkpoint=str(checkpoint), num_train_epochs=epochs, per_device_train_batch_size=4
        )
        refuse_resume_past_the_end(args, sixteen_pairs)

    resume(finished, 2.8)  # ends at step 12: two steps are left
    resume(earlier, 1.5)  # ends at step 6
    finished_message = rf"finished at step 10, .* {finished} \(step 10\) although it ends at step 10"
    with pytest.raises(ValueError, match=finished_message):
        resume(finished, 2.5)
    lowered_message = rf"the checkpoint {earlier} \(step 4\) although it ends at step 4 \(`num_train_epochs: 1.0` of 4"
    with pytest.raises(ValueError, match=lowered_message + " steps each, for 16 pairs"):
        resume(earlier, 1.0)


@pytest.mark.parametrize("content", ["", '{"pref_beta": 0.1, "tpo_no'])
def test_a_damaged_settings_file_is_named_with_what_to_do(tmp_path, content):
    from tpo_plugin.training.run.settings import SETTINGS_FILE, refuse_changed_settings

    (tmp_path / SETTINGS_FILE).write_text(content)
    with pytest.raises(ValueError, match=rf"{tmp_path / SETTINGS_FILE} is .*: it was cut off or damaged .* Delete it"):
        refuse_changed_settings(str(tmp_path), {"pref_beta": 0.1}, allow_changes=False)


def test_a_damaged_trainer_state_is_named_with_what_to_do(tmp_path):
    from tpo_plugin.training.run.settings import refuse_resume_past_the_end

    checkpoint = fake_checkpoint(tmp_path, 2, 2, 1)
    (checkpoint / "trainer_state.json").write_text('{"global_step": 2, "max_')
    args = training_args(tmp_path, resume_from_checkpoint=str(checkpoint))
    with pytest.raises(ValueError, match=rf"{checkpoint / 'trainer_state.json'} is not a JSON object .* earlier"):
        refuse_resume_past_the_end(args, [{}] * 4)


def test_settings_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    from tpo_plugin.training.run.settings import SETTINGS_FILE, write_settings

    write_settings(str(tmp_path), {"pref_beta": 0.1})

    def crash_midway(settings, file, **kwargs):
        file.write('{"pref_beta": 0.')
        raise OSError("No space left on device")

    monkeypatch.setattr(json, "dump", crash_midway)
    with pytest.raises(OSError):
        write_settings(str(tmp_path), {"pref_beta": 0.2})
    assert json.loads((tmp_path / SETTINGS_FILE).read_text()) == {"pref_beta": 0.1}
