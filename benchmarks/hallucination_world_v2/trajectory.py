"""A run's object recall step by step, next to its logged metrics: when does a collapse begin (issue #19)?

    python -m benchmarks.hallucination_world_v2.trajectory --kind word --seed 3 --lr 1e-4 [--out DIR] [--jobs 2]

Trains DPO and TPO from the world's SFT model with v2's preference recipe, saving the model every 5 steps,
evaluates every saved model, and prints one table per method: step, object recall, the chosen answers'
mean log-probability and (TPO) the mean score drift and weight-term share. A diagnosis tool, not a check:
the thresholds it suggests are tested on worlds it did not see, by a protocol fixed before those runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch


if __package__ in (None, ""):  # run as a script: make the repository importable as the package's root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.hallucination_world import train  # noqa: E402
from benchmarks.hallucination_world_v2 import evaluate, run, stability  # noqa: E402
from benchmarks.hallucination_world_v2.protocol import FULL, METHODS  # noqa: E402


HERE = Path(__file__).resolve().parent
SAVING = {"save_strategy": "steps", "save_steps": 5, "save_only_model": True}
TRAJECTORY_METHODS = {
    **METHODS,
    "tpo_clip": {"stage": "tpo", "tpo_keys": stability.METHODS["tpo_clip"]},
    "tpo_logprob": {"stage": "tpo", "tpo_keys": {**METHODS["tpo"]["tpo_keys"], "tpo_score": "logprob"}},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=FULL.world_kinds, required=True)
    parser.add_argument("--seed", type=int, required=True, help="world seed")
    parser.add_argument("--lr", type=float, required=True, help="learning rate")
    parser.add_argument(
        "--methods", default="dpo,tpo", help=f"comma-separated, of {', '.join(TRAJECTORY_METHODS)} (default: dpo,tpo)"
    )
    parser.add_argument("--out", type=Path, default=HERE / "runs_trajectory", help="run folder")
    parser.add_argument("--jobs", type=int, default=2, help="runs trained side by side (default: 2)")
    parser.add_argument("--append", type=Path, help="also append the tables to this markdown file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.update(train.OFFLINE_ENV)
    protocol = dataclasses.replace(
        FULL,
        world_kinds=(args.kind,),
        world_seeds=(args.seed,),
        methods=(),
        learning_rates={args.kind: (args.lr,)},
        view_learning_rates={args.kind: args.lr},
    )
    out = args.out.resolve()
    sft = run.run_protocol(protocol, out, args.jobs)[0]  # the world and its SFT model
    directory = run.world_dir(out, args.kind, args.seed)
    methods = [name.strip() for name in args.methods.split(",") if name.strip()]
    unknown = [name for name in methods if name not in TRAJECTORY_METHODS]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; allowed: {', '.join(TRAJECTORY_METHODS)}")
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        tables = list(
            pool.map(lambda method: trajectory(protocol, directory, args.kind, args.seed, method, args.lr), methods)
        )
    report = f"## World {args.kind}-{args.seed}, lr {args.lr:g}; SFT recall {sft['recall']:.2f}\n\n" + "\n\n".join(
        tables
    )
    print(report)
    if args.append:
        with args.append.open("a", encoding="utf-8") as file:
            file.write("\n" + report + "\n")
    return 0


def trajectory(protocol, directory: Path, kind: str, seed: int, method: str, lr: float) -> str:
    """Train ``method`` saving every 5 steps, evaluate each saved model; the table as markdown."""
    run_dir = directory / f"{method}-lr{lr:g}-saved"
    job = run.preference_job(protocol, directory, kind, seed, method, TRAJECTORY_METHODS[method], lr, run_dir)
    job.recipe.update(SAVING)
    final = stability.with_history(run.run_job(job, protocol))
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
        drift = f"{stability.mean_drift(entry):+.2f}" if "tpo/score_drift_chosen" in entry else "—"
        normalizer = f"{entry['tpo/normalizer_drift']:+.2f}" if "tpo/normalizer_drift" in entry else "—"
        share = f"{entry['tpo/weight_term_share']:.2f}" if "tpo/weight_term_share" in entry else "—"
        recall = f"{recalls[step]:.2f}" if step in recalls else ""
        lines.append(
            f"| {step} | {recall} | {entry['logps/chosen']:.2f} | {entry['logps/chosen'] / first:.2f} | "
            f"{drift} | {normalizer} | {share} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
