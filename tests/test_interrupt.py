"""SIGINT/SIGTERM during training: the run saves a checkpoint at the end of the step and stops; nothing looks
like a finished run, and resuming from the checkpoint continues the same run."""

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import PAIR_COLUMNS, preference_rows, run_cli, train_config, train_logs, user_env, write_yaml


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


def test_signal_during_the_reference_precompute_stops_within_a_batch(model_dirs, tmp_path):
    # 300 pairs scored one at a time: long enough to be signalled in the middle of the pass.
    root = tmp_path / "data"
    (root / "img").mkdir(parents=True)
    rows = preference_rows(root / "img", 4)
    (root / "pairs.json").write_text(json.dumps(rows * 75))
    info = {
        "many_pairs": {"file_name": "pairs.json", "formatting": "sharegpt", "ranking": True, "columns": PAIR_COLUMNS}
    }
    (root / "dataset_info.json").write_text(json.dumps(info))
    output_dir = tmp_path / "out"
    config = train_config(
        model_dirs["qwen2_vl"], "qwen2_vl", root, output_dir, dataset="many_pairs", tpo_noise_per="sample",
        tpo_precompute_ref=True, per_device_eval_batch_size=1,
    )  # fmt: skip
    cli = Path(sys.executable).with_name("llamafactory-cli")
    process = subprocess.Popen(
        [str(cli), "train", str(write_yaml(tmp_path / "tpo.yaml", config))],
        cwd=tmp_path,
        env=user_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = []
    for line in process.stdout:  # the pass logs this line, then scores the pairs
        output.append(line)
        if "Computing the reference scores of 300 pairs once" in line:
            time.sleep(1.0)
            process.send_signal(signal.SIGINT)
            break
    output.append(process.communicate(timeout=120)[0])
    output = "".join(output)

    assert process.returncode == 128 + signal.SIGINT, output[-3000:]
    stopped = re.search(r"Interrupted while computing the reference scores, after (\d+) of 300 batches", output)
    assert stopped and int(stopped.group(1)) < 300, output[-3000:]
    assert "nothing was stored and nothing trained" in output
    assert not list(output_dir.glob("tpo_reference_scores*")) and not list(output_dir.glob("checkpoint-*"))
    assert not (output_dir / "trainer_state.json").exists()
