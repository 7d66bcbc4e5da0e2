"""The pilots from which the learning rates were chosen: SFT and DPO only (no TPO), world seed 0 of each kind.

    python -m benchmarks.hallucination_world_v2.pilot [--out DIR] [--jobs 2]

Same code path as the full run (``run.run_protocol`` on ``protocol.PILOT``); prints one table row per run.
PROTOCOL_v2.md records what it printed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch


if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.hallucination_world_v2.protocol import PILOT  # noqa: E402
from benchmarks.hallucination_world_v2.run import HERE, run_protocol  # noqa: E402


COLUMNS = (
    "prior_hallucination",
    "recall",
    "partner_recall",
    "partner_recall_alone",
    "chair_i",
    "pope_accuracy",
    "pope_partner_yes_on_trigger_only",
    "kl_to_sft",
    "train_seconds",
    "eval_seconds",
)


def pilot_table(runs: list[dict]) -> str:
    lines = ["| world | method | lr | " + " | ".join(COLUMNS) + " |", "|---|---|---|" + "---|" * len(COLUMNS)]
    for run in sorted(runs, key=lambda run: (run["world_kind"], run["learning_rate"])):
        cells = [f"{run[key]:.3f}" if "seconds" not in key else f"{run[key]:.0f}" for key in COLUMNS]
        lines.append(
            f"| {run['world_kind']} | {run['variant']} | {run['learning_rate']:g} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE / "runs_pilot", help="run folder (default: runs_pilot)")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    runs = run_protocol(PILOT, args.out.resolve(), args.jobs)
    print(pilot_table(runs))
    print(f"[evidence-v2 pilot] {len(runs)} runs, {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
