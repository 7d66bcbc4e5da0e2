"""Stability, fourth check (issue #19): does the likelihood anchor ``pref_ftx`` keep TPO's gain along the trade-off.

    python -m benchmarks.hallucination_world_v2.run gain [--out DIR] [--jobs 2] [--results PATH]

Rules: STABILITY_PROTOCOL_4.md, fixed before these runs; settings: ``gain.json``. World seeds 6 and 7 of both
kinds, v2's SFT and preference recipes at three learning rates per kind: DPO and TPO, each with and without
``pref_ftx: 1.0`` (the third check's methods); TPO's and DPO's prior hallucination compared at matched object
recall, anchored and not; the third check's collapse verdicts at lr 1e-4. Resumable like v2. Writes
``STABILITY_4.md`` and one plot per world kind.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .. import analysis, run  # noqa: E402
from . import load  # noqa: E402
from .common import cpu_model, fraction, names, run_minutes, sft_recall, signed, watched_run, yes  # noqa: E402


CHECK = load("gain")
PROTOCOL = CHECK.protocol
LARGEST_RATE = CHECK.constants["largest_rate"]  # where the collapse verdicts are read
ANCHOR_PREF_FTX = CHECK.constants["anchor_pref_ftx"]
COLLAPSE_FRACTION = CHECK.constants["collapse_fraction"]  # collapsed: recall below this × the world's SFT recall
DEGRADED_FRACTION = CHECK.constants["degraded_fraction"]  # degraded: recall below this × the world's SFT recall
METHODS = ("dpo", *CHECK.groups[0]["methods"])
GAINS = tuple(tuple(pair) for pair in CHECK.constants["gains"])
"""The paired comparisons D(a − b): TPO's gain, the anchored gain, and what the anchor does to TPO."""
STYLES = {
    "dpo": ("tab:blue", "-"),
    "dpo_anchor": ("tab:blue", "--"),
    "tpo": ("tab:orange", "-"),
    "tpo_anchor": ("tab:orange", "--"),
}


def run_one(job: run.Job) -> dict:
    """As the third check: a TPO run with its warning step and that checkpoint's recall; a DPO run as v2's."""
    return watched_run(job, PROTOCOL) if job.recipe["stage"] == "tpo" else run.run_job(job, PROTOCOL)


def report_check(base_runs: list[dict], runs: list[dict], path: Path, seconds: float, jobs: int) -> None:
    records = base_runs + runs
    for kind in PROTOCOL.world_kinds:
        plot_frontiers(records, kind, path.parent / f"stability_gain_{kind}.png")
    write_report(records, path, jobs)


def matched_difference(
    records: list[dict], kind: str, seed: int, a: str, b: str, y_key: str
) -> tuple[float, tuple[float, float] | None]:
    """D(a − b) in one world: ``y_key`` of method a minus method b's at v2's recall levels in the recall range
    common to their frontiers (each the SFT point plus the method's runs), averaged; and that range."""
    lines = analysis.world_frontiers(records, kind, seed, (a, b), "recall", y_key)
    span = analysis.common_range(list(lines.values()))
    levels = analysis.levels_in_range(PROTOCOL.recall_levels, span)
    values = analysis.matched(lines, levels)
    return analysis.mean_over_levels({level: values[a][level] - values[b][level] for level in levels}), span


def write_report(records: list[dict], path: Path, jobs: int) -> None:
    worlds = [(kind, seed) for seed in PROTOCOL.world_seeds for kind in PROTOCOL.world_kinds]
    by_key = {(r["world_kind"], r["world_seed"], r["variant"], r["learning_rate"]): r for r in records}
    sft = {(kind, seed): by_key[kind, seed, "sft", 0.0]["recall"] for kind, seed in worlds}

    def below(r: dict, fraction: float) -> bool:
        return r["recall"] < fraction * sft[r["world_kind"], r["world_seed"]]

    runs = [
        "| world | lr | method | recall (SFT) | prior hallucination | CHAIR_i | collapsed | degraded | "
        "warning at step | recall at warning |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, seed in worlds:
        for lr in PROTOCOL.learning_rates[kind]:
            for method in METHODS:
                r = by_key[kind, seed, method, lr]
                step, held = r.get("warning_step"), r.get("recall_at_warning")
                runs.append(
                    f"| {kind}-{seed} | {lr:g} | {method} | {r['recall']:.2f} ({sft[kind, seed]:.2f}) | "
                    f"{r['prior_hallucination']:.3f} | {r['chair_i']:.3f} | "
                    f"{yes(below(r, COLLAPSE_FRACTION))} | "
                    f"{yes(below(r, DEGRADED_FRACTION))} | {step or '—'} | "
                    f"{'—' if held is None else f'{held:.2f}'} |"
                )
    gains = {
        (kind, seed, a, b, y_key): matched_difference(records, kind, seed, a, b, y_key)
        for kind, seed in worlds
        for a, b in GAINS
        for y_key in ("prior_hallucination", "chair_i")
    }
    sections = [
        "# Stability, fourth check: does the likelihood anchor keep TPO's gain along the trade-off — results (#19)",
        f"Written by `python -m benchmarks.hallucination_world_v2.run gain` ({len(records)} runs including "
        f"the worlds' SFT, {jobs} at a time, on {cpu_model()}; "
        f"{run_minutes(records):.0f} min of training and evaluation summed over the runs). Rules: "
        f"STABILITY_PROTOCOL_4.md, fixed "
        f"before these runs. `_anchor`: `pref_ftx: {ANCHOR_PREF_FTX:g}`. Collapsed: object "
        f"recall below {COLLAPSE_FRACTION:g} × the world's SFT recall; degraded: below "
        f"{DEGRADED_FRACTION:g} ×.",
        "## Runs\n\n" + "\n".join(runs),
        "## At matched object recall\n\n" + gains_table(gains, worlds),
        "![frontiers, pixel world](stability_gain_pixel.png)\n\n![frontiers, word world](stability_gain_word.png)",
        "## Verdicts\n\n" + verdicts(by_key, gains, worlds, below),
    ]
    path.write_text("\n\n".join(sections) + "\n")


def gains_table(gains: dict, worlds: list[tuple[str, int]]) -> str:
    columns = [f"D({a} − {b})" for a, b in GAINS]
    lines = [
        "D(a − b): a's value minus b's at the recall levels 0.01, 0.02, … common to both frontiers (SFT point plus "
        "the three runs), averaged; negative: a hallucinates less at the same recall. Common recall range of each "
        "pair in brackets.",
        "",
        "| world | measure | " + " | ".join(columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for kind, seed in worlds:
        for y_key, name in (("prior_hallucination", "prior hallucination"), ("chair_i", "CHAIR_i")):
            cells = []
            for a, b in GAINS:
                value, span = gains[kind, seed, a, b, y_key]
                where = "no common range" if span is None else f"{span[0]:.2f}–{span[1]:.2f}"
                cells.append(f"{signed(value)} ({where})")
            lines.append(f"| {kind}-{seed} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdicts(by_key: dict, gains: dict, worlds: list[tuple[str, int]], below) -> str:
    """STABILITY_PROTOCOL_4.md's verdicts 3–6."""

    def prior_gain(kind: str, seed: int, a: str, b: str) -> float:
        return gains[kind, seed, a, b, "prior_hallucination"][0]

    gained = [(kind, seed) for kind, seed in worlds if prior_gain(kind, seed, "tpo", "dpo") < 0]
    per_kind = ", ".join(
        f"{kind} {sum(k == kind for k, _ in gained)} of {len(PROTOCOL.world_seeds)}" for kind in PROTOCOL.world_kinds
    )
    kept = [(kind, seed) for kind, seed in gained if prior_gain(kind, seed, "tpo_anchor", "dpo_anchor") < 0]
    if gained:
        plain = sum(prior_gain(kind, seed, "tpo", "dpo") for kind, seed in gained) / len(gained)
        anchored = sum(prior_gain(kind, seed, "tpo_anchor", "dpo_anchor") for kind, seed in gained) / len(gained)
        keeps = (
            f"{yes(len(kept) == len(gained))} — the anchored gain is negative in {len(kept)} of the {len(gained)} "
            f"worlds where TPO gained ({names(kept) or 'none'}); over them, mean D(tpo_anchor − dpo_anchor) "
            f"{signed(anchored)} against mean D(tpo − dpo) {signed(plain)} ({fraction(anchored, plain)})"
        )
    else:
        keeps = "not tested (TPO gained in no world)"

    def at_largest(kind: str, seed: int, method: str) -> dict:
        return by_key[kind, seed, method, LARGEST_RATE]

    collapsed = [
        (kind, seed, method)
        for kind, seed in worlds
        for method in ("tpo", "tpo_anchor")
        if below(at_largest(kind, seed, method), COLLAPSE_FRACTION)
    ]
    in_time = [
        key
        for key in collapsed
        if (held := at_largest(*key).get("recall_at_warning")) is not None
        and held >= COLLAPSE_FRACTION * sft_recall(by_key, *key[:2])
    ]
    monitor = "not tested (no TPO run collapsed)" if not collapsed else yes(len(in_time) == len(collapsed))
    tpo_fell = [(kind, seed) for kind, seed, method in collapsed if method == "tpo"]
    still = [world for world in tpo_fell if (*world, "tpo_anchor") in collapsed]
    guard = "not tested (`tpo` collapsed in no world)" if not tpo_fell else yes(not still)
    own = [world for world in tpo_fell if not below(at_largest(*world, "dpo"), COLLAPSE_FRACTION)]
    watched = [r for key, r in by_key.items() if key[2] in ("tpo", "tpo_anchor")]
    alarms = [r for r in watched if r["warning_step"] is not None and not below(r, DEGRADED_FRACTION)]
    return "\n".join(
        [
            f"- **TPO has a gain** (D(tpo − dpo) < 0 on prior hallucination): {len(gained)} of {len(worlds)} worlds "
            f"({per_kind}).",
            f"- **The anchor keeps TPO's gain**: {keeps}.",
            f"- **Monitor warns before collapse** (lr {LARGEST_RATE:g}): {monitor} — {len(in_time)} of "
            f"{len(collapsed)} collapsed TPO runs ({names(collapsed) or 'none'}) warned while the model then held "
            f"had not collapsed.",
            f"- **Guard prevents collapse** (lr {LARGEST_RATE:g}): {guard} — `tpo` collapsed in "
            f"{names(tpo_fell) or 'no world'}; `tpo_anchor` did too in {len(still)} of them.",
            f"- **TPO's own collapses** (`tpo` collapsed, `dpo` did not, lr {LARGEST_RATE:g}): {len(own)} "
            f"({names(own) or 'none'}).",
            f"- **False alarms** (warned, not degraded; every learning rate): {len(alarms)} of {len(watched)} "
            f"TPO runs.",
        ]
    )


def plot_frontiers(records: list[dict], kind: str, path: Path) -> None:
    """Prior hallucination (top) and CHAIR_i (bottom) against object recall, one column per world seed."""
    seeds = PROTOCOL.world_seeds
    fig, axes = plt.subplots(2, len(seeds), figsize=(6 * len(seeds), 8), squeeze=False)
    for row, (y_key, label) in enumerate((("prior_hallucination", "prior hallucination"), ("chair_i", "CHAIR_i"))):
        for column, seed in enumerate(seeds):
            axis = axes[row][column]
            for method, line in analysis.world_frontiers(records, kind, seed, METHODS, "recall", y_key).items():
                colour, dash = STYLES[method]
                xs, ys = [x for x, _ in line], [y for _, y in line]
                axis.plot(xs, ys, color=colour, linestyle=dash, marker="o", label=method)
            axis.set_title(f"{kind}-{seed}")
            axis.set_xlabel("object recall")
            axis.set_ylabel(label)
            axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{kind} world: SFT point and lrs {', '.join(f'{lr:g}' for lr in PROTOCOL.learning_rates[kind])}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
