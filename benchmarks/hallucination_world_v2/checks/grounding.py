"""mDPO's visual-grounding terms along v2's trade-off (issue #39, item 4): pre-registered, see GROUNDING_PROTOCOL.md.

    python -m benchmarks.hallucination_world_v2.run grounding [--out DIR] [--jobs 2] [--results PATH]

Rules: GROUNDING_PROTOCOL.md, fixed before any of these runs; settings: ``grounding.json``. World seeds 12, 13, 14
of both kinds (no earlier check used them), v2's SFT and preference recipes at v2's five learning rates per kind:
``dpo``, ``tpo`` (the defaults), ``mdpo`` (``tpo_reward_on: none`` and both terms at weight 1: mDPO's objective
with diffusion corruption) and ``tpo_terms`` (the defaults and both terms at weight 1). Prior hallucination
compared at matched object recall as v2 does (D, per world, over the recall range common to the four methods),
KL to SFT and CHAIR_i as secondary measures, collapses counted as the stability checks count them. Resumable like
v2. Writes ``GROUNDING.md`` (with the recommendation its rules pick) and one plot per world kind.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .. import analysis, run  # noqa: E402
from . import load  # noqa: E402
from .common import cpu_model, names, run_minutes, signed, watched_run, yes  # noqa: E402


CHECK = load("grounding")
PROTOCOL = CHECK.protocol
BASELINE = CHECK.constants["baseline"]
LARGEST_RATE = CHECK.constants["largest_rate"]
COLLAPSE_FRACTION = CHECK.constants["collapse_fraction"]  # collapsed: recall below this × the world's SFT recall
DEGRADED_FRACTION = CHECK.constants["degraded_fraction"]  # degraded: recall below this × the world's SFT recall
MIN_WORLDS = CHECK.constants["min_worlds"]  # "lower in at least this many worlds" (of all the check's worlds)
COMPARISONS = tuple(tuple(pair) for pair in CHECK.constants["comparisons"])
"""D(a − b): the two primary questions (mdpo − dpo, tpo_terms − tpo) first, then the secondary ones."""
METHODS = (BASELINE, *CHECK.groups[0]["methods"])
MEASURES = (  # (x, y, the x levels, label): the primary measure first
    ("recall", "prior_hallucination", PROTOCOL.recall_levels, "prior hallucination at matched recall"),
    ("kl_to_sft", "prior_hallucination", PROTOCOL.kl_levels, "prior hallucination at matched KL to SFT"),
    ("recall", "chair_i", PROTOCOL.recall_levels, "CHAIR_i at matched recall"),
)
STYLES = {"dpo": "tab:blue", "tpo": "tab:orange", "mdpo": "tab:green", "tpo_terms": "tab:red"}


def run_one(job: run.Job) -> dict:
    """A stage-tpo run with the step the shipped monitor warned at (no checkpoints: no recall then); DPO as v2."""
    return watched_run(job, PROTOCOL) if job.recipe["stage"] == "tpo" else run.run_job(job, PROTOCOL)


def report_check(base_runs: list[dict], runs: list[dict], path: Path, seconds: float, jobs: int) -> None:
    records = base_runs + runs
    for kind in PROTOCOL.world_kinds:
        plot_frontiers(records, kind, path.parent / f"grounding_{kind}.png")
    write_report(records, path, seconds, jobs)


def worlds() -> list[tuple[str, int]]:
    return [(kind, seed) for seed in PROTOCOL.world_seeds for kind in PROTOCOL.world_kinds]


def world_differences(records: list[dict], kind: str, seed: int, x_key: str, y_key: str, levels) -> tuple:
    """v2's rules 1–3 in one world: every method's frontier (SFT point plus its runs), the x range common to all
    four methods, the fixed levels inside it; returns ({(a, b): D(a − b)}, the range). D is nan without a level."""
    lines = analysis.world_frontiers(records, kind, seed, METHODS, x_key, y_key)
    span = analysis.common_range(list(lines.values()))
    inside = analysis.levels_in_range(levels, span)
    values = analysis.matched(lines, inside)
    d = {
        (a, b): analysis.mean_over_levels({level: values[a][level] - values[b][level] for level in inside})
        for a, b in COMPARISONS
    }
    return d, span


def answer(per_world: dict[tuple[str, int], float]) -> dict:
    """A comparison over all worlds: worlds with D < 0 and D > 0, mean ± sd and its standard error over the worlds
    with a value; ``lower`` (rule 4): D < 0 in at least MIN_WORLDS worlds and mean + SE < 0; ``higher`` the same
    the other way (D > 0 in at least MIN_WORLDS worlds and mean − SE > 0)."""
    values = list(per_world.values())
    mean, sd, n = analysis.mean_spread(values)
    se = sd / math.sqrt(n) if n else float("nan")
    below = sum(value < 0 for value in values)
    above = sum(value > 0 for value in values)
    return {
        "below": below,
        "above": above,
        "n": n,
        "mean": mean,
        "sd": sd,
        "se": se,
        "lower": below >= MIN_WORLDS and mean + se < 0,
        "higher": above >= MIN_WORLDS and mean - se > 0,
    }


def kind_helps(per_world: dict[tuple[str, int], float], kind: str) -> bool:
    """v2's rule 4 in one world kind: mean D < 0 and D < 0 in every world seed of the kind."""
    values = [per_world[kind, seed] for seed in PROTOCOL.world_seeds]
    return all(value < 0 for value in values) and sum(values) / len(values) < 0


def collapses(by_key: dict, method: str, fraction: float, rates: str = "all") -> list[tuple]:
    """The method's runs whose recall is below ``fraction`` × the world's SFT recall: (kind, seed, lr)."""
    found = []
    for kind, seed in worlds():
        sft = by_key[kind, seed, "sft", 0.0]["recall"]
        for lr in PROTOCOL.learning_rates[kind]:
            if rates != "all" and lr != LARGEST_RATE:
                continue
            if by_key[kind, seed, method, lr]["recall"] < fraction * sft:
                found.append((kind, seed, lr))
    return found


def write_report(records: list[dict], path: Path, seconds: float, jobs: int) -> None:
    by_key = {(r["world_kind"], r["world_seed"], r["variant"], r["learning_rate"]): r for r in records}
    tables = {}  # measure index -> {(kind, seed): (d, span)}
    for index, (x_key, y_key, levels, _) in enumerate(MEASURES):
        tables[index] = {
            (kind, seed): world_differences(records, kind, seed, x_key, y_key, levels) for kind, seed in worlds()
        }
    answers = {
        (index, pair): answer({world: tables[index][world][0][pair] for world in worlds()})
        for index in tables
        for pair in COMPARISONS
    }
    counted = {
        method: (
            collapses(by_key, method, COLLAPSE_FRACTION),
            collapses(by_key, method, COLLAPSE_FRACTION, "largest"),
            collapses(by_key, method, DEGRADED_FRACTION),
        )
        for method in METHODS
    }
    sections = [
        "# mDPO's visual-grounding terms along the trade-off — results (issue #39)",
        f"Written by `python -m benchmarks.hallucination_world_v2.run grounding` ({len(records)} runs including the "
        f"worlds' SFT, {jobs} at a time, on {cpu_model()}; {run_minutes(records):.0f} min of training and "
        f"evaluation summed over the runs, this invocation {seconds / 60:.0f} min). Rules: GROUNDING_PROTOCOL.md, "
        f"fixed and committed before any of these runs. Collapsed: object recall below {COLLAPSE_FRACTION:g} × the "
        f"world's SFT recall; degraded: below {DEGRADED_FRACTION:g} ×.",
        "## Runs\n\n" + runs_table(by_key),
        "## Matched comparisons\n\n"
        + "\n\n".join(d_table(tables[index], label) for index, (*_, label) in enumerate(MEASURES)),
        "![frontiers, pixel world](grounding_pixel.png)\n\n![frontiers, word world](grounding_word.png)",
        "## Answers\n\n" + answers_text(answers, tables, counted, by_key),
        "## Recommendation (rule 8)\n\n" + recommendation(answers, counted),
    ]
    path.write_text("\n\n".join(sections) + "\n")


def runs_table(by_key: dict) -> str:
    lines = [
        "| world | lr | method | recall (SFT) | prior hallucination | CHAIR_i | KL to SFT | collapsed | degraded | "
        "monitor warned at step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, seed in worlds():
        sft = by_key[kind, seed, "sft", 0.0]
        lines.append(
            f"| {kind}-{seed} | 0 | sft | {sft['recall']:.2f} | {sft['prior_hallucination']:.3f} | "
            f"{sft['chair_i']:.3f} | 0 | | | |"
        )
        for lr in PROTOCOL.learning_rates[kind]:
            for method in METHODS:
                r = by_key[kind, seed, method, lr]
                step = r.get("warning_step")
                lines.append(
                    f"| {kind}-{seed} | {lr:g} | {method} | {r['recall']:.2f} ({sft['recall']:.2f}) | "
                    f"{r['prior_hallucination']:.3f} | {r['chair_i']:.3f} | {r['kl_to_sft']:.3f} | "
                    f"{yes(r['recall'] < COLLAPSE_FRACTION * sft['recall'])} | "
                    f"{yes(r['recall'] < DEGRADED_FRACTION * sft['recall'])} | "
                    f"{'—' if step is None else step} |"
                )
    return "\n".join(lines)


def d_table(table: dict, label: str) -> str:
    columns = [f"D({a} − {b})" for a, b in COMPARISONS]
    lines = [
        f"**{label}.** D(a − b): a's value minus b's at the fixed levels inside the range common to all four "
        "methods' frontiers (SFT point plus five runs; range in the last column), averaged; negative: a lower.",
        "",
        "| world | " + " | ".join(columns) + " | common range |",
        "|---|" + "---|" * len(columns) + "---|",
    ]
    for (kind, seed), (d, span) in table.items():
        where = "none" if span is None else f"{span[0]:.3f}–{span[1]:.3f}"
        lines.append(f"| {kind}-{seed} | " + " | ".join(signed(d[pair]) for pair in COMPARISONS) + f" | {where} |")
    for kind in PROTOCOL.world_kinds:
        cells = []
        for pair in COMPARISONS:
            mean, sd, n = analysis.mean_spread([d[pair] for (k, _), (d, _) in table.items() if k == kind])
            cells.append(f"{signed(mean)} ± {sd:.3f} (n {n})")
        lines.append(f"| {kind}, mean ± sd | " + " | ".join(cells) + " | |")
    return "\n".join(lines)


def summary(result: dict) -> str:
    return (
        f"D < 0 in {result['below']} of {len(worlds())} worlds (D > 0 in {result['above']}); mean "
        f"{signed(result['mean'])} ± {result['sd']:.3f} sd, SE {result['se']:.3f} (n {result['n']})"
    )


def answers_text(answers: dict, tables: dict, counted: dict, by_key: dict) -> str:
    primary = {pair: {world: tables[0][world][0][pair] for world in worlds()} for pair in COMPARISONS}

    def per_kind(pair: tuple[str, str]) -> str:
        return "; ".join(f"{kind} {yes(kind_helps(primary[pair], kind))}" for kind in PROTOCOL.world_kinds)

    def question(number: str, pair: tuple[str, str], text: str) -> list[str]:
        result = answers[0, pair]
        secondary = {index: answers[index, pair] for index in (1, 2)}
        agree = ", ".join(
            f"{MEASURES[index][3]} {signed(other['mean'])} (lower: {yes(other['lower'])})"
            for index, other in secondary.items()
        )
        return [
            f"- **{number}. {text}** {yes(result['lower'])} — {summary(result)}. Worse beyond its spread: "
            f"{yes(result['higher'])}. Per kind (v2's rule: mean D < 0 and D < 0 in every seed): {per_kind(pair)}. "
            f"Secondary: {agree}."
        ]

    lines = []
    lines += question("Q1", ("mdpo", "dpo"), "Does mDPO-style hallucinate less than DPO at matched recall?")
    lines += question("Q2", ("tpo_terms", "tpo"), "Do both terms lower TPO's hallucination at matched recall?")
    collapse_line = "; ".join(
        f"`{method}` {len(all_rates)} of {sum(len(PROTOCOL.learning_rates[k]) for k, _ in worlds())} "
        f"({names([(k, s, f'{lr:g}') for k, s, lr in all_rates]) or 'none'}), at lr {LARGEST_RATE:g} "
        f"{len(largest)} of {len(worlds())}, degraded {len(degraded)}"
        for method, (all_rates, largest, degraded) in counted.items()
    )
    lines.append(f"- **Q3. Collapses per method** (every learning rate): {collapse_line}.")
    own = {
        method: [key for key in counted[method][0] if key not in counted[BASELINE][0]]
        for method in METHODS
        if method != BASELINE
    }
    lines.append(
        "- **Q3, own collapses** (collapsed where `dpo` did not, same world and rate): "
        + "; ".join(f"`{method}` {len(keys)}" for method, keys in own.items())
        + "."
    )
    lines += question("Q4", ("tpo", "dpo"), "Does TPO hallucinate less than DPO (v2's question, fresh worlds)?")
    lines += question("Q5", ("tpo_terms", "dpo"), "Does TPO with both terms hallucinate less than DPO?")
    lines += question("Q6", ("mdpo", "tpo"), "Does mDPO-style hallucinate less than TPO?")
    return "\n".join(lines)


def recommendation(answers: dict, counted: dict) -> str:
    """Rule 8 of GROUNDING_PROTOCOL.md, applied as written."""
    count = {method: len(found[0]) for method, found in counted.items()}
    terms_help_tpo = answers[0, ("tpo_terms", "tpo")]["lower"] and count["tpo_terms"] <= count["tpo"]
    mdpo_helps = answers[0, ("mdpo", "dpo")]["lower"] and count["mdpo"] <= count[BASELINE]
    if terms_help_tpo and mdpo_helps:
        better = (
            "tpo_terms" if answers[0, ("tpo_terms", "dpo")]["mean"] < answers[0, ("mdpo", "dpo")]["mean"] else "mdpo"
        )
        case = f"8a+8b: both help; the lower mean D against DPO picks `{better}`"
    elif terms_help_tpo:
        case, better = "8a: the terms help TPO", "tpo_terms"
    elif mdpo_helps:
        case, better = "8b: mDPO-style helps over DPO, the terms do not help TPO", "mdpo"
    else:
        case, better = "8c: no term helps", None
    pair = {"tpo_terms": ("tpo_terms", "tpo"), "mdpo": ("mdpo", "dpo")}.get(better)
    caveats = []
    if pair:
        caveats = [MEASURES[index][3] for index in (1, 2) if answers[index, pair]["higher"]]
    guard = count["tpo_terms"] < count["tpo"] and not answers[0, ("tpo_terms", "tpo")]["higher"]
    lines = [
        f"- **Case {case}.** Recommended in the docs: "
        + {
            "tpo_terms": "stage `tpo` with `tpo_conditional_weight: 1` and `tpo_anchor_weight: 1`.",
            "mdpo": "the mDPO-style configuration (`tpo_reward_on: none`, both weights 1) where DPO is the "
            "alternative; the terms are not recommended with TPO's token weights.",
            None: "no term: neither the mDPO-style configuration nor the terms with TPO lowered hallucination "
            "at matched recall beyond its spread; the keys stay documented, off by default.",
        }[better],
        f"- **Secondary measures against it** (worse beyond their spread): {', '.join(caveats) or 'none'}.",
        f"- **The terms cut TPO's collapses** (fewer collapses than `tpo`, D(tpo_terms − tpo) not worse beyond "
        f"its spread): {yes(guard)} ({count['tpo_terms']} against {count['tpo']}).",
        "- The defaults stay 0 whatever this says (rule 8).",
    ]
    return "\n".join(lines)


def plot_frontiers(records: list[dict], kind: str, path: Path) -> None:
    """Prior hallucination against recall (top) and against KL to SFT (middle), CHAIR_i against recall (bottom),
    one column per world seed."""
    seeds = PROTOCOL.world_seeds
    fig, axes = plt.subplots(len(MEASURES), len(seeds), figsize=(6 * len(seeds), 4 * len(MEASURES)), squeeze=False)
    for row, (x_key, y_key, _, label) in enumerate(MEASURES):
        for column, seed in enumerate(seeds):
            axis = axes[row][column]
            for method, line in analysis.world_frontiers(records, kind, seed, METHODS, x_key, y_key).items():
                axis.plot([x for x, _ in line], [y for _, y in line], color=STYLES[method], marker="o", label=method)
            if x_key == "kl_to_sft":
                axis.set_xscale("symlog", linthresh=1e-3)
            axis.set_title(f"{kind}-{seed}: {label}")
            axis.set_xlabel(x_key)
            axis.set_ylabel(y_key)
            axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{kind} world: SFT point and lrs {', '.join(f'{lr:g}' for lr in PROTOCOL.learning_rates[kind])}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
