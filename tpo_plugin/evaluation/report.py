"""Writing an evaluation's metrics (``metrics.json``, ``metrics.md``) and comparing several evaluations.

``metrics.json`` holds fractions in [0, 1], unrounded (and, for CHAIR, the counts they are made of); the markdown
tables show percentages with one decimal, as papers report POPE, AMBER and CHAIR.
"""

import json
import os
from pathlib import Path

from .inputs import EvalInputError


METRICS_FILE, METRICS_TABLE_FILE = "metrics.json", "metrics.md"

COLUMNS = {
    "chair_s": "CHAIR_s", "chair_i": "CHAIR_i", "accuracy": "Accuracy", "precision": "Precision", "recall": "Recall",
    "f1": "F1", "yes_ratio": "Yes ratio",
}  # fmt: skip
"""Metric keys of metrics.json shown in percent, in table order, with their column titles (other keys are counts)."""

PLOTTED_METRICS = ("accuracy", "f1", "chair_s", "chair_i")
"""Plotted by ``eval compare`` where a run has them: POPE's and AMBER's first two, CHAIR's last two."""

WRITTEN_BY = "`tpo-plugin eval pope|amber|chair`"


def percent(value: float) -> str:
    return f"{100 * value:.1f}"


def metrics_table(metrics: dict[str, dict[str, float | int]]) -> str:
    """One row per split ("all" first): ``n`` and each metric in percent."""
    keys = [key for key in COLUMNS if key in metrics["all"]]
    lines = [
        "| split | n | " + " | ".join(COLUMNS[key] for key in keys) + " |",
        "|---|---:|" + "---:|" * len(keys),
    ]
    for split, values in metrics.items():
        lines.append(f"| {split} | {values['n']} | " + " | ".join(percent(values[key]) for key in keys) + " |")
    return "\n".join(lines) + "\n"


def write_atomically(path: Path, text: str) -> None:
    """Write a temporary file and rename it to ``path``: a crash or a full disk never leaves ``path`` cut off."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_metrics(metrics: dict[str, dict[str, float | int]], output_dir: Path, title: str, notes: str = "") -> None:
    """``metrics.json`` and ``metrics.md`` (a heading, :func:`metrics_table`, then ``notes``) in ``output_dir``."""
    output_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(output_dir / METRICS_FILE, json.dumps(metrics, indent=2) + "\n")
    write_atomically(output_dir / METRICS_TABLE_FILE, f"# {title}\n\n{metrics_table(metrics)}{notes}")


def is_split(values: object) -> bool:
    """Whether ``values`` is one split of a metrics.json: numbers only, ``n`` and a benchmark's plotted metrics
    (POPE's and AMBER's accuracy and F1, or CHAIR's CHAIR_s and CHAIR_i) among them."""
    return (
        isinstance(values, dict)
        and "n" in values
        and (all(key in values for key in PLOTTED_METRICS[:2]) or all(key in values for key in PLOTTED_METRICS[2:]))
        and all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in values.values())
    )


def read_metrics(output_dir: Path) -> dict[str, dict[str, float | int]]:
    """The metrics.json of an evaluation's output directory, refused unless it holds what the table and the plot
    read: an "all" split, and every split as :func:`is_split` says."""
    path = output_dir / METRICS_FILE
    if not path.is_file():
        raise EvalInputError([f"{output_dir}: no {METRICS_FILE} (not the output of {WRITTEN_BY})"])
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:  # e.g. empty, or cut off by a crash
        raise EvalInputError([f"{path}: not valid JSON ({error}); rerun the evaluation that wrote it"]) from None
    if not (isinstance(metrics, dict) and "all" in metrics and all(map(is_split, metrics.values()))):
        problem = f"not a {METRICS_FILE} as {WRITTEN_BY} writes it; rerun the evaluation that wrote it"
        raise EvalInputError([f"{path}: {problem}"])
    return metrics


def distinct_labels(paths: list[Path]) -> list[str]:
    """Short names for evaluation directories: the last path component, or as many trailing components as it
    takes to tell them apart (``saves/sft/pope`` and ``saves/tpo/pope`` become ``sft/pope`` and ``tpo/pope``)."""
    parts = [Path(path).resolve().parts for path in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(path) for path in paths]  # the same directory twice


def compare_table(runs: dict[str, dict[str, dict[str, float | int]]]) -> str:
    """One row per (split, metric), one column per run, in percent; ``–`` where a run lacks the split. Splits
    and metrics in the order the runs list them."""
    splits = list(dict.fromkeys(split for metrics in runs.values() for split in metrics))
    lines = ["| split | metric | " + " | ".join(runs) + " |", "|---|---|" + "---:|" * len(runs)]
    for split in splits:
        keys = [key for key in COLUMNS if any(key in metrics.get(split, {}) for metrics in runs.values())]
        for key in ["n", *keys]:
            cells = []
            for metrics in runs.values():
                value = metrics.get(split, {}).get(key)
                cells.append("–" if value is None else str(value) if key == "n" else percent(value))
            lines.append(f"| {split} | {'n' if key == 'n' else COLUMNS[key]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_comparison(runs: dict[str, dict[str, dict[str, float | int]]], path: Path) -> None:
    """A bar chart per metric of :data:`PLOTTED_METRICS` that a run has: splits along x, one bar per run, in
    percent."""
    # Deferred: matplotlib takes half a second to import, and only this function needs it.
    import matplotlib

    matplotlib.use("Agg")  # files only; no display is needed or assumed
    import matplotlib.pyplot as plt

    splits = list(dict.fromkeys(split for metrics in runs.values() for split in metrics))
    present = {key for metrics in runs.values() for values in metrics.values() for key in values}
    plotted = [key for key in PLOTTED_METRICS if key in present]
    width = 0.8 / len(runs)
    figure, axes = plt.subplots(1, len(plotted), figsize=(5 + 1.2 * len(splits), 4), squeeze=False)
    for axis, key in zip(axes[0], plotted, strict=True):
        for index, (label, metrics) in enumerate(runs.items()):
            heights = [100 * metrics[split].get(key, 0.0) if split in metrics else 0.0 for split in splits]
            offsets = [position + (index - (len(runs) - 1) / 2) * width for position in range(len(splits))]
            axis.bar(offsets, heights, width, label=label)
        axis.set_xticks(range(len(splits)), splits, rotation=30 if len(splits) > 4 else 0)
        axis.set_ylim(0, 100)
        axis.set_ylabel(f"{COLUMNS[key]} (%)")
        axis.set_title(COLUMNS[key])
        axis.grid(axis="y", alpha=0.3)
    axes[0][-1].legend(fontsize="small", loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
