"""Stability, third check (issue #19): the likelihood anchor ``pref_ftx`` and the earlier warning on fresh worlds.

    python -m benchmarks.hallucination_world_v2.stability_anchor [--out DIR] [--jobs 2] [--results PATH]

Rules: STABILITY_PROTOCOL_3.md, fixed before these runs. World seed 5 of both kinds, v2's SFT and preference
recipes at lr 1e-4: DPO and TPO, each with and without ``pref_ftx: 1.0``; the TPO runs save their model every 5
steps, so the model held when the shipped monitor warned is evaluated too. Resumable like v2. Writes
``STABILITY_3.md``.
"""

from __future__ import annotations

import dataclasses
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


if __package__ in (None, ""):  # run as a script: make the repository importable as the package's root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.hallucination_world_v2 import run, stability, stability_heldout  # noqa: E402
from benchmarks.hallucination_world_v2.protocol import FULL, TPO_DEFAULTS, Protocol  # noqa: E402
from benchmarks.hallucination_world_v2.world import PIXEL, WORD  # noqa: E402


HERE = Path(__file__).resolve().parent
LEARNING_RATE = 1e-4
PROTOCOL = dataclasses.replace(
    FULL,
    world_seeds=(5,),
    methods=("dpo",),
    learning_rates={PIXEL: (LEARNING_RATE,), WORD: (LEARNING_RATE,)},
    view_learning_rates={PIXEL: LEARNING_RATE, WORD: LEARNING_RATE},
)
ANCHOR = {"pref_ftx": 1.0}
EXPLORATION = "## What led here"  # the report's hand-written section, appended after its first run
ANCHORED_METHODS = {
    "dpo_anchor": {"stage": "dpo", "tpo_keys": {}},
    "tpo": {"stage": "tpo", "tpo_keys": TPO_DEFAULTS},
    "tpo_anchor": {"stage": "tpo", "tpo_keys": TPO_DEFAULTS},
}


def main(argv: list[str] | None = None) -> int:
    args = run.check_arguments(__doc__, HERE / "runs_anchor", HERE / "STABILITY_3.md", argv)
    start = time.perf_counter()
    out = args.out.resolve()
    base_runs = run.run_protocol(PROTOCOL, out, args.jobs)  # worlds, SFT and DPO
    seed = PROTOCOL.world_seeds[0]
    jobs = [job for kind in PROTOCOL.world_kinds for job in anchored_jobs(PROTOCOL, out, kind, seed, LEARNING_RATE)]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        runs = list(pool.map(lambda job: one_run(job, PROTOCOL), jobs))
    write_report(base_runs + runs, args.results, args.jobs)
    print(
        f"[stability-anchor] {len(base_runs) + len(runs)} runs in {time.perf_counter() - start:.0f} s; "
        f"report: {args.results}"
    )
    return 0


def anchored_jobs(protocol: Protocol, out: Path, kind: str, seed: int, lr: float) -> list[run.Job]:
    """``dpo_anchor``, ``tpo`` and ``tpo_anchor`` at learning rate ``lr``; the TPO runs save every 5 steps."""
    directory = run.world_dir(out, kind, seed)
    jobs = []
    for method, settings in ANCHORED_METHODS.items():
        job = run.preference_job(protocol, directory, kind, seed, method, settings, lr)
        if method.endswith("_anchor"):
            job.recipe.update(ANCHOR)  # LLaMA-Factory key of both stages (preference_recipe adds tpo_keys to TPO only)
        if settings["stage"] == "tpo":
            job.recipe.update(stability_heldout.SAVING)
        jobs.append(job)
    return jobs


def one_run(job: run.Job, protocol: Protocol) -> dict:
    if job.recipe["stage"] == "tpo":  # with its warning step and the recall of that step's checkpoint
        return stability_heldout.watched_run(job)
    return run.run_job(job, protocol)


def write_report(records: list[dict], path: Path, jobs: int) -> None:
    """Write the report; a hand-written section from ``EXPLORATION`` on in an earlier report is kept."""
    by_key = {(r["world_kind"], r["variant"]): r for r in records}
    sft = {kind: by_key[kind, "sft"]["recall"] for kind in PROTOCOL.world_kinds}

    def collapsed(r: dict) -> bool:
        return r["recall"] < stability.COLLAPSE_FRACTION * sft[r["world_kind"]]

    def degraded(r: dict) -> bool:
        return r["recall"] < stability_heldout.DEGRADED_FRACTION * sft[r["world_kind"]]

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
            drift = f"{stability.mean_drift(r['history'][-1]):+.2f}" if watched else "—"
            lines.append(
                f"| {kind}-{PROTOCOL.world_seeds[0]} | {method} | {r['recall']:.2f} ({sft[kind]:.2f}) | "
                f"{r['prior_hallucination']:.3f} | {r['chair_i']:.3f} | {_yes(collapsed(r))} | {_yes(degraded(r))} | "
                f"{step} | {at_warning} | {drift} |"
            )
    sections = [
        "# Stability, third check: the likelihood anchor and the earlier warning on fresh worlds — results (#19)",
        f"Written by `python -m benchmarks.hallucination_world_v2.stability_anchor` ({len(records)} runs including "
        f"the worlds' SFT, {jobs} at a time, on {cpu_model()}; {run_minutes(records):.0f} min of training and "
        f"evaluation summed over the runs). Rules: STABILITY_PROTOCOL_3.md, fixed "
        f"before these runs. Learning rate {LEARNING_RATE:g}; `_anchor`: `pref_ftx: 1.0`. Collapsed: object recall "
        f"below {stability.COLLAPSE_FRACTION:g} × the world's SFT recall; degraded: below "
        f"{stability_heldout.DEGRADED_FRACTION:g} ×.",
        "## Runs\n\n" + "\n".join(lines),
        "## Verdicts\n\n" + verdicts(by_key, sft, collapsed, degraded),
    ]
    write_keeping_section(path, sections, EXPLORATION)


def write_keeping_section(path: Path, sections: list[str], heading: str) -> None:
    """Write the report's sections; an earlier report's hand-written part, from ``heading`` on, is kept."""
    earlier = path.read_text() if path.exists() else ""
    kept = earlier[earlier.index(heading) :].rstrip("\n") if heading in earlier else None
    path.write_text("\n\n".join(sections + ([kept] if kept else [])) + "\n")


def verdicts(by_key: dict, sft: dict, collapsed, degraded) -> str:
    """STABILITY_PROTOCOL_3.md's verdicts 2–5."""
    kinds = PROTOCOL.world_kinds
    watched = [by_key[kind, method] for kind in kinds for method in ("tpo", "tpo_anchor")]
    fallen = [r for r in watched if collapsed(r)]

    def warned_above(r: dict, fraction: float) -> bool:
        held = r["recall_at_warning"]
        return held is not None and held >= fraction * sft[r["world_kind"]]

    in_time = [r for r in fallen if warned_above(r, stability.COLLAPSE_FRACTION)]
    monitor = "not tested (no TPO run collapsed)" if not fallen else _yes(len(in_time) == len(fallen))
    worse = [r for r in watched if degraded(r)]
    early = [r for r in worse if warned_above(r, stability_heldout.DEGRADED_FRACTION)]
    alarms = [r for r in watched if r["warning_step"] is not None and not degraded(r)]

    def guard(fell) -> str:
        worlds = [kind for kind in kinds if fell(by_key[kind, "tpo"])]
        if not worlds:
            return "not tested (`tpo` did not in either world)"
        still = [kind for kind in worlds if fell(by_key[kind, "tpo_anchor"])]
        return f"{_yes(not still)} — `tpo` did in {', '.join(worlds)}; `tpo_anchor` did too in {len(still)} of them"

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
            f"{len(early)} warned while recall was still at least {stability_heldout.DEGRADED_FRACTION:g} × SFT's.",
            f"- **Monitor's false alarms** (warned, not degraded): {len(alarms)} of {len(watched)} TPO runs.",
            f"- **Guard prevents collapse**: {guard(collapsed)}.",
            f"- **Guard prevents degradation**: {guard(degraded)}.",
            f"- **`tpo_anchor` minus `dpo_anchor`** (negative: TPO hallucinates less): {'; '.join(gains)}.",
        ]
    )


def run_minutes(records: list[dict]) -> float:
    """The runs' training and final evaluation time, summed: the same however many invocations produced them."""
    return sum(r.get("train_seconds", 0.0) + r.get("eval_seconds", 0.0) for r in records) / 60


def cpu_model() -> str:
    """The CPU's model name (the worlds' outcomes differ across CPUs, TRAJECTORY.md), or the architecture."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def _yes(value: bool) -> str:
    return "yes" if value else "no"


if __name__ == "__main__":
    sys.exit(main())
