"""Stability (issue #19): does TPO's weight term run away, can the monitor see it coming, does the guard stop it?

    python -m benchmarks.hallucination_world_v2.run stability [--out DIR] [--jobs 2] [--results PATH]

Runs in the v2 run folder (``run.py``'s worlds, SFT models, DPO and TPO runs are reused, and run first when
missing): TPO with the defaults again, now with the monitor's metrics and ``tpo_log_tokens`` (``tpo_watch``), and
TPO with the guard ``tpo_weight_clip`` (``tpo_clip``), at every v2 learning rate of both world kinds and every
world seed (``stability.json``). Writes ``STABILITY.md`` (rules: STABILITY_PROTOCOL.md, fixed before these runs).
"""

from __future__ import annotations

import itertools
import json
import math
import types
from pathlib import Path

import matplotlib


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .. import analysis, report, run  # noqa: E402
from . import load  # noqa: E402
from .common import first_step_below, mean_drift, with_history  # noqa: E402, F401


CHECK = load("stability")
PROTOCOL = CHECK.protocol  # v2's full protocol: its runs are this check's baseline
WEIGHT_CLIP = CHECK.constants["weight_clip"]  # the guard's bound on each token's log c^theta - log c^ref
METHODS = {method: settings["tpo_keys"] for method, settings in CHECK.groups[0]["methods"].items()}
COLLAPSE_FRACTION = CHECK.constants["collapse_fraction"]  # collapsed: recall below this × the world's SFT recall
CALIBRATION_SEED = CHECK.constants["calibration_seed"]  # the monitor's thresholds are chosen on it, checked on others
SHARE_GRID = tuple(CHECK.constants["share_grid"])
DRIFT_GRID = tuple(CHECK.constants["drift_grid"])
MONITOR_KEYS = ("tpo/score_drift_chosen", "tpo/score_drift_rejected", "tpo/weight_term_share")


def run_one(job: run.Job) -> dict:
    return with_history(run.run_job(job, PROTOCOL))


def report_check(base_runs: list[dict], runs: list[dict], path: Path, seconds: float, jobs: int) -> None:
    write_report(base_runs, runs, path, seconds, jobs)


def warning_step(history: list[dict], share_threshold: float, drift_threshold: float) -> int | None:
    """The first logged step at which the monitor's rule (share above and mean drift above) holds, or None."""
    for entry in history:
        if all(key in entry for key in MONITOR_KEYS):
            if entry["tpo/weight_term_share"] > share_threshold and mean_drift(entry) > drift_threshold:
                return entry["step"]
    return None


def collapsed(record: dict, sft_recall: float) -> bool:
    return record["recall"] < COLLAPSE_FRACTION * sft_recall


def calibrate(watched: list[dict], is_collapsed) -> tuple[tuple[float, float], dict]:
    """The (share, drift) thresholds of the grid with the fewest errors (missed collapses plus false alarms) on
    ``watched``; ties go to the earliest mean warning step over the collapsed runs, then to larger thresholds."""

    def score(thresholds):
        steps = [warning_step(record["history"], *thresholds) for record in watched]
        misses = sum(step is None for step, record in zip(steps, watched, strict=True) if is_collapsed(record))
        alarms = sum(step is not None for step, record in zip(steps, watched, strict=True) if not is_collapsed(record))
        hit_steps = [step for step, record in zip(steps, watched, strict=True) if is_collapsed(record) and step]
        mean_step = sum(hit_steps) / len(hit_steps) if hit_steps else math.inf
        return (misses + alarms, mean_step, -thresholds[0], -thresholds[1]), {"misses": misses, "alarms": alarms}

    grid = list(itertools.product(SHARE_GRID, DRIFT_GRID))
    best = min(grid, key=lambda thresholds: score(thresholds)[0])
    return best, score(best)[1]


def write_report(v2_runs: list[dict], runs: list[dict], path: Path, seconds: float, jobs: int) -> None:
    sft_recall = {
        (record["world_kind"], record["world_seed"]): record["recall"]
        for record in v2_runs
        if record["variant"] == "sft"
    }

    def is_collapsed(record: dict) -> bool:
        return collapsed(record, sft_recall[record["world_kind"], record["world_seed"]])

    everything = v2_runs + runs
    watched = [record for record in runs if record["variant"] == "tpo_watch"]
    calibration = [record for record in watched if record["world_seed"] == CALIBRATION_SEED]
    held_out = [record for record in watched if record["world_seed"] != CALIBRATION_SEED]
    thresholds, errors = calibrate(calibration, is_collapsed)
    sections = [
        "# Stability of TPO's weight term — results (issue #19)",
        f"Written by `python -m benchmarks.hallucination_world_v2.run stability` ({len(runs)} runs, {jobs} at a time, "
        f"{seconds / 60:.0f} min including any v2 runs it had to finish). Rules: STABILITY_PROTOCOL.md, fixed before "
        f"these runs. Collapsed: object recall below {COLLAPSE_FRACTION:g} × the world's SFT recall.",
        "## Reproducibility: `tpo_watch` is v2's `tpo` rerun with the monitor\n\n" + reproducibility(v2_runs, watched),
        "## Which runs collapsed\n\n" + collapse_table(everything, is_collapsed),
        "## What runs away\n\n" + runaway_section(watched, is_collapsed, path),
        "## The monitor's thresholds\n\n" + monitor_section(thresholds, errors, calibration, held_out, is_collapsed),
        f"## The guard: `tpo_weight_clip: {WEIGHT_CLIP:g}`\n\n" + guard_section(everything, is_collapsed),
        "## Added after the results: does DPO's chosen log-probability fall too?\n\nNot in the protocol. The "
        "step at which the chosen answers' mean log-probability fell below twice its first logged value (—: never), "
        "per world seed, from each run's training log.\n\n" + dpo_comparison(everything),
        "## Protocol\n\n```json\n"
        + json.dumps(
            {
                "methods": METHODS,
                "learning_rates": PROTOCOL.learning_rates,
                "world_seeds": PROTOCOL.world_seeds,
                "collapse_fraction": COLLAPSE_FRACTION,
                "calibration_seed": CALIBRATION_SEED,
                "share_grid": SHARE_GRID,
                "drift_grid": DRIFT_GRID,
            },
            indent=1,
        )
        + "\n```",
    ]
    path.write_text("\n\n".join(sections) + "\n")


def _by_key(runs: list[dict], variant: str) -> dict[tuple, dict]:
    return {
        (record["world_kind"], record["world_seed"], record["learning_rate"]): record
        for record in runs
        if record["variant"] == variant
    }


def reproducibility(v2_runs: list[dict], watched: list[dict]) -> str:
    tpo = _by_key(v2_runs, "tpo")
    differences = [
        max(abs(record[key] - tpo[key_][key]) for key in ("recall", "prior_hallucination", "chair_i"))
        for key_, record in _by_key(watched, "tpo_watch").items()
        if key_ in tpo
    ]
    largest = max(differences) if differences else math.nan
    return (
        f"Largest difference of recall, prior hallucination or CHAIR_i between `tpo_watch` and v2's `tpo`, over "
        f"{len(differences)} runs: {largest:.4f} (the monitor and `tpo_log_tokens` only read; 0 means the same "
        f"training)."
    )


def collapse_table(runs: list[dict], is_collapsed) -> str:
    lines = ["| world | learning rate | " + " | ".join(VARIANTS) + " |", "|---|---|" + "---|" * len(VARIANTS)]
    for kind in PROTOCOL.world_kinds:
        for lr in PROTOCOL.learning_rates[kind]:
            cells = []
            for variant in VARIANTS:
                here = [
                    record
                    for record in runs
                    if (record["world_kind"], record["learning_rate"], record["variant"]) == (kind, lr, variant)
                ]
                recalls = ", ".join(f"{record['recall']:.2f}" for record in sorted(here, key=_seed))
                cells.append(f"{sum(map(is_collapsed, here))}/{len(here)} (recall {recalls})")
            lines.append(f"| {kind} | {lr:g} | " + " | ".join(cells) + " |")
    intro = "Collapsed runs of each method, of the world seeds run; object recall per world seed."
    return intro + "\n\n" + "\n".join(lines)


VARIANTS = ("dpo", "tpo", "tpo_detach", "tpo_mult", "tpo_clip")


def _seed(record: dict) -> int:
    return record["world_seed"]


def runaway_section(watched: list[dict], is_collapsed, path: Path) -> str:
    """Trajectories of the monitor's metrics and the chosen log-probability; per-token scores first vs last."""
    parts = []
    for kind in PROTOCOL.world_kinds:
        name = f"stability_{kind}.png"
        plot_trajectories([record for record in watched if record["world_kind"] == kind], path.parent / name)
        parts.append(f"### {kind} world\n\n![monitor metrics per step, {kind} world]({name})")
    lines = [
        "| world | seed | learning rate | collapsed | share, last | drift, last (chosen / rejected) | logps/chosen "
        "first → last | step NLL doubled | chosen s by token class, first → last logged |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for record in sorted(watched, key=lambda r: (r["world_kind"], r["world_seed"], r["learning_rate"])):
        history = record["history"]
        first, last = history[0], history[-1]
        lines.append(
            f"| {record['world_kind']} | {record['world_seed']} | {record['learning_rate']:g} | "
            f"{'yes' if is_collapsed(record) else 'no'} | {last['tpo/weight_term_share']:.2f} | "
            f"{last['tpo/score_drift_chosen']:+.2f} / {last['tpo/score_drift_rejected']:+.2f} | "
            f"{first['logps/chosen']:.1f} → {last['logps/chosen']:.1f} | {first_step_below(history, 2.0) or '—'} | "
            f"{token_classes(Path(record['run_dir']))} |"
        )
    return "\n\n".join(parts) + "\n\n" + "\n".join(lines)


def token_classes(run_dir: Path) -> str:
    """Mean visual score of the logged pairs' chosen tokens per class (v2's classes), first vs last logged step."""
    records = [json.loads(line) for line in (run_dir / "tpo_tokens.jsonl").read_text().splitlines()]
    steps = sorted({record["step"] for record in records})
    means = []
    for step in (steps[0], steps[-1]):
        by_class: dict[str, list[float]] = {}
        for record in records:
            if record["step"] == step and record["side"] == "chosen":
                for token, score in zip(record["tokens"], record["visual_score"], strict=True):
                    by_class.setdefault(report.token_class(token), []).append(score)
        means.append({name: sum(values) / len(values) for name, values in by_class.items()})
    return "; ".join(f"{name} {means[0][name]:+.1f} → {means[1][name]:+.1f}" for name in sorted(means[0]))


def plot_trajectories(watched: list[dict], path: Path) -> None:
    keys = ("tpo/weight_term_share", "tpo/score_drift_chosen", "tpo/score_drift_rejected", "logps/chosen")
    fig, axes = plt.subplots(1, len(keys), figsize=(18, 4))
    colors = plt.cm.viridis([i / max(1, len(PROTOCOL.learning_rates[watched[0]["world_kind"]]) - 1) for i in range(5)])
    for record in watched:
        color = colors[PROTOCOL.learning_rates[record["world_kind"]].index(record["learning_rate"])]
        steps = [entry["step"] for entry in record["history"]]
        for axis, key in zip(axes, keys, strict=True):
            label = f"lr {record['learning_rate']:g}" if record["world_seed"] == 0 else None
            axis.plot(steps, [entry[key] for entry in record["history"]], color=color, label=label, alpha=0.8)
            axis.set_title(key)
            axis.set_xlabel("step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def monitor_section(thresholds, errors, calibration, held_out, is_collapsed) -> str:
    share, drift = thresholds
    lines = [
        f"Chosen on world seed {CALIBRATION_SEED} ({len(calibration)} `tpo_watch` runs, "
        f"{sum(map(is_collapsed, calibration))} collapsed): warn when `tpo/weight_term_share` > {share:g} and the "
        f"mean of `tpo/score_drift_chosen` and `_rejected` > {drift:g}; on that seed {errors['misses']} missed "
        f"collapses and {errors['alarms']} false alarms.",
        "",
        "Checked on the other world seeds (not used to choose):",
        "",
        "| world | seed | learning rate | collapsed | warning at step | step NLL doubled |",
        "|---|---|---|---|---|---|",
    ]
    misses = alarms = 0
    for record in sorted(held_out, key=lambda r: (r["world_kind"], r["world_seed"], r["learning_rate"])):
        step = warning_step(record["history"], share, drift)
        misses += is_collapsed(record) and step is None
        alarms += (not is_collapsed(record)) and step is not None
        lines.append(
            f"| {record['world_kind']} | {record['world_seed']} | {record['learning_rate']:g} | "
            f"{'yes' if is_collapsed(record) else 'no'} | {step or '—'} | "
            f"{first_step_below(record['history'], 2.0) or '—'} |"
        )
    lines += ["", f"Held out: {misses} missed collapses, {alarms} false alarms, of {len(held_out)} runs."]
    return "\n".join(lines)


def guard_section(runs: list[dict], is_collapsed) -> str:
    """Collapses with and without the guard, and hallucination at matched recall against DPO (v2's rule)."""
    methods = ("dpo", "tpo", "tpo_clip")
    protocol = types.SimpleNamespace(
        methods=methods,
        world_seeds=PROTOCOL.world_seeds,
        world_kinds=PROTOCOL.world_kinds,
        recall_levels=PROTOCOL.recall_levels,
    )
    lines = [
        "| world | variant | collapsed runs | D at matched recall per world seed | mean ± sd |",
        "|---|---|---|---|---|",
    ]
    for kind in PROTOCOL.world_kinds:
        differences = report.summary_differences(runs, protocol, kind, "recall")
        for method in ("tpo", "tpo_clip"):
            here = [record for record in runs if record["world_kind"] == kind and record["variant"] == method]
            values = differences.get(method, [])
            cells = ", ".join("n/a" if math.isnan(value) else f"{value:+.3f}" for value in values)
            lines.append(
                f"| {kind} | {method} | {sum(map(is_collapsed, here))}/{len(here)} | {cells} | "
                f"{report._fmt(*analysis.mean_spread(values))} |"
            )
    return (
        "D: prior hallucination minus DPO's at matched object recall, mean over the recall levels common to dpo, tpo "
        "and tpo_clip in each world (v2's rule; negative is better than DPO).\n\n"
        + "\n".join(lines)
        + "\n\n"
        + guard_verdict(runs, is_collapsed, protocol)
    )


def guard_verdict(runs: list[dict], is_collapsed, protocol) -> str:
    """STABILITY_PROTOCOL.md's two questions about the guard, per world kind."""
    lines = []
    for kind in PROTOCOL.world_kinds:
        tpo = {key: record for key, record in _by_key(runs, "tpo").items() if key[0] == kind}
        clip = _by_key(runs, "tpo_clip")
        still = [key for key, record in tpo.items() if is_collapsed(record) and is_collapsed(clip[key])]
        removed = not still
        differences = report.summary_differences(runs, protocol, kind, "recall")
        tpo_mean, tpo_sd, _ = analysis.mean_spread(differences.get("tpo", []))
        clip_mean, _, _ = analysis.mean_spread(differences.get("tpo_clip", []))
        kept = clip_mean <= tpo_mean + tpo_sd
        lines.append(
            f"- {kind} world: removes the collapse (no tpo_clip run collapsed where tpo did): "
            f"**{'yes' if removed else 'no'}**"
            + ("" if removed else f" (still collapsed: {', '.join(f'seed {k[1]}, lr {k[2]:g}' for k in still)})")
            + f"; keeps TPO's gain (mean D {clip_mean:+.3f} ≤ tpo's {tpo_mean:+.3f} + sd {tpo_sd:.3f}): "
            f"**{'yes' if kept else 'no'}**."
        )
    return "\n".join(lines)


def dpo_comparison(runs: list[dict]) -> str:
    """Added after the results (not in the protocol): the NLL-doubled step of DPO's and detached TPO's runs, from
    their v2 training logs, next to TPO's, to tell a fall of the chosen log-probability that TPO's weight term
    causes from one every preference objective shows at these learning rates."""
    variants = ("dpo", "tpo_detach", "tpo_watch", "tpo_clip")
    lines = [
        "| world | learning rate | " + " | ".join(f"{v}: NLL doubled at step, per seed" for v in variants) + " |",
        "|---|---|" + "---|" * len(variants),
    ]
    for kind in PROTOCOL.world_kinds:
        for lr in PROTOCOL.learning_rates[kind]:
            cells = []
            for variant in variants:
                here = sorted(
                    (r for r in runs if (r["world_kind"], r["learning_rate"], r["variant"]) == (kind, lr, variant)),
                    key=_seed,
                )
                steps = [first_step_below(with_history(r)["history"], 2.0) for r in here]
                cells.append(", ".join(str(step or "—") for step in steps))
            lines.append(f"| {kind} | {lr:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
