"""A run's object recall step by step, next to its logged metrics: when does a collapse begin (issue #19)?

    python -m benchmarks.hallucination_world_v2.run trajectory --kind word --seed 3 --lr 1e-4 [--methods dpo,tpo]
        [--out DIR] [--jobs 2] [--append TRAJECTORY.md]

Trains each method (``trajectory.json``: v2's methods, ``tpo_clip`` and ``tpo_logprob``) from the world's SFT
model with v2's preference recipe, saving the model every 5 steps, evaluates every saved model, and prints one
table per method: step, object recall, the chosen answers' mean log-probability and (TPO) the mean score drift
and weight-term share. A diagnosis tool, not a check: the thresholds it suggests are tested on worlds it did not
see, by a protocol fixed before those runs.
"""

from __future__ import annotations

import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .. import evaluate, run
from . import group_job, load
from .common import mean_drift, with_history


CHECK = load("trajectory")
GROUP = CHECK.groups[0]
TRAJECTORY_METHODS = GROUP["methods"]


def protocol_for(kind: str, seed: int, lr: float):
    """The base protocol narrowed to one world and its SFT model (no preference run of its own)."""
    return dataclasses.replace(
        CHECK.protocol,
        world_kinds=(kind,),
        world_seeds=(seed,),
        methods=(),
        learning_rates={kind: (lr,)},
        view_learning_rates={kind: lr},
    )


def trajectory_job(protocol, out: Path, kind: str, seed: int, method: str, lr: float) -> run.Job:
    """The method from the world's SFT model, saving every 5 steps, in ``<method>-lr<lr>-saved``."""
    settings = TRAJECTORY_METHODS[method]
    return group_job(protocol, out, kind, seed, method, settings, lr, GROUP["run_dir_suffix"])


def run_trajectory(out: Path, kind: str, seed: int, lr: float, methods: list[str], jobs: int, append: Path | None):
    """The world and its SFT model, then each method's trajectory (``jobs`` at a time); the report, also appended
    to ``append`` when given."""
    protocol = protocol_for(kind, seed, lr)
    sft = run.run_protocol(protocol, out, jobs)[0]  # the world and its SFT model
    todo = [trajectory_job(protocol, out, kind, seed, method, lr) for method in methods]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        tables = list(pool.map(lambda pair: trajectory(protocol, *pair), zip(todo, methods, strict=True)))
    report = f"## World {kind}-{seed}, lr {lr:g}; SFT recall {sft['recall']:.2f}\n\n" + "\n\n".join(tables)
    if append:
        with append.open("a", encoding="utf-8") as file:
            file.write("\n" + report + "\n")
    return report


def trajectory(protocol, job: run.Job, method: str) -> str:
    """Train the job (saving every 5 steps), evaluate each saved model; the table as markdown."""
    run_dir, directory = job.run_dir, job.world_dir
    final = with_history(run.run_job(job, protocol))
    recalls = json.loads((run_dir / "recalls.json").read_text()) if (run_dir / "recalls.json").exists() else {}
    for checkpoint in sorted(run_dir.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1])):
        step = checkpoint.name.split("-")[1]
        if step not in recalls:
            metrics = evaluate.evaluate_model(checkpoint, directory, protocol.eval_batch_size)["metrics"]
            recalls[step] = metrics["recall"]
            (run_dir / "recalls.json").write_text(json.dumps(recalls))
    lines = [
        f"### {method} (final recall {final['recall']:.2f})",
        "",
        "| step | recall | logps/chosen | × first | mean drift | normalizer drift | weight-term share |",
        "|---|---|---|---|---|---|---|",
    ]
    first = final["history"][0]["logps/chosen"]
    for entry in final["history"]:
        step = str(entry["step"])
        drift = f"{mean_drift(entry):+.2f}" if "tpo/score_drift_chosen" in entry else "—"
        normalizer = f"{entry['tpo/normalizer_drift']:+.2f}" if "tpo/normalizer_drift" in entry else "—"
        share = f"{entry['tpo/weight_term_share']:.2f}" if "tpo/weight_term_share" in entry else "—"
        recall = f"{recalls[step]:.2f}" if step in recalls else ""
        lines.append(
            f"| {step} | {recall} | {entry['logps/chosen']:.2f} | {entry['logps/chosen'] / first:.2f} | "
            f"{drift} | {normalizer} | {share} |"
        )
    return "\n".join(lines)
