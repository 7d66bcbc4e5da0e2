"""RESULTS_v2.md: the outcome, matched-recall and matched-KL comparisons, frontier plots, tables of every metric,
the per-token views and the timings, all computed from the run records by PROTOCOL_v2.md's rules.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.hallucination_world.report import METRICS as V1_METRICS  # noqa: E402
from benchmarks.hallucination_world.world import OBJECTS, PARTNER  # noqa: E402

from . import analysis  # noqa: E402
from .protocol import BASELINE, Protocol  # noqa: E402
from .world import CONTEXT_WORD, PIXEL  # noqa: E402


METRICS = (*V1_METRICS, ("kl_to_sft", "KL(policy ‖ SFT) ↓"))
PAIRED = ("prior_hallucination", "recall", "partner_recall", "chair_i", "pope_f1", "kl_to_sft")
LOWER_IS_BETTER = {"prior_hallucination", "chair_i", "kl_to_sft"}
COLOURS = {"sft": "grey", "dpo": "tab:blue", "tpo": "tab:orange", "tpo_detach": "tab:green", "tpo_mult": "tab:red"}
SEED_MARKERS = ("o", "s", "^", "D", "v")
TRIGGER_WORDS = {PIXEL: "dog", "word": f"question with '{CONTEXT_WORD}'"}
TOKENS_SHOWN = 2  # held-out pairs tabulated token by token per world kind; the class means cover all viewed pairs


def write_results(
    protocol: Protocol, runs: list[dict], views: dict, out: Path, path: Path, mode: str, seconds: float, jobs: int
) -> None:
    """Write RESULTS_v2.md and its frontier PNGs (next to it) from the run records and token views."""
    path.parent.mkdir(parents=True, exist_ok=True)
    plots = []
    for kind in protocol.world_kinds:
        name = f"frontier_{kind}.png"
        plot_frontiers(runs, protocol, kind, path.parent / name)
        plots.append(f"### {kind} world\n\n![frontiers, {kind} world]({name})")
    summed = sum(run["train_seconds"] + run["eval_seconds"] for run in runs) / 60
    command = "python -m benchmarks.hallucination_world_v2.run" + (" --quick" if mode == "quick" else "")
    sections = [
        "# Evidence v2: DPO and TPO variants along the trade-off, pixel-prior and word-prior worlds — results",
        f"Written by `{command}` ({mode} protocol, {len(runs)} runs; training and evaluation took {summed:.0f} min "
        f"summed over runs, {jobs} at a time; this invocation took {seconds / 60:.1f} min, reusing runs already "
        f"finished in the run folder). Rules and settings: PROTOCOL_v2.md and `{_shown(out / 'protocol.json', path)}`;"
        f" every run's recipe, log, captions and metrics are under `{_shown(out, path)}`."
        + (
            " **Quick mode: a plumbing check on tiny worlds; its numbers say nothing about the methods.**"
            if mode == "quick"
            else ""
        ),
        "## Outcome\n\n" + outcome(runs, protocol),
        "## Prior hallucination at matched object recall\n\n" + matched_section(runs, protocol, "recall"),
        "## Prior hallucination at matched KL(policy ‖ SFT)\n\n" + matched_section(runs, protocol, "kl_to_sft"),
        "## Frontiers\n\nOne line per method and world seed (marker per seed), from the SFT model (learning rate 0) "
        "through the learning rates in order of x; down-right is better on the left panel, down-left on the right.\n\n"
        + "\n\n".join(plots),
        "## Mean ± standard deviation over world seeds (n = runs per row)\n\n" + summary_tables(runs, protocol),
        f"## Paired differences at equal learning rate, variant − {BASELINE} (same world)\n\n"
        + equal_lr_tables(runs, protocol),
        "## Per-token view (`tpo-plugin inspect`)\n\n" + views_section(views, protocol, out, path),
        "## Training and timings\n\n" + training_table(runs, protocol),
        "## Protocol\n\n```json\n" + json.dumps(protocol.as_dict(), indent=1) + "\n```",
    ]
    path.write_text("\n\n".join(sections) + "\n")


def _shown(target: Path, results_path: Path) -> str:
    """A path as the report shows it: relative to the report when it lies below the report's folder."""
    try:
        return str(target.relative_to(results_path.parent))
    except ValueError:
        return str(target)


def _fmt(mean: float, spread: float, n: int | None = None) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:+.3f} ± {spread:.3f}" + ("" if n is None else f" (n={n})")


def _levels(protocol: Protocol, lines: dict, x_key: str) -> list[float]:
    """The world's comparison levels: the protocol's fixed recall (or KL) levels inside the common range."""
    levels = protocol.recall_levels if x_key == "recall" else protocol.kl_levels
    return analysis.levels_in_range(levels, analysis.common_range(list(lines.values())))


def world_comparison(runs: list[dict], protocol: Protocol, kind: str, seed: int, x_key: str) -> dict:
    """One world's frontiers, levels, interpolated hallucinations and paired differences (variant − DPO)."""
    lines = analysis.world_frontiers(runs, kind, seed, protocol.methods, x_key, "prior_hallucination")
    levels = _levels(protocol, lines, x_key)
    values = analysis.matched(lines, levels)
    diffs = analysis.paired_differences(values, BASELINE) if BASELINE in values else {}
    return {"levels": levels, "values": values, "diffs": diffs, "span": analysis.common_range(list(lines.values()))}


def summary_differences(runs: list[dict], protocol: Protocol, kind: str, x_key: str) -> dict[str, list[float]]:
    """Per TPO variant, per world seed: its mean difference to DPO over the world's levels (the primary measure)."""
    result: dict[str, list[float]] = {}
    for seed in protocol.world_seeds:
        comparison = world_comparison(runs, protocol, kind, seed, x_key)
        for method, by_level in comparison["diffs"].items():
            result.setdefault(method, []).append(analysis.mean_over_levels(by_level))
    return result


def outcome(runs: list[dict], protocol: Protocol) -> str:
    """The hypothesis, answered by the rule fixed in PROTOCOL_v2.md, whatever the numbers say."""
    lines = []
    for kind in protocol.world_kinds:
        sft = [run for run in runs if run["world_kind"] == kind and run["variant"] == "sft"]
        h, h_sd, _ = analysis.mean_spread([run["prior_hallucination"] for run in sft])
        r, r_sd, _ = analysis.mean_spread([run["recall"] for run in sft])
        lines.append(
            f"- {kind} world, after SFT: prior hallucination {h:.3f} ± {h_sd:.3f}, object recall {r:.3f} ± {r_sd:.3f}."
        )
    deltas = {kind: summary_differences(runs, protocol, kind, "recall") for kind in protocol.world_kinds}
    for method in [m for m in protocol.methods if m != BASELINE]:
        for kind in protocol.world_kinds:
            values = deltas[kind].get(method, [])
            mean, spread, n = analysis.mean_spread(values)
            lower = sum(value < 0 for value in values if not math.isnan(value))
            helps = n == len(protocol.world_seeds) and mean < 0 and lower == n
            lines.append(
                f"- {method}, {kind} world: D = hallucination − DPO's at matched recall, mean over levels, "
                f"{_fmt(mean, spread, n)} over world seeds; lower than DPO in {lower} of {n} seeds "
                f"→ helps (mean < 0 and every seed < 0): **{'yes' if helps else 'no'}**."
            )
    if {PIXEL, "word"} <= set(protocol.world_kinds):
        for method in [m for m in protocol.methods if m != BASELINE]:
            word, _, n_word = analysis.mean_spread(deltas["word"].get(method, []))
            pixel, _, n_pixel = analysis.mean_spread(deltas[PIXEL].get(method, []))
            more = bool(n_word and n_pixel) and word < pixel
            lines.append(
                f"- Hypothesis, {method}: helps more in the word world than in the pixel world (mean D_word < mean "
                f"D_pixel): D_word {word:+.3f}, D_pixel {pixel:+.3f} → **{'yes' if more else 'no'}**."
            )
    lines.append("- Three world seeds: read the spreads and per-seed values below before calling a difference real.")
    return "\n".join(lines)


def matched_section(runs: list[dict], protocol: Protocol, x_key: str) -> str:
    """Per world kind: the per-seed summary D, then the per-level table (mean ± sd over seeds, paired differences)."""
    what = "object recall" if x_key == "recall" else "KL(policy ‖ SFT)"
    grid = protocol.recall_levels if x_key == "recall" else protocol.kl_levels
    shown = f"{grid[0]:g}, {grid[1]:g}, …, {grid[-1]:g}" if x_key == "recall" else ", ".join(f"{v:g}" for v in grid)
    rule = f"levels: the fixed grid {shown}, where it lies in the {what} range common to all methods of a world"
    parts = [
        f"Prior hallucination interpolated linearly along each method's frontier (SFT point plus one point per "
        f"learning rate, sorted by {what}); {rule}. D = mean over a world's levels of (variant − {BASELINE})."
    ]
    for kind in protocol.world_kinds:
        comparisons = {seed: world_comparison(runs, protocol, kind, seed, x_key) for seed in protocol.world_seeds}
        seeds = list(protocol.world_seeds)
        lines = [
            "| variant | " + " | ".join(f"D, world seed {seed}" for seed in seeds) + " | mean ± sd |",
            "|---|" + "---|" * (len(seeds) + 1),
        ]
        for method in [m for m in protocol.methods if m != BASELINE]:
            values = [analysis.mean_over_levels(comparisons[seed]["diffs"].get(method, {})) for seed in seeds]
            cells = ["n/a" if math.isnan(value) else f"{value:+.3f}" for value in values]
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {_fmt(*analysis.mean_spread(values))} |")
        spans = ", ".join(
            f"seed {seed}: " + ("none" if c["span"] is None else f"{c['span'][0]:.3f}–{c['span'][1]:.3f}")
            for seed, c in comparisons.items()
        )
        parts.append(f"### {kind} world\n\nCommon {what} range per world: {spans}.\n\n" + "\n".join(lines))
        if x_key == "recall":
            parts.append(_level_table(comparisons, protocol))
    return "\n\n".join(parts)


def _level_table(comparisons: dict, protocol: Protocol) -> str:
    """Per recall level (the multiples of 0.05): each method's hallucination (mean ± sd over the seeds where the
    level is in range) and each variant's paired difference to DPO."""
    levels = sorted({level for c in comparisons.values() for level in c["levels"] if round(level * 100) % 5 == 0})
    variants = [m for m in protocol.methods if m != BASELINE]
    columns = ["recall", *protocol.methods, *(f"{m} − {BASELINE}" for m in variants)]
    lines = ["| " + " | ".join(columns) + " |", "|---|" + "---|" * (len(columns) - 1)]
    for level in levels:
        cells = []
        for method in protocol.methods:
            values = [c["values"][method][level] for c in comparisons.values() if level in c["values"].get(method, {})]
            mean, spread, n = analysis.mean_spread(values)
            cells.append("n/a" if n == 0 else f"{mean:.3f} ± {spread:.3f} (n={n})")
        for method in variants:
            diffs = [c["diffs"][method][level] for c in comparisons.values() if level in c["diffs"].get(method, {})]
            cells.append(_fmt(*analysis.mean_spread(diffs)))
        lines.append(f"| {level:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) if levels else "No recall level lies in any world's common range."


def plot_frontiers(runs: list[dict], protocol: Protocol, kind: str, path: Path) -> None:
    """Prior hallucination against object recall (left) and against KL to SFT (right): one line per method and seed."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for axis, x_key, label in zip(
        axes,
        ("recall", "kl_to_sft"),
        ("object recall", "KL(policy ‖ SFT), held-out chosen captions (symlog)"),
        strict=True,
    ):
        for index, seed in enumerate(protocol.world_seeds):
            lines = analysis.world_frontiers(runs, kind, seed, protocol.methods, x_key, "prior_hallucination")
            for method, line in lines.items():
                axis.plot(
                    [x for x, _ in line],
                    [y for _, y in line],
                    color=COLOURS.get(method, "black"),
                    marker=SEED_MARKERS[index % len(SEED_MARKERS)],
                    alpha=0.75,
                    label=method if index == 0 else None,
                )
        if x_key == "kl_to_sft":  # KL spans three decades and starts at SFT's 0: linear below 0.01, log above
            axis.set_xscale("symlog", linthresh=0.01)
        axis.set_xlabel(label)
        axis.set_ylabel(f"prior hallucination (ball named, {TRIGGER_WORDS.get(kind, kind)}, no ball)")
        axis.set_ylim(-0.03, 1.03)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    seeds = ", ".join(f"{SEED_MARKERS[i % len(SEED_MARKERS)]} seed {s}" for i, s in enumerate(protocol.world_seeds))
    fig.suptitle(f"{kind} world: frontiers from SFT along the learning rates (markers: {seeds})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _groups(runs: list[dict], kind: str) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for run in sorted(runs, key=lambda run: (run["learning_rate"], run["variant"])):
        if run["world_kind"] == kind:
            groups.setdefault((run["variant"], run["learning_rate"]), []).append(run)
    return groups


def summary_tables(runs: list[dict], protocol: Protocol) -> str:
    parts = []
    for kind in protocol.world_kinds:
        lines = ["| method | lr | n | " + " | ".join(label for _, label in METRICS) + " |"]
        lines.append("|---|---|---|" + "---|" * len(METRICS))
        for (variant, lr), group in _groups(runs, kind).items():
            cells = []
            for key, _ in METRICS:
                mean, spread, n = analysis.mean_spread([run[key] for run in group])
                cells.append("n/a" if n == 0 else f"{mean:.3f} ± {spread:.3f}")
            lines.append(f"| {variant} | {lr:g} | {len(group)} | " + " | ".join(cells) + " |")
        parts.append(f"### {kind} world\n\n" + "\n".join(lines))
    return "\n\n".join(parts)


def equal_lr_tables(runs: list[dict], protocol: Protocol) -> str:
    parts = []
    for kind in protocol.world_kinds:
        here = [run for run in runs if run["world_kind"] == kind]
        base = {(run["world_seed"], run["learning_rate"]): run for run in here if run["variant"] == BASELINE}
        lines = ["| variant | lr | " + " | ".join(PAIRED) + " |", "|---|---|" + "---|" * len(PAIRED)]
        for method in [m for m in protocol.methods if m != BASELINE]:
            for lr in protocol.learning_rates[kind]:
                pairs = [
                    (base[(run["world_seed"], lr)], run)
                    for run in here
                    if run["variant"] == method and run["learning_rate"] == lr and (run["world_seed"], lr) in base
                ]
                cells = []
                for key in PAIRED:
                    diffs = [run[key] - dpo[key] for dpo, run in pairs]
                    better = sum((d < 0) if key in LOWER_IS_BETTER else (d > 0) for d in diffs)
                    cells.append(f"{_fmt(*analysis.mean_spread(diffs))}, better {better}/{len(diffs)}")
                lines.append(f"| {method} | {lr:g} | " + " | ".join(cells) + " |")
        parts.append(f"### {kind} world\n\n" + "\n".join(lines))
    return "\n\n".join(parts)


def token_class(token: str) -> str:
    """``partner`` (the ball), ``object`` (another object name) or ``other`` (articles, punctuation, end tokens)."""
    word = token.strip().lower()
    return "partner" if word == PARTNER else "object" if word in OBJECTS else "other"


def view_class_means(pairs: list[dict], source: str) -> dict[str, float]:
    """Mean visual score s and weight c per side and token class; ``source`` is ``policy`` or ``reference``."""
    sums: dict[str, list[float]] = {}
    for pair in pairs:
        for side in ("chosen", "rejected"):
            data = pair[side] if source == "policy" else {**pair[side]["reference"], "tokens": pair[side]["tokens"]}
            for token, score, weight in zip(data["tokens"], data["visual_score"], data["weight"], strict=True):
                sums.setdefault(f"{side}/{token_class(token)}/s", []).append(score)
                sums.setdefault(f"{side}/{token_class(token)}/c", []).append(weight)
    return {key: sum(values) / len(values) for key, values in sorted(sums.items())}


def views_section(views: dict, protocol: Protocol, out: Path, path: Path) -> str:
    parts = [
        "`tpo-plugin inspect` with each method's model (world seed "
        f"{protocol.world_seeds[0]}; learning rate "
        + ", ".join(f"{lr:g} in the {kind} world" for kind, lr in protocol.view_learning_rates.items())
        + ") as policy and the SFT model as "
        "reference, on held-out pairs with the trigger and without the ball: *before* = the SFT model's s and c, "
        "*after* = the trained model's. s = z(token | clean) − z(token | noised, step 500); c = 0.5 + σ(s) in the "
        "chosen caption, 1.5 − σ(s) in the rejected one (DPO models are viewed with TPO's default weighting). "
        "Questions: does the hallucinated `ball` of the rejected caption get a large weight (s ≤ 0, c near 1.5), in "
        "the word world especially? Do the scores of function words (`other`) inflate after training?"
    ]
    for kind, by_method in views.items():
        first = next(iter(by_method.values()))
        columns = {"before (SFT)": view_class_means(first, "reference")}
        columns |= {f"after: {method}": view_class_means(pairs, "policy") for method, pairs in by_method.items()}
        keys = sorted({key for values in columns.values() for key in values})
        lines = ["| side/class/quantity | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
        lines += [
            f"| {key} | " + " | ".join(f"{values.get(key, math.nan):.3f}" for values in columns.values()) + " |"
            for key in keys
        ]
        reports = ", ".join(
            f"[{method}]({_shown(out / f'{kind}-{protocol.world_seeds[0]}' / 'views' / method / 'report.html', path)})"
            for method in by_method
        )
        parts.append(
            f"### {kind} world\n\nMeans over {len(first)} held-out pairs (partner = the ball, object = other object "
            f"names, other = remaining tokens). HTML reports: {reports}.\n\n" + "\n".join(lines)
        )
        parts += [_pair_tokens_table(by_method, index) for index in range(min(TOKENS_SHOWN, len(first)))]
    return "\n\n".join(parts)


def _pair_tokens_table(by_method: dict, index: int) -> str:
    """One pair token by token: s and c before (SFT) and after each method, chosen then rejected."""
    first = next(iter(by_method.values()))[index]
    images = ", ".join(Path(image).name for image in first.get("image", []))
    blocks = [f"**Pair {index}** ({images}; question: {_user_turn(first.get('question', ''))})"]
    for side in ("chosen", "rejected"):
        tokens = [_cell(token) for token in first[side]["tokens"]]
        rows = [("SFT", first[side]["reference"])] + [
            (method, pairs[index][side]) for method, pairs in by_method.items()
        ]
        lines = [f"| {side} | " + " | ".join(tokens) + " |", "|---|" + "---|" * len(tokens)]
        for label, data in rows:
            lines.append(f"| {label} s | " + " | ".join(f"{v:+.2f}" for v in data["visual_score"]) + " |")
            lines.append(f"| {label} c | " + " | ".join(f"{v:.2f}" for v in data["weight"]) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _user_turn(prompt: str) -> str:
    """The user's question out of a decoded chat prompt (the line after ``user``)."""
    lines = prompt.splitlines()
    return lines[lines.index("user") + 1] if "user" in lines[:-1] else " ".join(lines)


def _cell(token: str) -> str:
    """A token as a table cell: spaces trimmed, newlines and pipes escaped."""
    return token.strip(" ").replace("\n", "\\n").replace("|", "\\|") or "␣"


def training_table(runs: list[dict], protocol: Protocol) -> str:
    keys = ("train_loss", "rewards/accuracies", "rewards/margins", "tpo/weight_chosen", "tpo/weight_rejected")
    parts = []
    for kind in protocol.world_kinds:
        lines = [
            "| method | lr | train s | train CPU s | eval s | " + " | ".join(f"last step {k}" for k in keys) + " |",
            "|---|---|---|---|---|" + "---|" * len(keys),
        ]
        for (variant, lr), group in _groups(runs, kind).items():
            cells = []
            for key in keys:
                mean, spread, n = analysis.mean_spread([float(run["train_log"].get(key, math.nan)) for run in group])
                cells.append("n/a" if n == 0 else f"{mean:.3f} ± {spread:.3f}")
            seconds = [
                sum(run[key] for run in group) / len(group)
                for key in ("train_seconds", "train_cpu_seconds", "eval_seconds")
            ]
            lines.append(f"| {variant} | {lr:g} | " + " | ".join([f"{v:.0f}" for v in seconds] + cells) + " |")
        parts.append(f"### {kind} world (seconds: mean per run)\n\n" + "\n".join(lines))
    return "\n\n".join(parts)
