"""``tpo-plugin demo``: TPO end to end, offline, in about a minute on a laptop CPU.

Builds a tiny random-weight Qwen2-VL (or LLaVA-1.5) locally if it is not there yet, writes an ordinary
``stage: tpo`` recipe for the shipped ``tpo_demo`` pairs (rejected answers name an object that is not
in the image), trains it with ``llamafactory-cli train`` of this Python environment, and says where the
adapter, the plots and the metrics are. The recipe is kept next to them, to read or to rerun.
"""

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


TEMPLATES = {"qwen2_vl": "qwen2_vl", "llava": "llava"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", default="saves/tpo_demo", help="where the run writes (default: %(default)s)")
    parser.add_argument("--family", choices=sorted(TEMPLATES), default="qwen2_vl", help="tiny model family")
    parser.add_argument("--epochs", type=float, default=3.0, help="training epochs over the 40 demo pairs")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a finished demo run in --output-dir instead of refusing"
    )


def data_info_dir() -> Path:
    """The repository's ``data_info`` folder, which ships the demo pairs."""
    folder = Path(__file__).resolve().parents[2] / "data_info"
    if not (folder / "tpo_demo.json").is_file():
        raise FileNotFoundError(
            f"The demo data was not found at {folder}; run the demo from a clone of tpo-plugin installed with "
            "`pip install -e .`."
        )
    return folder


def demo_recipe(model_dir: Path, family: str, run_dir: Path, epochs: float) -> dict[str, Any]:
    """A small LoRA TPO recipe; everything but the model and data is an ordinary user's choice."""
    return {
        "model_name_or_path": str(model_dir),
        "stage": "tpo",
        "do_train": True,
        "finetuning_type": "lora",
        "lora_target": "all",
        "lora_rank": 8,
        "dataset": "tpo_demo",
        "dataset_dir": str(data_info_dir()),
        "template": TEMPLATES[family],
        "cutoff_len": 256,
        "val_size": 0.2,
        "output_dir": str(run_dir),
        "overwrite_output_dir": True,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 4,
        "num_train_epochs": epochs,
        "learning_rate": 1.0e-3,  # a tiny random model learns nothing visible at real-model rates
        "lr_scheduler_type": "cosine",
        "warmup_ratio": 0.1,
        "logging_steps": 1,
        "eval_strategy": "epoch",
        "save_strategy": "no",
        "plot_loss": True,
        "report_to": "none",
        "seed": 42,
        "pref_beta": 0.1,
        "tpo_noise_step": 500,
    }


def run(args: argparse.Namespace) -> int:
    # 0 or fewer epochs train nothing, nan and inf fail inside training: refused before the model is built.
    if not (0 < args.epochs < math.inf):
        print(f"tpo-plugin demo: --epochs must be a positive number, got {args.epochs:g}.", file=sys.stderr)
        return 2

    from ..testing.tiny_models import OFFLINE_ENV, build_tiny_model

    output_dir = Path(args.output_dir).resolve()
    run_dir = output_dir / "run"
    if (run_dir / "trainer_state.json").exists() and not args.overwrite:
        print(f"{run_dir} already holds a finished run; pass --overwrite to replace it.", file=sys.stderr)
        return 1

    print(f"Building the tiny {args.family} model (once) ...", flush=True)
    model_dir = build_tiny_model(args.family, output_dir / f"tiny-{args.family}")
    recipe = output_dir / "tpo_demo.yaml"
    recipe.write_text(_to_yaml(demo_recipe(model_dir, args.family, run_dir, args.epochs)))

    command = [sys.executable, "-m", "llamafactory.cli", "train", str(recipe)]
    print("Training:", " ".join(command), flush=True)
    result = subprocess.run(command, env={**os.environ, **OFFLINE_ENV})
    if result.returncode != 0:
        print(f"Training failed (exit code {result.returncode}); the recipe is {recipe}.", file=sys.stderr)
        return result.returncode

    print(summary(run_dir, recipe))
    return 0


def summary(run_dir: Path, recipe: Path) -> str:
    results = json.loads((run_dir / "all_results.json").read_text())
    steps = [
        entry for entry in json.loads((run_dir / "trainer_state.json").read_text())["log_history"] if "loss" in entry
    ]
    first, last = steps[0], steps[-1]
    plots = sorted(path.name for path in run_dir.glob("training_*.png"))
    rows = [
        ("loss", first["loss"], last["loss"]),
        ("rewards/accuracies", first["rewards/accuracies"], last["rewards/accuracies"]),
        ("tpo/weight_chosen", first["tpo/weight_chosen"], last["tpo/weight_chosen"]),
        ("tpo/weight_rejected", first["tpo/weight_rejected"], last["tpo/weight_rejected"]),
    ]
    lines = [
        "",
        "TPO demo finished.",
        f"  recipe   {recipe}",
        f"  adapter  {run_dir / 'adapter_model.safetensors'}",
        f"  metrics  {run_dir / 'all_results.json'} (train_loss {results['train_loss']:.4f}, "
        f"eval_loss {results.get('eval_loss', float('nan')):.4f}) and {run_dir / 'trainer_state.json'}",
        f"  plots    {run_dir}/" + ", ".join(plots),
        "",
        f"  {'metric':<22}{'first step':>12}{'last step':>12}",
    ]
    lines += [f"  {name:<22}{start:>12.4f}{end:>12.4f}" for name, start, end in rows]
    return "\n".join(lines)


def _to_yaml(config: dict[str, Any]) -> str:
    import yaml

    return "# Written by `tpo-plugin demo`; rerun with: llamafactory-cli train <this file>\n" + yaml.safe_dump(
        config, sort_keys=False
    )
