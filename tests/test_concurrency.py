"""Two TPO runs at the same time, into different folders, do not interfere: each logs exactly what it logs
when it runs alone (the plugin writes no shared temporary files or caches)."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import log_history, run_cli, train_config, user_env, write_yaml


pytestmark = pytest.mark.e2e


def comparable(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in entry.items() if "runtime" not in k and "per_second" not in k} for entry in history]


def test_two_simultaneous_runs_match_runs_alone(model_dirs, dataset_dir, tmp_path):
    overrides = {"first": {"tpo_noise_step": 250}, "second": {"tpo_corruption": "blank", "seed": 11}}
    recipes = {}
    for name, extra in overrides.items():
        config = train_config(model_dirs["qwen2_vl"], "qwen2_vl", dataset_dir, tmp_path / name, max_steps=3, **extra)
        recipes[name] = write_yaml(tmp_path / f"{name}.yaml", config)

    cli = str(Path(sys.executable).with_name("llamafactory-cli"))
    env = user_env()
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in recipes}  # files: pipes could fill and block
    processes = {
        name: subprocess.Popen(
            [cli, "train", str(recipe)], cwd=tmp_path, env=env, stdout=logs[name], stderr=logs[name]
        )
        for name, recipe in recipes.items()
    }
    for name, process in processes.items():
        process.wait(timeout=300)
        logs[name].close()
        assert process.returncode == 0, (tmp_path / f"{name}.log").read_text()[-3000:]

    alone = write_yaml(
        tmp_path / "alone.yaml",
        {**yaml.safe_load(recipes["first"].read_text()), "output_dir": str(tmp_path / "alone")},
    )
    run_cli(["train", str(alone)], cwd=tmp_path)
    assert comparable(log_history(tmp_path / "first")) == comparable(log_history(tmp_path / "alone"))
    assert comparable(log_history(tmp_path / "first")) != comparable(log_history(tmp_path / "second"))
