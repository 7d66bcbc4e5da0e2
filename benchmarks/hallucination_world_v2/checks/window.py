"""Stability, sixth check (issue #19): the warning read at every step against the shipped block rule, on fresh
worlds.

    python -m benchmarks.hallucination_world_v2.run window [--out DIR] [--jobs 2] [--results PATH]

Rules: STABILITY_PROTOCOL_6.md, fixed before these runs; settings: ``window.json``. World seeds 10 and 11 of both
kinds, v2's SFT and preference recipes logging every step: TPO with and without ``pref_ftx: 1.0`` at the fourth
check's learning rates, saving every step, and DPO at 1e-4. Per TPO run: the step the shipped monitor (block
rule: steps 1-5, 6-10, ...) names in its log, the steps the block and sliding rules name when replayed here from
the per-step history, and the recall of the model saved at each warning. Resumable like v2. Writes
``STABILITY_6.md``.
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
    write_keeping_section,
    yes,
)


CHECK = load("window")
PROTOCOL = CHECK.protocol  # worlds, SFT and DPO at the largest rate
TPO_RATES = rates(CHECK.groups[0])  # the fourth check's rates, written out in window.json
LARGEST_RATE = CHECK.constants["largest_rate"]
COLLAPSE_FRACTION = CHECK.constants["collapse_fraction"]  # collapsed: recall below this × the world's SFT recall
DEGRADED_FRACTION = CHECK.constants["degraded_fraction"]  # degraded: recall below this × the world's SFT recall
# The rule as STABILITY_PROTOCOL_6.md states it, written out in window.json rather than read from the monitor, so
# that the replayed block rule checks the monitor's code.
WINDOW, DOUBLING, FLOOR, DRIFT = (CHECK.constants[key] for key in ("window", "doubling", "floor", "drift"))
RULES = ("block", "sliding")
NOTES = "## Notes"  # the report's hand-written section, appended after its run


def report_check(base_runs: list[dict], runs: list[dict], path: Path, seconds: float, jobs: int) -> None:
    write_report(base_runs + runs, path, jobs)


def window_steps(history: list[dict], rule: str) -> list[tuple[int, float, float]]:
    """``(last step, mean logps/chosen, mean score drift)`` of each window the rule reads, in order.

    ``history`` holds one logged entry per step from step 1. Block: steps 1-5, 6-10, ...; sliding: the five steps
    ending at each step from the fifth on.
    """
    steps = [entry["step"] for entry in history]
    if steps != list(range(1, len(steps) + 1)):
        raise ValueError(f"the replay needs one logged entry per step from step 1, got steps {steps[:10]}...")
    windows = []
    for end in range(WINDOW, len(history) + 1):
        if rule == "block" and end % WINDOW:
            continue
        entries = history[end - WINDOW : end]
        chosen = sum(entry["logps/chosen"] for entry in entries) / WINDOW
        drift = sum(mean_drift(entry) for entry in entries) / WINDOW
        windows.append((end, chosen, drift))
    return windows


def replayed_step(history: list[dict], rule: str) -> int | None:
    """The last step of the first window where the rule warns (STABILITY_PROTOCOL_6.md, Rules); None if none."""
    highest = -float("inf")
    for end, chosen, drift in window_steps(history, rule):
        highest = max(highest, chosen)
        if chosen < DOUBLING * highest and highest - chosen >= FLOOR and drift > DRIFT:
            return end
    return None


def run_one(job: run.Job) -> dict:
    """Train and evaluate; then each rule's warning step and the recall of the checkpoint saved there."""
    record = with_history(run.run_job(job, PROTOCOL))
    extra = job.run_dir / "rules.json"
    if not extra.exists():
        steps = {rule: replayed_step(record["history"], rule) for rule in RULES}
        logged = logged_warning_step(job.run_dir / "train.log")
        recalls = checkpoint_recalls(job, [logged, steps["sliding"]], CHECK.constants["eval_batch_size"])
        warnings = {"logged": (logged, recalls[logged]), "sliding": (steps["sliding"], recalls[steps["sliding"]])}
        extra.write_text(json.dumps({"warnings": warnings, "replayed_block": steps["block"]}))
    return {**record, **json.loads(extra.read_text())}


def write_report(records: list[dict], path: Path, jobs: int) -> None:
    worlds = [(kind, seed) for seed in PROTOCOL.world_seeds for kind in PROTOCOL.world_kinds]
    by_key, watched = keyed_records(records, worlds, TPO_RATES)
    rules = {"logged": "block rule", "sliding": "sliding rule"}
    sections = [
        "# Stability, sixth check: the warning read at every step, on fresh worlds — results (#19)",
        f"Written by `python -m benchmarks.hallucination_world_v2.run window` ({len(records)} runs including "
        f"the worlds' SFT, {jobs} at a time, on {cpu_model()}; "
        f"{run_minutes(records):.0f} min of training and evaluation summed over the runs). Rules: "
        f"STABILITY_PROTOCOL_6.md, fixed before these runs. Both rules warn at the first {WINDOW}-step window whose "
        f"mean `logps/chosen` is below {DOUBLING:g} × the highest window mean so far and at least {FLOOR:g} nat "
        f"below it, with mean score drift above {DRIFT:g}; block rule (shipped): windows 1–5, 6–10, …, the step the "
        f"monitor names in its log; sliding rule: a window ending at every step, replayed from the per-step "
        f"history. `tpo_anchor`: `pref_ftx: 1`. Collapsed: object recall below {COLLAPSE_FRACTION:g} × "
        f"the world's SFT recall; degraded: below {DEGRADED_FRACTION:g} ×.",
        "## Runs\n\n" + runs_table(by_key, watched, rules, CHECK.constants),
        "## Verdicts\n\n" + verdicts(by_key, watched, worlds),
    ]
    write_keeping_section(path, sections, NOTES)


def verdicts(by_key: dict, watched: list[dict], worlds: list[tuple[str, int]]) -> str:
    """STABILITY_PROTOCOL_6.md's verdicts 2–5."""
    names = {"logged": "Block rule", "sliding": "Sliding rule"}
    counts, lines = rule_verdicts(by_key, watched, "replayed_block", names, CHECK.constants)
    both = [r for r in watched if r["warnings"]["logged"][0] is not None and r["warnings"]["sliding"][0] is not None]
    earlier = ", ".join(
        f"{r['world_kind']}-{r['world_seed']} {r['variant']} {r['learning_rate']:g}: "
        f"{r['warnings']['logged'][0] - r['warnings']['sliding'][0]}"
        for r in both
    )
    lines.append(f"- **Steps earlier** (sliding rule, where both warned): {earlier or 'no run warned under both'}.")
    (block_timely, block_alarms), (sliding_timely, sliding_alarms) = counts["logged"], counts["sliding"]
    adopted = len(sliding_timely) > len(block_timely) and len(sliding_alarms) <= len(block_alarms) + 1
    lines.append(
        f"- **The sliding rule is adopted** (in time for more collapses, at most one more false alarm): "
        f"{yes(adopted)}."
    )
    lines.append(guard_verdict(by_key, worlds, CHECK.constants))
    return "\n".join(lines)
