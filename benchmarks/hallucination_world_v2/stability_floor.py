"""Stability, fifth check (issue #19): the warning's one-nat floor against the doubling rule, on fresh worlds.

    python -m benchmarks.hallucination_world_v2.stability_floor [--out DIR] [--jobs 2] [--results PATH]

Rules: STABILITY_PROTOCOL_5.md, fixed before these runs. World seeds 8 and 9 of both kinds, v2's SFT and
preference recipes: TPO with and without ``pref_ftx: 1.0`` at the fourth check's learning rates, saving every 5
steps, and DPO at 1e-4. Per TPO run: the step the shipped monitor (floor rule) names in its log, the step the
doubling rule would have named (replayed here from the logged history), and the recall of the model saved at
each. Resumable like v2. Writes ``STABILITY_5.md``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


if __package__ in (None, ""):  # run as a script: make the repository importable as the package's root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.hallucination_world_v2 import run, stability, stability_anchor, stability_heldout  # noqa: E402
from benchmarks.hallucination_world_v2.protocol import FULL  # noqa: E402
from benchmarks.hallucination_world_v2.world import PIXEL, WORD  # noqa: E402


HERE = Path(__file__).resolve().parent
LARGEST_RATE = 1e-4
PROTOCOL = dataclasses.replace(  # worlds, SFT and DPO at the largest rate
    FULL,
    world_seeds=(8, 9),
    methods=("dpo",),
    learning_rates={PIXEL: (LARGEST_RATE,), WORD: (LARGEST_RATE,)},
    view_learning_rates={PIXEL: LARGEST_RATE, WORD: LARGEST_RATE},
)
TPO_RATES = {PIXEL: (2e-5, 5e-5, LARGEST_RATE), WORD: (1e-5, 3e-5, LARGEST_RATE)}
# The two rules as STABILITY_PROTOCOL_5.md states them, written out here rather than read from the monitor, so
# the replay of the floor rule checks the monitor's code.
DOUBLING, DRIFT, FLOOR = 2.0, 0.25, 1.0
RULES = {"floor": FLOOR, "doubling": 0.0}  # each rule's least fall of logps/chosen below its highest, in nats


def main(argv: list[str] | None = None) -> int:
    args = run.check_arguments(__doc__, HERE / "runs_floor", HERE / "STABILITY_5.md", argv)
    start = time.perf_counter()
    out = args.out.resolve()
    base_runs = run.run_protocol(PROTOCOL, out, args.jobs)
    jobs = [
        job
        for seed in PROTOCOL.world_seeds
        for kind in PROTOCOL.world_kinds
        for lr in TPO_RATES[kind]
        for job in stability_anchor.anchored_jobs(PROTOCOL, out, kind, seed, lr)
        if job.recipe["stage"] == "tpo"
    ]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        runs = list(pool.map(watched_run, jobs))
    write_report(base_runs + runs, args.results, args.jobs)
    print(f"[stability-floor] {len(base_runs) + len(runs)} runs in {time.perf_counter() - start:.0f} s")
    return 0


def replayed_step(history: list[dict], least_fall: float) -> int | None:
    """The first logged step where ``logps/chosen`` is below DOUBLING × the highest logged so far and at least
    ``least_fall`` below it, while the mean score drift is above DRIFT; None if there is none."""
    highest = -float("inf")
    for entry in history:
        chosen = entry["logps/chosen"]
        highest = max(highest, chosen)
        if chosen < DOUBLING * highest and highest - chosen >= least_fall and stability.mean_drift(entry) > DRIFT:
            return entry["step"]
    return None


def watched_run(job: run.Job) -> dict:
    """Train and evaluate; then each rule's warning step and the recall of the checkpoint saved there."""
    record = stability.with_history(run.run_job(job, PROTOCOL))
    extra = job.run_dir / "rules.json"
    if not extra.exists():
        steps = {rule: replayed_step(record["history"], fall) for rule, fall in RULES.items()}
        logged = stability_heldout.warning_step(job.run_dir / "train.log")
        recalls = stability_heldout.checkpoint_recalls(job, [logged, steps["doubling"]])
        warnings = {"logged": (logged, recalls[logged]), "doubling": (steps["doubling"], recalls[steps["doubling"]])}
        extra.write_text(json.dumps({"warnings": warnings, "replayed_floor": steps["floor"]}))
    return {**record, **json.loads(extra.read_text())}


def write_report(records: list[dict], path: Path, jobs: int) -> None:
    worlds = [(kind, seed) for seed in PROTOCOL.world_seeds for kind in PROTOCOL.world_kinds]
    by_key, watched = keyed_records(records, worlds, TPO_RATES)
    rules = {"logged": "floor rule", "doubling": "doubling rule"}
    sections = [
        "# Stability, fifth check: the warning's one-nat floor on fresh worlds — results (#19)",
        f"Written by `python -m benchmarks.hallucination_world_v2.stability_floor` ({len(records)} runs including "
        f"the worlds' SFT, {jobs} at a time, on {stability_anchor.cpu_model()}; "
        f"{stability_anchor.run_minutes(records):.0f} min of training and evaluation summed over the runs). Rules: "
        f"STABILITY_PROTOCOL_5.md, fixed before these runs. Floor rule: the shipped monitor's warning "
        f"(`logps/chosen` below {DOUBLING:g} × its highest and at least {FLOOR:g} nat below it, mean score drift "
        f"above {DRIFT:g}); doubling rule: the same without the nat, replayed from the logged history. "
        f"`tpo_anchor`: `pref_ftx: 1`. Collapsed: object recall below {stability.COLLAPSE_FRACTION:g} × the "
        f"world's SFT recall; degraded: below {stability_heldout.DEGRADED_FRACTION:g} ×.",
        "## Runs\n\n" + runs_table(by_key, watched, rules),
        "## Verdicts\n\n" + verdicts(by_key, watched, worlds),
    ]
    path.write_text("\n\n".join(sections) + "\n")


def verdicts(by_key: dict, watched: list[dict], worlds: list[tuple[str, int]]) -> str:
    """STABILITY_PROTOCOL_5.md's verdicts 2–5."""
    counts, lines = rule_verdicts(
        by_key, watched, "replayed_floor", {"logged": "Floor rule", "doubling": "Doubling rule"}
    )
    (floor_timely, floor_alarms), (doubling_timely, doubling_alarms) = counts["logged"], counts["doubling"]
    kept = len(floor_alarms) < len(doubling_alarms) and all(r in floor_timely for r in doubling_timely)
    lines.append(
        f"- **The floor is kept** (fewer false alarms, and in time for every collapse the doubling rule was): "
        f"{_yes(kept)}."
    )
    lines.append(guard_verdict(by_key, worlds))
    return "\n".join(lines)


def keyed_records(records: list[dict], worlds: list[tuple[str, int]], rates: dict) -> tuple[dict, list[dict]]:
    """The records by (kind, seed, variant, learning rate), and the watched TPO runs in the report's order."""
    by_key = {(r["world_kind"], r["world_seed"], r["variant"], r["learning_rate"]): r for r in records}
    watched = [
        by_key[kind, seed, method, lr]
        for kind, seed in worlds
        for lr in rates[kind]
        for method in ("tpo", "tpo_anchor")
    ]
    return by_key, watched


def below(by_key: dict, r: dict, fraction: float) -> bool:
    """The run's object recall is below ``fraction`` × its world's SFT recall."""
    return r["recall"] < fraction * by_key[r["world_kind"], r["world_seed"], "sft", 0.0]["recall"]


def runs_table(by_key: dict, watched: list[dict], rules: dict[str, str]) -> str:
    """One row per watched run: recall, collapsed, degraded, and each rule's warning (``rules``: key to label)."""
    lines = [
        "| world | lr | method | recall (SFT) | collapsed | degraded | "
        + "".join(f"{label}: step, recall then | " for label in rules.values())
        + f"dpo at {LARGEST_RATE:g}: recall |",
        "|---|---|---|---|---|---|" + "---|" * len(rules) + "---|",
    ]
    for r in watched:
        world = (r["world_kind"], r["world_seed"])
        sft, dpo = by_key[(*world, "sft", 0.0)], by_key[(*world, "dpo", LARGEST_RATE)]
        cells = "".join(f"{_warning(*r['warnings'][rule])} | " for rule in rules)
        lines.append(
            f"| {world[0]}-{world[1]} | {r['learning_rate']:g} | {r['variant']} | {r['recall']:.2f} "
            f"({sft['recall']:.2f}) | {_yes(below(by_key, r, stability.COLLAPSE_FRACTION))} | "
            f"{_yes(below(by_key, r, stability_heldout.DEGRADED_FRACTION))} | {cells}{dpo['recall']:.2f} |"
        )
    return "\n".join(lines)


def rule_verdicts(
    by_key: dict, watched: list[dict], replayed: str, names: dict[str, str]
) -> tuple[dict[str, tuple[list, list]], list[str]]:
    """Whether the runner's replay of the shipped rule (record key ``replayed``) names the step the monitor logged,
    then :func:`rule_verdict` for each rule (``names``: its key in the records' warnings, the shipped one first,
    to its name)."""
    consistent = [r for r in watched if r[replayed] == r["warnings"]["logged"][0]]
    lines = [
        f"- **Consistency**: the replayed {names['logged'].lower()} names the monitor's logged step in "
        f"{len(consistent)} of {len(watched)} TPO runs: {_yes(len(consistent) == len(watched))}."
    ]
    counts = {}
    for rule, name in names.items():
        counts[rule], line = rule_verdict(by_key, watched, rule, name)
        lines.append(line)
    return counts, lines


def rule_verdict(by_key: dict, watched: list[dict], rule: str, name: str) -> tuple[tuple[list, list], str]:
    """A rule's collapsed runs warned in time (recall then at least the collapse line) and its false alarms
    (warned, not degraded), with the verdict's line: warns before collapse, false alarms, missed."""
    collapsed = [r for r in watched if below(by_key, r, stability.COLLAPSE_FRACTION)]
    degraded = [r for r in watched if below(by_key, r, stability_heldout.DEGRADED_FRACTION)]

    def in_time(r: dict) -> bool:
        held = r["warnings"][rule][1]
        return (
            held is not None
            and held >= stability.COLLAPSE_FRACTION * by_key[r["world_kind"], r["world_seed"], "sft", 0.0]["recall"]
        )

    timely = [r for r in collapsed if in_time(r)]
    alarms = [r for r in watched if r["warnings"][rule][0] is not None and r not in degraded]
    missed = [r for r in degraded if r["warnings"][rule][0] is None]
    monitor = "not tested (no TPO run collapsed)" if not collapsed else _yes(len(timely) == len(collapsed))
    line = (
        f"- **{name}**: warns before collapse {monitor} ({len(timely)} of {len(collapsed)}); false alarms "
        f"{len(alarms)} of {len(watched)}; missed {len(missed)} of {len(degraded)} degraded runs."
    )
    return (timely, alarms), line


def guard_verdict(by_key: dict, worlds: list[tuple[str, int]]) -> str:
    """In each world where ``tpo`` collapsed at the largest rate, did ``tpo_anchor``; and did ``dpo``."""

    def collapsed(world: tuple[str, int], method: str) -> bool:
        return below(by_key, by_key[(*world, method, LARGEST_RATE)], stability.COLLAPSE_FRACTION)

    fell = [world for world in worlds if collapsed(world, "tpo")]
    still = [world for world in fell if collapsed(world, "tpo_anchor")]
    own = [world for world in fell if not collapsed(world, "dpo")]
    guard = "not tested (`tpo` collapsed in no world)" if not fell else _yes(not still)
    return (
        f"- **Guard prevents collapse** (lr {LARGEST_RATE:g}): {guard} — `tpo` collapsed in "
        f"{_names(fell) or 'no world'}; `tpo_anchor` did too in {len(still)} of them. **TPO's own collapses** "
        f"(`dpo` held): {len(own)} ({_names(own) or 'none'})."
    )


def _warning(step: int | None, recall: float | None) -> str:
    return "—" if step is None else f"{step}, {recall:.2f}"


def _names(worlds: list[tuple[str, int]]) -> str:
    return ", ".join(f"{kind}-{seed}" for kind, seed in worlds)


def _yes(value: bool) -> str:
    return "yes" if value else "no"


if __name__ == "__main__":
    sys.exit(main())
