"""Stability, second check (issue #19): the monitor's rule and the clip guard on worlds that did not set them.

    python -m benchmarks.hallucination_world_v2.stability_heldout [--out DIR] [--jobs 2] [--results PATH]

Rules: STABILITY_PROTOCOL_2.md, fixed before these runs. New world seeds 3 and 4 of both kinds, v2's SFT and
preference recipes, DPO, TPO and TPO with ``tpo_weight_clip: 0.1`` at the two largest v2 learning rates; every
TPO run saves its model every 5 steps, so the model held when the shipped monitor warned is evaluated too.
Resumable like v2 (a run whose ``metrics.json`` exists is reused). Writes ``STABILITY_2.md``.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


if __package__ in (None, ""):  # run as a script: make the repository importable as the package's root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.hallucination_world_v2 import evaluate, run, stability  # noqa: E402
from benchmarks.hallucination_world_v2.protocol import FULL, TPO_DEFAULTS  # noqa: E402
from benchmarks.hallucination_world_v2.world import PIXEL, WORD  # noqa: E402


HERE = Path(__file__).resolve().parent
PROTOCOL = dataclasses.replace(
    FULL,
    world_seeds=(3, 4),
    methods=("dpo",),
    learning_rates={PIXEL: (5e-5, 1e-4), WORD: (3e-5, 1e-4)},
    view_learning_rates={PIXEL: 1e-4, WORD: 1e-4},
)
TPO_METHODS = {"tpo": TPO_DEFAULTS, "tpo_clip": {**TPO_DEFAULTS, "tpo_weight_clip": stability.WEIGHT_CLIP}}
SAVING = {"save_strategy": "steps", "save_steps": 5, "save_only_model": True}
SAVING_CHECK = (PIXEL, 3, 1e-4)  # the tpo run also trained without saving, to show saving changes nothing
DEGRADED_FRACTION = 0.9  # degraded: object recall below this fraction of the world's SFT recall
WARNING = re.compile(r"Stage tpo, step (\d+): the chosen answers' mean log-probability fell")


def main(argv: list[str] | None = None) -> int:
    args = run.check_arguments(__doc__, HERE / "runs_heldout", HERE / "STABILITY_2.md", argv)
    start = time.perf_counter()
    out = args.out.resolve()
    base_runs = run.run_protocol(PROTOCOL, out, args.jobs)  # worlds, SFT and DPO
    jobs = [job for seed in PROTOCOL.world_seeds for kind in PROTOCOL.world_kinds for job in tpo_jobs(out, kind, seed)]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        tpo_runs = list(pool.map(watched_run, jobs))
    write_report(base_runs, tpo_runs, args.results, time.perf_counter() - start, args.jobs)
    print(f"[stability-heldout] {len(base_runs) + len(tpo_runs)} runs; report: {args.results}")
    return 0


def tpo_jobs(out: Path, kind: str, seed: int) -> list[run.Job]:
    """Both TPO methods at the protocol's learning rates, saving every 5 steps; plus the saving check's run."""
    directory = run.world_dir(out, kind, seed)
    jobs = []
    for lr in PROTOCOL.learning_rates[kind]:
        variants = [(method, keys, SAVING) for method, keys in TPO_METHODS.items()]
        if (kind, seed, lr) == SAVING_CHECK:
            variants.append(("tpo_nosave", TPO_DEFAULTS, {}))
        for method, keys, saving in variants:
            job = run.preference_job(PROTOCOL, directory, kind, seed, method, {"stage": "tpo", "tpo_keys": keys}, lr)
            job.recipe.update(saving)
            jobs.append(job)
    return jobs


def warning_step(train_log: Path) -> int | None:
    """The step the shipped monitor named in its warning, read from the run's log; None if it did not warn."""
    found = WARNING.search(train_log.read_text())
    return int(found.group(1)) if found else None


def watched_run(job: run.Job) -> dict:
    """Train and evaluate (``run.run_job``), then evaluate the checkpoint of the warning step, keep only it."""
    record = stability.with_history(run.run_job(job, PROTOCOL))
    extra = job.run_dir / "warning.json"
    if not extra.exists():
        step, recall = warning_step(job.run_dir / "train.log"), None
        if job.recipe.get("save_strategy") == "steps":  # the saving check's run keeps none
            recall = checkpoint_recalls(job, [step])[step]
        extra.write_text(json.dumps({"warning_step": step, "recall_at_warning": recall}))
    return {**record, **json.loads(extra.read_text())}


def checkpoint_recalls(job: run.Job, steps: list[int | None]) -> dict:
    """Object recall of the run's checkpoint at each step (None for a step that is None); deletes the others."""
    recalls = {}
    for step in set(steps) - {None}:
        metrics = evaluate.evaluate_model(job.run_dir / f"checkpoint-{step}", job.world_dir, PROTOCOL.eval_batch_size)
        recalls[step] = metrics["metrics"]["recall"]
    for checkpoint in job.run_dir.glob("checkpoint-*"):
        if checkpoint.name not in {f"checkpoint-{step}" for step in recalls}:
            shutil.rmtree(checkpoint)
    return {step: recalls.get(step) for step in steps}


def write_report(base_runs: list[dict], tpo_runs: list[dict], path: Path, seconds: float, jobs: int) -> None:
    sft_recall = {(r["world_kind"], r["world_seed"]): r["recall"] for r in base_runs if r["variant"] == "sft"}

    def below(record: dict, fraction: float) -> bool:
        return record["recall"] < fraction * sft_recall[record["world_kind"], record["world_seed"]]

    def collapsed(record: dict) -> bool:
        return below(record, stability.COLLAPSE_FRACTION)

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
            f"{_yes(collapsed(r))} | {_yes(degraded(r))} | {r['warning_step'] or '—'} | {at_warning} | "
            f"{stability.first_step_below(r['history'], 2.0) or '—'} | "
            f"{stability.mean_drift(r['history'][-1]):+.2f} | "
            f"{dpo[key]['recall']:.2f}, {_yes(collapsed(dpo[key]))} |"
        )
    sections = [
        "# Stability, second check: the monitor and the guard on worlds that did not set them — results (issue #19)",
        f"Written by `python -m benchmarks.hallucination_world_v2.stability_heldout` "
        f"({len(base_runs) + len(tpo_runs)} runs including the worlds' SFT, {jobs} at a time; this invocation took "
        f"{seconds / 60:.0f} min, reusing runs an earlier one had finished). "
        f"Rules: STABILITY_PROTOCOL_2.md, fixed before these runs. Collapsed: object recall below "
        f"{stability.COLLAPSE_FRACTION:g} × the world's SFT recall; degraded: below {DEGRADED_FRACTION:g} ×.",
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
        and r["recall_at_warning"] >= stability.COLLAPSE_FRACTION * sft_recall[r["world_kind"], r["world_seed"]]
    ]
    monitor = "not tested (no TPO run collapsed)" if not fallen else _yes(len(in_time) == len(fallen))
    alarms = [r for r in watched if r["warning_step"] is not None and not degraded(r)]
    unwarned = [r for r in watched if r["warning_step"] is None and degraded(r)]
    by_key = {(r["world_kind"], r["world_seed"], r["learning_rate"], r["variant"]): r for r in watched}
    tpo_fallen = [key[:3] for key, r in by_key.items() if key[3] == "tpo" and collapsed(r)]
    still = [key for key in tpo_fallen if collapsed(by_key[(*key, "tpo_clip")])]
    guard = "not tested (no tpo run collapsed)" if not tpo_fallen else _yes(not still)
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


def _yes(value: bool) -> str:
    return "yes" if value else "no"


if __name__ == "__main__":
    sys.exit(main())
