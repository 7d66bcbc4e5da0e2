"""The plugin's own commands: the offline demo and ablation sweeps, run as a user runs them."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tpo_plugin.commands.cli import main

from conftest import train_config, train_logs, user_env, write_yaml


pytestmark = pytest.mark.e2e


def tpo_plugin_command(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).with_name("tpo-plugin")), *args]
    return subprocess.run(command, cwd=cwd, env=user_env(), capture_output=True, text=True)


def test_demo_trains_and_reports_where_everything_is(tmp_path):
    result = tpo_plugin_command("demo", "--output-dir", str(tmp_path / "demo"), "--epochs", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-6000:]

    run_dir = tmp_path / "demo" / "run"
    for name in [
        "adapter_model.safetensors",
        "all_results.json",
        "training_loss.png",
        "training_tpo_weight_chosen.png",
    ]:
        assert (run_dir / name).is_file(), name
        assert str(run_dir) in result.stdout
    assert "TPO demo finished." in result.stdout
    assert json.loads((run_dir / "all_results.json").read_text())["eval_tpo/weight_chosen"] > 0.5
    assert len(train_logs(run_dir)) == 8  # 32 training pairs (val_size 0.2 of 40), batch 4, one epoch

    again = tpo_plugin_command("demo", "--output-dir", str(tmp_path / "demo"), cwd=tmp_path)
    assert again.returncode == 1 and "--overwrite" in again.stderr  # a finished run is not silently replaced


def test_sweep_runs_each_value_and_tabulates(model_dirs, dataset_dir, tmp_path):
    config = train_config(model_dirs["qwen2_vl"], "qwen2_vl", dataset_dir, tmp_path / "base")
    recipe = write_yaml(tmp_path / "tpo.yaml", config)
    root = tmp_path / "sweep"
    result = tpo_plugin_command(
        "sweep", str(recipe), "tpo_reward_on=chosen,rejected", "max_steps=1", "--output-root", str(root), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-6000:]

    with open(root / "sweep.csv") as file:
        rows = list(csv.DictReader(file))
    assert [(row["tpo_reward_on"], row["status"], row["steps"]) for row in rows] == [
        ("chosen", "ok", "1"),
        ("rejected", "ok", "1"),
    ]
    for row in rows:
        (logged,) = train_logs(root / f"tpo_reward_on-{row['tpo_reward_on']}")
        assert float(row["tpo/weight_chosen"]) == pytest.approx(logged["tpo/weight_chosen"])
        assert float(row["train_loss"]) == pytest.approx(logged["loss"])
    assert float(rows[0]["tpo/weight_rejected"]) == 1.0 and float(rows[1]["tpo/weight_chosen"]) == 1.0
    assert (root / "sweep.md").read_text().startswith("| tpo_reward_on | status | steps |")


def test_sweep_rejects_malformed_key_values(tmp_path):
    result = tpo_plugin_command("sweep", str(tmp_path / "x.yaml"), "tpo_noise_step", cwd=tmp_path)
    assert result.returncode == 2 and "Expected KEY=V1,V2,..." in result.stderr


def test_sweep_and_demo_refuse_bad_arguments_before_starting(tmp_path, capsys):
    missing = tmp_path / "missing.yaml"
    sweep = ["sweep", str(missing), "tpo_noise_step=0,500", "--output-root", str(tmp_path / "root")]
    assert main(sweep) == 2
    assert capsys.readouterr() == ("", f"tpo-plugin sweep: Recipe {missing} does not exist.\n")

    for epochs in ("0", "-1", "nan"):
        assert main(["demo", "--output-dir", str(tmp_path / "demo"), "--epochs", epochs]) == 2
        assert capsys.readouterr() == ("", f"tpo-plugin demo: --epochs must be a positive number, got {epochs}.\n")
    assert list(tmp_path.iterdir()) == []  # nothing started: no model built, no folder made
