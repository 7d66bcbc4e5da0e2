"""Stability, fifth check (issue #19): the warning's one-nat floor against the doubling rule, on fresh worlds.

    python -m benchmarks.hallucination_world_v2.run floor [--out DIR] [--jobs 2] [--results PATH]

Rules: STABILITY_PROTOCOL_5.md, fixed before these runs; settings: ``floor.json``. World seeds 8 and 9 of both
kinds, v2's SFT and preference recipes: TPO with and without ``pref_ftx: 1.0`` at the fourth check's learning
rates, saving every 5 steps, and DPO at 1e-4. Per TPO run: the step the shipped monitor (floor rule) names in its
log, the step the doubling rule would have named (replayed here from the logged history), and the recall of the
model saved at each. Resumable like v2. Writes ``STABILITY_5.md``.
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import run
from . import load, rates
from .common import (
    checkpoint_recalls,
    cpu_model,
    guard_verdict,
    keyed_records,
    logged_warning_step,
    mean_drift,
    rule_verdicts,
    run_minutes,
    runs_table,
    with_history,
    yes,
)


CHECK = load("floor")
PROTOCOL = CHECK.protocol  # worlds, SFT and DPO at the largest rate
TPO_RATES = rates(CHECK.groups[0])
LARGEST_RATE = CHECK.constants["largest_rate"]
COLLAPSE_FRACTION = CHECK.constants["collapse_fraction"]  # collapsed: recall below this × the world's SFT recall
DEGRADED_FRACTION = CHECK.constants["degraded_fraction"]  # degraded: recall below this × the world's SFT recall
# The two rules as STABILITY_PROTOCOL_5.md states them, written out in floor.json rather than read from the
# monitor, so the replay of the floor rule checks the monitor's code.
DOUBLING, DRIFT, FLOOR = (CHECK.constants[key] for key in ("doubling", "drift", "floor"))
RULES = {"floor": FLOOR, "doubling": 0.0}  # each rule's least fall of logps/chosen below its highest, in nats


def report_check(base_runs: list[dict], runs: list[dict], path: Path, seconds: float, jobs: int) -> None:
    write_report(base_runs + runs, path, jobs)


def replayed_step(history: list[dict], least_fall: float) -> int | None:
    """The first logged step where ``logps/chosen`` is below DOUBLING × the highest logged so far and at least
    ``least_fall`` below it, while the mean score drift is above DRIFT; None if there is none."""
    highest = -float("inf")
    for entry in history:
        chosen = entry["logps/chosen"]
        highest = max(highest, chosen)
        if chosen < DOUBLING * highest and highest - chosen >= least_fall and mean_drift(entry) > DRIFT:
            return entry["step"]
    return None


def run_one(job: run.Job) -> dict:
    """Train and evaluate; then each rule's warning step and the recall of the checkpoint saved there."""
    record = with_history(run.run_job(job, PROTOCOL))
    extra = job.run_dir / "rules.json"
    if not extra.exists():
        steps = {rule: replayed_step(record["history"], fall) for rule, fall in RULES.items()}
        logged = logged_warning_step(job.run_dir / "train.log")
        recalls = checkpoint_recalls(job, [logged, steps["doubling"]], CHECK.constants["eval_batch_size"])
        warnings = {"logged": (logged, recalls[logged]), "doubling": (steps["doubling"], recalls[steps["doubling"]])}
        extra.write_text(json.dumps({"warnings": warnings, "replayed_floor": steps["floor"]}))
    return {**record, **json.loads(extra.read_text())}


def write_report(records: list[dict], path: Path, jobs: int) -> None:
    worlds = [(kind, seed) for seed in PROTOCOL.world_seeds for kind in PROTOCOL.world_kinds]
    by_key, watched = keyed_records(records, worlds, TPO_RATES)
    rules = {"logged": "floor rule", "doubling": "doubling rule"}
    sections = [
        "# Stability, fifth check: the warning's one-nat floor on fresh worlds — results (#19)",
        f"Written by `python -m benchmarks.hallucination_world_v2.run floor` ({len(records)} runs including "
        f"the worlds' SFT, {jobs} at a time, on {cpu_model()}; "
        f"{run_minutes(records):.0f} min of training and evaluation summed over the runs). Rules: "
        f"STABILITY_PROTOCOL_5.md, fixed before these runs. Floor rule: the shipped monitor's warning "
        f"(`logps/chosen` below {DOUBLING:g} × its highest and at least {FLOOR:g} nat below it, mean score drift "
        f"above {DRIFT:g}); doubling rule: the same without the nat, replayed from the logged history. "
        f"`tpo_anchor`: `pref_ftx: 1`. Collapsed: object recall below {COLLAPSE_FRACTION:g} × the "
        f"world's SFT recall; degraded: below {DEGRADED_FRACTION:g} ×.",
        "## Runs\n\n" + runs_table(by_key, watched, rules, CHECK.constants),
        "## Verdicts\n\n" + verdicts(by_key, watched, worlds),
    ]
    path.write_text("\n\n".join(sections) + "\n")


def verdicts(by_key: dict, watched: list[dict], worlds: list[tuple[str, int]]) -> str:
    """STABILITY_PROTOCOL_5.md's verdicts 2–5."""
    rule_names = {"logged": "Floor rule", "doubling": "Doubling rule"}
    counts, lines = rule_verdicts(by_key, watched, "replayed_floor", rule_names, CHECK.constants)
    (floor_timely, floor_alarms), (doubling_timely, doubling_alarms) = counts["logged"], counts["doubling"]
    kept = len(floor_alarms) < len(doubling_alarms) and all(r in floor_timely for r in doubling_timely)
    lines.append(
        f"- **The floor is kept** (fewer false alarms, and in time for every collapse the doubling rule was): "
        f"{yes(kept)}."
    )
    lines.append(guard_verdict(by_key, worlds, CHECK.constants))
    return "\n".join(lines)
