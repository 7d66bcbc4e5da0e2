"""``tpo-plugin sweep``: one recipe, one key, several values — one training run each, one table.

    tpo-plugin sweep recipes/qwen2_vl_7b_lora_tpo.yaml tpo_noise_step=0,250,500,750,999

Each run is an ordinary ``llamafactory-cli train RECIPE KEY=VALUE output_dir=...`` of this Python
environment, one after another, into ``<output root>/<key>-<value>``. The table (``sweep.csv`` and
``sweep.md`` in the output root) has one row per run: its final training metrics (the last logged step
and ``train_loss``) and its evaluation metrics. A failed run is reported in the table and does not stop
the sweep.
"""

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from .eval import EVAL_SPEC_HELP, evaluate_trained_run, parse_eval_specs


# Bookkeeping that says nothing about the model; left out of the table.
IGNORED_METRICS = {"epoch", "step", "grad_norm", "learning_rate", "total_flos"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", type=Path, help="a LLaMA-Factory training YAML")
    parser.add_argument("sweep", metavar="KEY=V1,V2,...", help="the key to vary and its values, comma-separated")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="overrides applied to every run (as llamafactory-cli takes)"
    )
    parser.add_argument("--output-root", type=Path, help="default: <recipe output_dir>_sweep_<key>")
    parser.add_argument("--overwrite", action="store_true", help="replace finished runs instead of refusing")
    parser.add_argument(
        "--eval", action="append", default=[], metavar=EVAL_SPEC_HELP,
        help="evaluate each trained run with `tpo-plugin eval` into <run>/eval_<name>, add its metrics (repeatable)",
    )  # fmt: skip


def parse_sweep(text: str) -> tuple[str, list[str]]:
    key, sep, values = text.partition("=")
    value_list = [value.strip() for value in values.split(",") if value.strip()]
    if not sep or not key.strip() or not value_list:
        raise ValueError(f"Expected KEY=V1,V2,... (e.g. tpo_noise_step=0,250,500), got {text!r}.")
    return key.strip(), value_list


def read_recipe(path: Path) -> dict[str, Any]:
    """The recipe as a mapping; refused (``ValueError``) before any run starts if it cannot be one."""
    import yaml

    if not path.is_file():
        raise ValueError(f"Recipe {path} does not exist.")
    try:
        recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ValueError(f"Recipe {path} is not valid YAML ({' '.join(str(error).split())}).") from None
    if not isinstance(recipe, dict):
        raise ValueError(f"Recipe {path} must be a YAML mapping of training keys.")
    return recipe


def run(args: argparse.Namespace) -> int:
    try:
        key, values = parse_sweep(args.sweep)
        evals = parse_eval_specs(args.eval)
        recipe = read_recipe(args.recipe)
    except ValueError as error:
        print(f"tpo-plugin sweep: {error}", file=sys.stderr)
        return 2

    output_root = (args.output_root or Path(f"{recipe.get('output_dir', 'saves/sweep')}_sweep_{key}")).resolve()
    run_dirs = {value: output_root / f"{key}-{value.replace(os.sep, '_')}" for value in values}
    finished = [str(path) for path in run_dirs.values() if (path / "trainer_state.json").exists()]
    if finished and not args.overwrite:
        print(f"These runs already exist (pass --overwrite to replace them): {', '.join(finished)}", file=sys.stderr)
        return 1

    output_root.mkdir(parents=True, exist_ok=True)
    rows = []
    for value, run_dir in run_dirs.items():
        command = [sys.executable, "-m", "llamafactory.cli", "train", str(args.recipe), f"{key}={value}"]
        command += [*args.overrides, f"output_dir={run_dir}", "overwrite_output_dir=true"]
        print(f"[sweep] {key}={value}: {' '.join(command)}", flush=True)
        returncode = subprocess.run(command, env=os.environ.copy()).returncode
        status = "ok" if returncode == 0 else f"failed (exit code {returncode})"
        rows.append({key: value, "status": status, **final_metrics(run_dir)})
        if returncode == 0 and evals:
            config = {**recipe, **dict(item.split("=", 1) for item in args.overrides), key: value}
            rows[-1].update(evaluate_trained_run(evals, config, run_dir))

    write_tables(rows, output_root)
    print(f"[sweep] table: {output_root / 'sweep.csv'} and {output_root / 'sweep.md'}")
    print((output_root / "sweep.md").read_text())
    statuses = [value for row in rows for column, value in row.items() if column.endswith("status")]
    return 0 if all(status == "ok" for status in statuses) else 1


def final_metrics(run_dir: Path) -> dict[str, Any]:
    """The last logged training step, ``train_loss`` and the evaluation metrics of one run."""
    state_file, results_file = run_dir / "trainer_state.json", run_dir / "all_results.json"
    if not state_file.exists():
        return {}

    history = json.loads(state_file.read_text())["log_history"]
    train_steps = [entry for entry in history if "loss" in entry]
    metrics: dict[str, Any] = {"steps": train_steps[-1]["step"] if train_steps else 0}
    if train_steps:
        metrics.update({k: v for k, v in train_steps[-1].items() if k not in IGNORED_METRICS})
    if results_file.exists():
        results = json.loads(results_file.read_text())
        metrics["train_loss"] = results.get("train_loss")
        metrics.update(
            {k: v for k, v in results.items() if k.startswith("eval_") and not k.endswith(("runtime", "per_second"))}
        )
    return metrics


def write_tables(rows: list[dict[str, Any]], output_root: Path) -> None:
    columns = list(dict.fromkeys(column for row in rows for column in row))
    with open(output_root / "sweep.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)

    def cell(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(column)) for column in columns) + " |" for row in rows]
    (output_root / "sweep.md").write_text("\n".join(lines) + "\n")
