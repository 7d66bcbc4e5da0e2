"""Stability, second check (issue #19): the monitor's rule and the clip guard on worlds that did not set them.

    python -m benchmarks.hallucination_world_v2.run heldout [--out DIR] [--jobs 2] [--results PATH]

Rules: STABILITY_PROTOCOL_2.md, fixed before these runs; settings: ``heldout.json``. New world seeds 3 and 4 of
both kinds, v2's SFT and preference recipes, DPO, TPO and TPO with ``tpo_weight_clip: 0.1`` at the two largest v2
learning rates; every TPO run saves its model every 5 steps, so the model held when the shipped monitor warned is
evaluated too. Resumable like v2 (a run whose ``metrics.json`` exists is reused). Writes ``STABILITY_2.md``.
"""

from __future__ import annotations

from pathlib import Path

from .. import run
from . import load
from .common import first_step_below, logged_warning_step, mean_drift, watched_run, yes


CHECK = load("heldout")
PROTOCOL = CHECK.protocol
TPO_METHODS = tuple(
    method for method in CHECK.groups[0]["methods"] if not CHECK.groups[0]["methods"][method].get("only")
)
SAVING_CHECK = tuple(CHECK.constants["saving_check"])  # the tpo run also trained without saving (tpo_nosave)
COLLAPSE_FRACTION = CHECK.constants["collapse_fraction"]  # collapsed: recall below this × the world's SFT recall
DEGRADED_FRACTION = CHECK.constants["degraded_fraction"]  # degraded: recall below this × the world's SFT recall
warning_step = logged_warning_step


def report_check(base_runs: list[dict], tpo_runs: list[dict], path: Path, seconds: float, jobs: int) -> None:
    write_report(base_runs, tpo_runs, path, seconds, jobs)


def run_one(job: run.Job) -> dict:
    return watched_run(job, PROTOCOL)


def write_report(base_runs: list[dict], tpo_runs: list[dict], path: Path, seconds: float, jobs: int) -> None:
    sft_recall = {(r["world_kind"], r["world_seed"]): r["recall"] for r in base_runs if r["variant"] == "sft"}

    def below(record: dict, fraction: float) -> bool:
        return record["recall"] < fraction * sft_recall[record["world_kind"], record["world_seed"]]

    def collapsed(record: dict) -> bool:
        return below(record, COLLAPSE_FRACTION)

    def degraded(record: dict) -> bool:
        return below(record, DEGRADED_FRACTION)

    watched = [r for r in tpo_runs if r["variant"] in TPO_METHODS]
    dpo = {(r["world_kind"], r["world_seed"], r["learning_rate"]): r for r in base_runs if r["variant"] == "dpo"}
    lines = [
        "| world | seed | lr | method | recall (SFT) | collapsed | degraded | warning at step | recall at warning | "
        "step NLL doubled | mean drift, last | dpo: recall, collapsed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(watched, key=lambda r: (r["world_kind"], r["world_seed"], r["learning_rate"], r["variant"])):
        key = (r["world_kind"], r["world_seed"], r["learning_rate"])
        at_warning = "—" if r["recall_at_warning"] is None else f"{r['recall_at_warning']:.2f}"
        lines.append(
            f"| {key[0]} | {key[1]} | {key[2]:g} | {r['variant']} | {r['recall']:.2f} ({sft_recall[key[:2]]:.2f}) | "
            f"{yes(collapsed(r))} | {yes(degraded(r))} | {r['warning_step'] or '—'} | {at_warning} | "
            f"{first_step_below(r['history'], 2.0) or '—'} | "
            f"{mean_drift(r['history'][-1]):+.2f} | "
            f"{dpo[key]['recall']:.2f}, {yes(collapsed(dpo[key]))} |"
        )
    sections = [
        "# Stability, second check: the monitor and the guard on worlds that did not set them — results (issue #19)",
        f"Written by `python -m benchmarks.hallucination_world_v2.run heldout` "
        f"({len(base_runs) + len(tpo_runs)} runs including the worlds' SFT, {jobs} at a time; this invocation took "
        f"{seconds / 60:.0f} min, reusing runs an earlier one had finished). "
        f"Rules: STABILITY_PROTOCOL_2.md, fixed before these runs. Collapsed: object recall below "
        f"{COLLAPSE_FRACTION:g} × the world's SFT recall; degraded: below {DEGRADED_FRACTION:g} ×.",
        "## Runs\n\n" + "\n".join(lines),
        "## Verdicts\n\n" + verdicts(watched, collapsed, degraded, dpo, sft_recall),
        "## Saving changes nothing\n\n" + saving_check(tpo_runs),
    ]
    path.write_text("\n\n".join(sections) + "\n")


def verdicts(watched, collapsed, degraded, dpo, sft_recall) -> str:
    """STABILITY_PROTOCOL_2.md's verdicts 2–5."""
    fallen = [r for r in watched if collapsed(r)]
    in_time = [
        r
        for r in fallen
        if r["recall_at_warning"] is not None
        and r["recall_at_warning"] >= COLLAPSE_FRACTION * sft_recall[r["world_kind"], r["world_seed"]]
    ]
    monitor = "not tested (no TPO run collapsed)" if not fallen else yes(len(in_time) == len(fallen))
    alarms = [r for r in watched if r["warning_step"] is not None and not degraded(r)]
    unwarned = [r for r in watched if r["warning_step"] is None and degraded(r)]
    by_key = {(r["world_kind"], r["world_seed"], r["learning_rate"], r["variant"]): r for r in watched}
    tpo_fallen = [key[:3] for key, r in by_key.items() if key[3] == "tpo" and collapsed(r)]
    still = [key for key in tpo_fallen if collapsed(by_key[(*key, "tpo_clip")])]
    guard = "not tested (no tpo run collapsed)" if not tpo_fallen else yes(not still)
    dpo_fallen = sum(collapsed(r) for r in dpo.values())
    return "\n".join(
        [
            f"- **Monitor warns before collapse**: {monitor} — {len(in_time)} of {len(fallen)} collapsed TPO runs "
            f"warned while the model held then had not collapsed.",
            f"- **Monitor's false alarms** (warned, not degraded): {len(alarms)} of {len(watched)} TPO runs "
            f"({'few' if len(alarms) <= 1 else 'not few'}); degraded runs it did not warn in: {len(unwarned)}.",
            f"- **Guard prevents collapse**: {guard} — of {len(tpo_fallen)} collapsed `tpo` runs, {len(still)} "
            f"collapsed with `tpo_weight_clip` too.",
            f"- For context: {dpo_fallen} of {len(dpo)} DPO runs collapsed at the same settings.",
        ]
    )


def saving_check(tpo_runs: list[dict]) -> str:
    by_variant = {
        r["variant"]: r for r in tpo_runs if (r["world_kind"], r["world_seed"], r["learning_rate"]) == SAVING_CHECK
    }
    keys = ("recall", "prior_hallucination", "chair_i")
    difference = max(abs(by_variant["tpo"][key] - by_variant["tpo_nosave"][key]) for key in keys)
    return (
        f"World {SAVING_CHECK[0]}, seed {SAVING_CHECK[1]}, lr {SAVING_CHECK[2]:g}: largest difference of recall, "
        f"prior hallucination and CHAIR_i between `tpo` saving every 5 steps and the same run without saving: "
        f"{difference:.2g} (the protocol requires at most 1e-6)."
    )
