"""Stability, sixth check (issue #19): the warning read at every step against the shipped block rule, on fresh
worlds.

    python -m benchmarks.hallucination_world_v2.stability_window [--out DIR] [--jobs 2] [--results PATH]

Rules: STABILITY_PROTOCOL_6.md, fixed before these runs. World seeds 10 and 11 of both kinds, v2's SFT and
preference recipes logging every step: TPO with and without ``pref_ftx: 1.0`` at the fourth check's learning
rates, saving every step, and DPO at 1e-4. Per TPO run: the step the shipped monitor (block rule: steps 1-5, 6-10,
...) names in its log, the steps the block and sliding rules name when replayed here from the per-step history,
and the recall of the model saved at each warning. Resumable like v2. Writes ``STABILITY_6.md``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


if __package__ in (None, ""):  # run as a script: make the repository importable as the package's root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.hallucination_world_v2 import (  # noqa: E402
    run,
    stability,
    stability_anchor,
    stability_floor,
    stability_heldout,
)
from benchmarks.hallucination_world_v2.protocol import FULL  # noqa: E402
from benchmarks.hallucination_world_v2.world import PIXEL, WORD  # noqa: E402


HERE = Path(__file__).resolve().parent
LARGEST_RATE, TPO_RATES = stability_floor.LARGEST_RATE, stability_floor.TPO_RATES  # the fourth check's rates
PROTOCOL = dataclasses.replace(  # worlds, SFT and DPO at the largest rate
    FULL,
    world_seeds=(10, 11),
    methods=("dpo",),
    preference={**FULL.preference, "logging_steps": 1},
    learning_rates={PIXEL: (LARGEST_RATE,), WORD: (LARGEST_RATE,)},
    view_learning_rates={PIXEL: LARGEST_RATE, WORD: LARGEST_RATE},
)
SAVING = {"save_strategy": "steps", "save_steps": 1, "save_only_model": True}
# The rule as STABILITY_PROTOCOL_6.md states it, written out here rather than read from the monitor, so that the
# replayed block rule checks the monitor's code.
WINDOW, DOUBLING, FLOOR, DRIFT = 5, 2.0, 1.0, 0.25
RULES = ("block", "sliding")
NOTES = "## Notes"  # the report's hand-written section, appended after its run


def main(argv: list[str] | None = None) -> int:
    args = run.check_arguments(__doc__, HERE / "runs_window", HERE / "STABILITY_6.md", argv)
    start = time.perf_counter()
    out = args.out.resolve()
    base_runs = run.run_protocol(PROTOCOL, out, args.jobs)
    jobs = [
        job
        for seed in PROTOCOL.world_seeds
        for kind in PROTOCOL.world_kinds
        for lr in TPO_RATES[kind]
        for job in stability_anchor.anchored_jobs(PROTOCOL, out, kind, seed, lr)
        if job.recipe["stage"] == "tpo"
    ]
    for job in jobs:
        job.recipe.update(SAVING)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        runs = list(pool.map(watched_run, jobs))
    write_report(base_runs + runs, args.results, args.jobs)
    print(f"[stability-window] {len(base_runs) + len(runs)} runs in {time.perf_counter() - start:.0f} s")
    return 0


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
        drift = sum(stability.mean_drift(entry) for entry in entries) / WINDOW
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


def watched_run(job: run.Job) -> dict:
    """Train and evaluate; then each rule's warning step and the recall of the checkpoint saved there."""
    record = stability.with_history(run.run_job(job, PROTOCOL))
    extra = job.run_dir / "rules.json"
    if not extra.exists():
        steps = {rule: replayed_step(record["history"], rule) for rule in RULES}
        logged = stability_heldout.warning_step(job.run_dir / "train.log")
        recalls = stability_heldout.checkpoint_recalls(job, [logged, steps["sliding"]])
        warnings = {"logged": (logged, recalls[logged]), "sliding": (steps["sliding"], recalls[steps["sliding"]])}
        extra.write_text(json.dumps({"warnings": warnings, "replayed_block": steps["block"]}))
    return {**record, **json.loads(extra.read_text())}


def write_report(records: list[dict], path: Path, jobs: int) -> None:
    worlds = [(kind, seed) for seed in PROTOCOL.world_seeds for kind in PROTOCOL.world_kinds]
    by_key, watched = stability_floor.keyed_records(records, worlds, TPO_RATES)
    rules = {"logged": "block rule", "sliding": "sliding rule"}
    sections = [
        "# Stability, sixth check: the warning read at every step, on fresh worlds — results (#19)",
        f"Written by `python -m benchmarks.hallucination_world_v2.stability_window` ({len(records)} runs including "
        f"the worlds' SFT, {jobs} at a time, on {stability_anchor.cpu_model()}; "
        f"{stability_anchor.run_minutes(records):.0f} min of training and evaluation summed over the runs). Rules: "
        f"STABILITY_PROTOCOL_6.md, fixed before these runs. Both rules warn at the first {WINDOW}-step window whose "
        f"mean `logps/chosen` is below {DOUBLING:g} × the highest window mean so far and at least {FLOOR:g} nat "
        f"below it, with mean score drift above {DRIFT:g}; block rule (shipped): windows 1–5, 6–10, …, the step the "
        f"monitor names in its log; sliding rule: a window ending at every step, replayed from the per-step "
        f"history. `tpo_anchor`: `pref_ftx: 1`. Collapsed: object recall below {stability.COLLAPSE_FRACTION:g} × "
        f"the world's SFT recall; degraded: below {stability_heldout.DEGRADED_FRACTION:g} ×.",
        "## Runs\n\n" + stability_floor.runs_table(by_key, watched, rules),
        "## Verdicts\n\n" + verdicts(by_key, watched, worlds),
    ]
    stability_anchor.write_keeping_section(path, sections, NOTES)


def verdicts(by_key: dict, watched: list[dict], worlds: list[tuple[str, int]]) -> str:
    """STABILITY_PROTOCOL_6.md's verdicts 2–5."""
    names = {"logged": "Block rule", "sliding": "Sliding rule"}
    counts, lines = stability_floor.rule_verdicts(by_key, watched, "replayed_block", names)
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
        f"{_yes(adopted)}."
    )
    lines.append(stability_floor.guard_verdict(by_key, worlds))
    return "\n".join(lines)


def _yes(value: bool) -> str:
    return "yes" if value else "no"


if __name__ == "__main__":
    sys.exit(main())
