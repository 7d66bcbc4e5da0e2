"""SIGINT/SIGTERM during training: the run saves a checkpoint at the end of the step and stops; nothing looks
like a finished run, and resuming from the checkpoint continues the same run."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_cli, train_config, train_logs, user_env, write_yaml


pytestmark = pytest.mark.e2e


def logged_steps(output_dir: Path) -> int:
    log_file = output_dir / "trainer_log.jsonl"
    return len(log_file.read_text().splitlines()) if log_file.exists() else 0


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_checkpoint_and_resume_continues(stop_signal, model_dirs, dataset_dir, tmp_path):
    output_dir = tmp_path / "out"
    config = train_config(
        model_dirs["qwen2_vl"], "qwen2_vl", dataset_dir, output_dir, max_steps=400, save_strategy="no"
    )
    recipe = write_yaml(tmp_path / "tpo.yaml", config)
    cli = Path(sys.executable).with_name("llamafactory-cli")
    process = subprocess.Popen(
        [str(cli), "train", str(recipe)],
        cwd=tmp_path,
        env=user_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 240
    while logged_steps(output_dir) < 3 and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    process.send_signal(stop_signal)
    output, _ = process.communicate(timeout=240)

    assert process.returncode == 128 + stop_signal, output[-3000:]
    (checkpoint,) = output_dir.glob("checkpoint-*")
    stopped_at = int(checkpoint.name.split("-")[1])
    assert 3 <= stopped_at < 400
    assert f"Training was interrupted at step {stopped_at}" in output
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["global_step"] == stopped_at
    assert (checkpoint / "adapter_model.safetensors").is_file() and (checkpoint / "optimizer.pt").is_file()
    assert not (output_dir / "adapter_model.safetensors").exists() and not (output_dir / "all_results.json").exists()

    config.update(max_steps=stopped_at + 2, resume_from_checkpoint=str(checkpoint))
    run_cli(["train", str(write_yaml(tmp_path / "resume.yaml", config))], cwd=tmp_path)
    assert [entry["step"] for entry in train_logs(output_dir)][-2:] == [stopped_at + 1, stopped_at + 2]
    assert (output_dir / "adapter_model.safetensors").is_file()
