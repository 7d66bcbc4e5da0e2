"""Training recipes and their runs: every stage is an ordinary ``llamafactory-cli train RECIPE.yaml``.

The recipes are written into the run folders before training, so each run can be read and rerun as it was.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from tpo_plugin.testing import tiny_models


OFFLINE_ENV = {
    **tiny_models.OFFLINE_ENV,
    # One thread per training process: on 2 shared cores, torch's default thread pool oversubscribes the CPU
    # and a run became ten times slower in the pilot (PROTOCOL.md); a 1 M parameter model gains little from two.
    "OMP_NUM_THREADS": "1",
}


def common_recipe(model_dir: Path, dataset_dir: Path, output_dir: Path, seed: int) -> dict[str, Any]:
    """Keys shared by all stages: the local model, the world's data, CPU-friendly bookkeeping."""
    return {
        "model_name_or_path": str(model_dir),
        "do_train": True,
        "finetuning_type": "full",
        "dataset_dir": str(dataset_dir),
        "template": "qwen2_vl",
        "cutoff_len": 128,
        "preprocessing_num_workers": 1,
        "dataloader_num_workers": 0,
        "output_dir": str(output_dir),
        "overwrite_output_dir": True,
        "logging_steps": 10,
        "save_strategy": "no",
        "report_to": "none",
        "plot_loss": True,
        "seed": seed,
        "data_seed": seed,
    }


def sft_recipe(model_dir: Path, dataset_dir: Path, output_dir: Path, seed: int, settings: dict) -> dict[str, Any]:
    """Full fine-tuning of everything, vision tower and projector included: the model starts random."""
    return {
        **common_recipe(model_dir, dataset_dir, output_dir, seed),
        "stage": "sft",
        "dataset": "world_sft",
        "freeze_vision_tower": False,
        "freeze_multi_modal_projector": False,
        "per_device_train_batch_size": settings["batch_size"],
        "num_train_epochs": settings["epochs"],
        "learning_rate": settings["learning_rate"],
        "lr_scheduler_type": "cosine",
        "warmup_ratio": 0.05,
        "weight_decay": 0.0,
    }


def preference_recipe(
    sft_dir: Path,
    dataset_dir: Path,
    output_dir: Path,
    seed: int,
    settings: dict,
    stage: str,
    learning_rate: float,
    tpo_keys: dict[str, Any],
) -> dict[str, Any]:
    """DPO or TPO from the SFT checkpoint: identical but for ``stage`` and the ``tpo_*`` keys.

    As in the paper's setup the vision tower is frozen and the language model and projector are fully
    fine-tuned; the reference model is the SFT checkpoint (LLaMA-Factory's default for full fine-tuning).
    """
    recipe = {
        **common_recipe(sft_dir, dataset_dir, output_dir, seed),
        "stage": stage,
        "dataset": "world_pairs",
        "freeze_vision_tower": True,
        "freeze_multi_modal_projector": False,
        "per_device_train_batch_size": settings["batch_size"],
        "max_steps": settings["steps"],
        "logging_steps": settings["logging_steps"],
        "learning_rate": learning_rate,
        "lr_scheduler_type": "cosine",
        "warmup_ratio": 0.1,
        "weight_decay": 0.0,
        "pref_beta": settings["beta"],
        "pref_loss": "sigmoid",
    }
    if stage == "tpo":
        recipe.update(tpo_keys)
    return recipe


def train(recipe: dict[str, Any], recipe_path: Path, log_path: Path) -> float:
    """Write the recipe, run ``llamafactory-cli train`` of this environment on it; return the wall time.

    The output goes to ``log_path``; a failed run raises with the log's tail, so a broken stage is never
    mistaken for a result.
    """
    recipe_path.parent.mkdir(parents=True, exist_ok=True)
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    command = [sys.executable, "-m", "llamafactory.cli", "train", str(recipe_path)]
    start = time.perf_counter()
    with open(log_path, "w") as log:
        result = subprocess.run(command, env={**os.environ, **OFFLINE_ENV}, stdout=log, stderr=subprocess.STDOUT)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        tail = log_path.read_text()[-4000:]
        raise RuntimeError(f"{' '.join(command)} failed (exit code {result.returncode}); log {log_path}:\n{tail}")
    return elapsed
