"""Stability, third check (issue #19): the likelihood anchor ``pref_ftx`` and the earlier warning on fresh worlds.

    python -m benchmarks.hallucination_world_v2.run anchor [--out DIR] [--jobs 2] [--results PATH]

Rules: STABILITY_PROTOCOL_3.md, fixed before these runs; settings: ``anchor.json``. World seed 5 of both kinds,
v2's SFT and preference recipes at lr 1e-4: DPO and TPO, each with and without ``pref_ftx: 1.0``; the TPO runs
save their model every 5 steps, so the model held when the shipped monitor warned is evaluated too. Resumable
like v2. Writes ``STABILITY_3.md``.
"""

from __future__ import annotations

from pathlib import Path

from .. import run
from . import load
from .common import cpu_model, mean_drift, run_minutes, watched_run, write_keeping_section, yes


CHECK = load("anchor")
PROTOCOL = CHECK.protocol
LEARNING_RATE = CHECK.constants["learning_rate"]
ANCHORED_METHODS = tuple(CHECK.groups[0]["methods"])
COLLAPSE_FRACTION = CHECK.constants["collapse_fraction"]  # collapsed: recall below this × the world's SFT recall
DEGRADED_FRACTION = CHECK.constants["degraded_fraction"]  # degraded: recall below this × the world's SFT recall
EXPLORATION = "## What led here"  # the report's hand-written section, appended after its first run


def run_one(job: run.Job) -> dict:
    """A TPO run with its warning step and the recall of that step's checkpoint; a DPO run as v2's."""
    return watched_run(job, PROTOCOL) if job.recipe["stage"] == "tpo" else run.run_job(job, PROTOCOL)


def report_check(base_runs: list[dict], runs: list[dict], path: Path, seconds: float, jobs: int) -> None:
    write_report(base_runs + runs, path, jobs)


def write_report(records: list[dict], path: Path, jobs: int) -> None:
    """Write the report; a hand-written section from ``EXPLORATION`` on in an earlier report is kept."""
    by_key = {(r["world_kind"], r["variant"]): r for r in records}
    sft = {kind: by_key[kind, "sft"]["recall"] for kind in PROTOCOL.world_kinds}

    def collapsed(r: dict) -> bool:
        return r["recall"] < COLLAPSE_FRACTION * sft[r["world_kind"]]

    def degraded(r: dict) -> bool:
        return r["recall"] < DEGRADED_FRACTION * sft[r["world_kind"]]

    methods = ("dpo", *ANCHORED_METHODS)
    lines = [
        "| world | method | recall (SFT) | prior hallucination | CHAIR_i | collapsed | degraded | warning at step | "
        "recall at warning | mean drift, last |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind in PROTOCOL.world_kinds:
        for method in methods:
            r = by_key[kind, method]
            watched = "warning_step" in r
            at_warning = "—" if not watched or r["recall_at_warning"] is None else f"{r['recall_at_warning']:.2f}"
            step = (r["warning_step"] or "—") if watched else "—"
            drift = f"{mean_drift(r['history'][-1]):+.2f}" if watched else "—"
            lines.append(
                f"| {kind}-{PROTOCOL.world_seeds[0]} | {method} | {r['recall']:.2f} ({sft[kind]:.2f}) | "
                f"{r['prior_hallucination']:.3f} | {r['chair_i']:.3f} | {yes(collapsed(r))} | {yes(degraded(r))} | "
                f"{step} | {at_warning} | {drift} |"
            )
    sections = [
        "# Stability, third check: the likelihood anchor and the earlier warning on fresh worlds — results (#19)",
        f"Written by `python -m benchmarks.hallucination_world_v2.run anchor` ({len(records)} runs including "
        f"the worlds' SFT, {jobs} at a time, on {cpu_model()}; {run_minutes(records):.0f} min of training and "
        f"evaluation summed over the runs). Rules: STABILITY_PROTOCOL_3.md, fixed "
        f"before these runs. Learning rate {LEARNING_RATE:g}; `_anchor`: `pref_ftx: 1.0`. Collapsed: object recall "
        f"below {COLLAPSE_FRACTION:g} × the world's SFT recall; degraded: below "
        f"{DEGRADED_FRACTION:g} ×.",
        "## Runs\n\n" + "\n".join(lines),
        "## Verdicts\n\n" + verdicts(by_key, sft, collapsed, degraded),
    ]
    write_keeping_section(path, sections, EXPLORATION)


def verdicts(by_key: dict, sft: dict, collapsed, degraded) -> str:
    """STABILITY_PROTOCOL_3.md's verdicts 2–5."""
    kinds = PROTOCOL.world_kinds
    watched = [by_key[kind, method] for kind in kinds for method in ("tpo", "tpo_anchor")]
    fallen = [r for r in watched if collapsed(r)]

    def warned_above(r: dict, fraction: float) -> bool:
        held = r["recall_at_warning"]
        return held is not None and held >= fraction * sft[r["world_kind"]]

    in_time = [r for r in fallen if warned_above(r, COLLAPSE_FRACTION)]
    monitor = "not tested (no TPO run collapsed)" if not fallen else yes(len(in_time) == len(fallen))
    worse = [r for r in watched if degraded(r)]
    early = [r for r in worse if warned_above(r, DEGRADED_FRACTION)]
    alarms = [r for r in watched if r["warning_step"] is not None and not degraded(r)]

    def guard(fell) -> str:
        worlds = [kind for kind in kinds if fell(by_key[kind, "tpo"])]
        if not worlds:
            return "not tested (`tpo` did not in either world)"
        still = [kind for kind in worlds if fell(by_key[kind, "tpo_anchor"])]
        return f"{yes(not still)} — `tpo` did in {', '.join(worlds)}; `tpo_anchor` did too in {len(still)} of them"

    gains = []
    for kind in kinds:
        tpo, dpo = by_key[kind, "tpo_anchor"], by_key[kind, "dpo_anchor"]
        gains.append(
            f"{kind}: prior hallucination {tpo['prior_hallucination'] - dpo['prior_hallucination']:+.3f}, CHAIR_i "
            f"{tpo['chair_i'] - dpo['chair_i']:+.3f}, recall {tpo['recall'] - dpo['recall']:+.3f}"
        )
    return "\n".join(
        [
            f"- **Monitor warns before collapse**: {monitor} — {len(in_time)} of {len(fallen)} collapsed TPO runs "
            f"warned while the model then held had not collapsed. Degraded TPO runs: {len(worse)}, of which "
            f"{len(early)} warned while recall was still at least {DEGRADED_FRACTION:g} × SFT's.",
            f"- **Monitor's false alarms** (warned, not degraded): {len(alarms)} of {len(watched)} TPO runs.",
            f"- **Guard prevents collapse**: {guard(collapsed)}.",
            f"- **Guard prevents degradation**: {guard(degraded)}.",
            f"- **`tpo_anchor` minus `dpo_anchor`** (negative: TPO hallucinates less): {'; '.join(gains)}.",
        ]
    )
