"""RESULTS.md: the tables (mean and spread per method), paired TPO-DPO differences, the trade-off plot and the
per-token view, all computed from the run records; nothing in the report is typed in by hand.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import matplotlib


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .protocol import Protocol  # noqa: E402
from .token_view import plot_token_view, token_view_markdown, token_view_stats  # noqa: E402


METRICS = (
    ("prior_hallucination", "prior halluc. ↓"),
    ("partner_recall", "ball recall ↑"),
    ("partner_recall_alone", "ball recall w/o dog ↑"),
    ("recall", "object recall ↑"),
    ("chair_i", "CHAIR_i ↓"),
    ("chair_s", "CHAIR_s ↓"),
    ("objects_per_caption", "objects / caption"),
    ("pope_accuracy", "POPE acc ↑"),
    ("pope_precision", "POPE prec ↑"),
    ("pope_recall", "POPE rec ↑"),
    ("pope_f1", "POPE F1 ↑"),
    ("pope_yes_ratio", "POPE yes-ratio"),
    ("pope_partner_yes_on_trigger_only", "POPE 'ball?' yes on dog-only ↓"),
)
PAIRED = ("prior_hallucination", "partner_recall", "recall", "chair_i", "pope_f1")
COLOURS = {"sft": "grey", "dpo": "tab:blue", "tpo": "tab:orange"}
TOKEN_VIEW_SHOWN = 4  # pairs drawn and tabulated token by token; the means cover all viewed pairs


def _shown(target: Path, results_path: Path) -> str:
    """A path as the report shows it: relative to the report when it lies below the report's folder."""
    try:
        return str(target.relative_to(results_path.parent))
    except ValueError:
        return str(target)


def write_results(
    protocol: Protocol, runs: list[dict], views: dict, out: Path, path: Path, mode: str, seconds: float, jobs: int
) -> None:
    """Write RESULTS.md (and its PNGs next to it) from the run records and token views."""
    path.parent.mkdir(parents=True, exist_ok=True)
    plot_name = "tradeoff.png"
    plot_tradeoff(runs, path.parent / plot_name)
    sections = [
        "# Hallucination world: TPO vs DPO — results",
        f"Written by `python -m benchmarks.hallucination_world.run{' --quick' if mode == 'quick' else ''}` "
        f"({mode} protocol, {len(runs)} runs; training and evaluation took "
        f"{sum(run['train_seconds'] + run['eval_seconds'] for run in runs) / 60:.0f} min summed over runs, "
        f"{jobs} at a time; this invocation took {seconds / 60:.1f} min, reusing runs "
        f"already finished in the run folder). Settings: PROTOCOL.md and `{_shown(out / 'protocol.json', path)}`; "
        f"every run's recipe, log, captions and metrics are under `{_shown(out, path)}`.",
        "## Outcome\n\n" + verdict(runs, protocol),
        "## Mean ± standard deviation over runs (n = runs per row)\n\n" + summary_table(runs),
        "## Paired differences TPO − DPO (same world, training seed and learning rate)\n\n" + paired_table(runs),
        f"## Trade-off\n\n![trade-off]({plot_name})\n\nOne point per run; colour per method.",
        "## Training\n\n" + training_table(runs),
        "## Per-token view\n\n" + views_section(views, path.parent),
        "## Protocol\n\n```json\n" + json.dumps(protocol.as_dict(), indent=1) + "\n```",
    ]
    path.write_text("\n\n".join(sections) + "\n")


def _groups(runs: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["variant"], run["learning_rate"]), []).append(run)
    return groups


def _mean_std(values: list[float]) -> str:
    values = [v for v in values if v == v]  # drop nan (a metric with no eligible image)
    if not values:
        return "n/a"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


def summary_table(runs: list[dict]) -> str:
    lines = ["| method | lr | n | " + " | ".join(label for _, label in METRICS) + " |"]
    lines.append("|---|---|---|" + "---|" * len(METRICS))
    for (variant, lr), group in _groups(runs).items():
        cells = [_mean_std([run[key] for run in group]) for key, _ in METRICS]
        lines.append(f"| {variant} | {'' if lr is None else f'{lr:g}'} | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pairs(runs: list[dict]) -> list[tuple[dict, dict]]:
    """(DPO, TPO-default) runs that share world seed, training seed and learning rate."""
    key = lambda run: (run["world_seed"], run["train_seed"], run["learning_rate"])  # noqa: E731
    dpo = {key(run): run for run in runs if run["variant"] == "dpo"}
    return [(dpo[key(run)], run) for run in runs if run["variant"] == "tpo" and key(run) in dpo]


def paired_table(runs: list[dict]) -> str:
    pairs = _pairs(runs)
    lines = ["| metric | mean ± sd of TPO − DPO | TPO better in | n pairs |", "|---|---|---|---|"]
    for key in PAIRED:
        lower_is_better = key in ("prior_hallucination", "chair_i")
        diffs = [tpo[key] - dpo[key] for dpo, tpo in pairs]
        better = sum((d < 0) if lower_is_better else (d > 0) for d in diffs)
        lines.append(f"| {key} | {_mean_std(diffs)} | {better} of {len(diffs)} | {len(diffs)} |")
    return "\n".join(lines)


def verdict(runs: list[dict], protocol: Protocol) -> str:
    """The issue's question, answered from the numbers: does TPO lower prior hallucination at least as much as
    DPO while losing less ball recall? Stated per learning rate, with the means it rests on."""
    lines = []
    sft = [run for run in runs if run["variant"] == "sft"]
    sft_h = statistics.mean(run["prior_hallucination"] for run in sft)
    sft_r = statistics.mean(run["partner_recall"] for run in sft)
    lines.append(
        f"- After SFT (the common starting point): ball named on {sft_h:.1%} of dog-without-ball test images "
        f"(ball recall when present {sft_r:.1%})."
    )
    for lr in protocol.learning_rates:
        means = {}
        for method in ("dpo", "tpo"):
            group = [run for run in runs if run["variant"] == method and run["learning_rate"] == lr]
            means[method] = {key: statistics.mean(run[key] for run in group) for key in PAIRED}
        halluc_ok = means["tpo"]["prior_hallucination"] <= means["dpo"]["prior_hallucination"]
        recall_ok = means["tpo"]["partner_recall"] >= means["dpo"]["partner_recall"]
        lines.append(
            f"- lr {lr:g}: prior hallucination DPO {means['dpo']['prior_hallucination']:.1%}, "
            f"TPO {means['tpo']['prior_hallucination']:.1%} "
            f"(TPO at least as low: **{'yes' if halluc_ok else 'no'}**); "
            f"ball recall DPO {means['dpo']['partner_recall']:.1%}, TPO {means['tpo']['partner_recall']:.1%} "
            f"(TPO keeps more: **{'yes' if recall_ok else 'no'}**)."
        )
    lines.append("- Means only; see the spreads and the paired differences below before reading a difference as real.")
    return "\n".join(lines)


def training_table(runs: list[dict]) -> str:
    keys = ("train_loss", "rewards/accuracies", "rewards/margins", "tpo/weight_chosen", "tpo/weight_rejected")
    lines = [
        "| method | lr | train s (mean) | " + " | ".join(f"last step {k}" for k in keys) + " |",
        "|---|---|---|" + "---|" * len(keys),
    ]
    for (variant, lr), group in _groups(runs).items():
        cells = [_mean_std([float(run["train_log"].get(k, "nan")) for run in group]) for k in keys]
        seconds = statistics.mean(run["train_seconds"] for run in group)
        lines.append(f"| {variant} | {'' if lr is None else f'{lr:g}'} | {seconds:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_tradeoff(runs: list[dict], path: Path) -> None:
    """Prior hallucination (x) against ball recall and object recall (y), one point per run."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    markers = ["o", "s", "^", "D", "v", "P"]
    ablation_colours = iter(["tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive"])
    colours = dict(COLOURS)
    lrs = sorted({run["learning_rate"] for run in runs if run["learning_rate"] is not None})
    for (variant, lr), group in _groups(runs).items():
        if variant not in colours:  # not setdefault: its default would draw a colour for every group
            colours[variant] = next(ablation_colours)
        colour = colours[variant]
        marker = "*" if lr is None else markers[lrs.index(lr) % len(markers)]
        label = variant if lr is None else f"{variant} (lr {lr:g})"
        for axis, key in zip(axes, ("partner_recall", "recall"), strict=True):
            axis.scatter(
                [run["prior_hallucination"] for run in group],
                [run[key] for run in group],
                color=colour,
                marker=marker,
                label=label,
                alpha=0.8,
                s=50,
            )
    for axis, ylabel in zip(axes, ("ball recall (ball present)", "object recall (all objects)"), strict=True):
        axis.set_xlabel("prior hallucination (ball named on dog-without-ball images)")
        axis.set_ylabel(ylabel)
        axis.set_xlim(-0.03, 1.03)  # rates: fixed axes, so plots of different runs compare at a glance
        axis.set_ylim(-0.03, 1.03)
        axis.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle("Hallucination vs recall: left/up is better")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def views_section(views: dict, folder: Path) -> str:
    parts = [
        "Visual score s = z(token | clean image) − z(token | noised image, step 500) and TPO weight c "
        "(chosen: 0.5 + σ(s), rejected: 1.5 − σ(s)) on pairs with a dog and no ball. The question: does the "
        "hallucinated `ball` in the rejected caption get a large weight (s ≤ 0), and do the object tokens of the "
        "chosen caption have high visual scores?"
    ]
    stats = {label: token_view_stats(view) for label, view in views.items()}
    keys = sorted({key for values in stats.values() for key in values})
    lines = ["| side/token class/quantity | " + " | ".join(stats) + " |", "|---|" + "---|" * len(stats)]
    lines += [
        f"| {key} | " + " | ".join(f"{stats[label].get(key, float('nan')):.3f}" for label in stats) + " |"
        for key in keys
    ]
    count = len(next(iter(views.values()), []))
    parts.append(
        f"Means over {count} pairs (partner = the ball, object = the other object names, other = the "
        "remaining tokens):\n\n" + "\n".join(lines)
    )
    for index, (label, view) in enumerate(views.items()):
        name = f"token_view_{index}.png"
        shown = view[:TOKEN_VIEW_SHOWN]
        plot_token_view(shown, label, folder / name)
        parts += [f"### {label}", f"![{label}]({name})", token_view_markdown(shown)]
    return "\n\n".join(parts)
