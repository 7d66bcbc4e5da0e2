"""What the stability checks share, defined once: reading a run's training log and checkpoints, the machine, the
report's small formats and the verdicts two checks ask alike. Every threshold comes from the calling check's
own protocol file; nothing here is a check's constant."""

from __future__ import annotations

import json
import platform
import re
import shutil
from pathlib import Path

from .. import evaluate, run
from ..run import Job


WARNING = re.compile(r"Stage tpo, step (\d+): the chosen answers' mean log-probability fell")


def yes(value: bool) -> str:
    return "yes" if value else "no"


def names(worlds: list[tuple]) -> str:
    """``pixel-3, word-4 tpo``: worlds (kind, seed), each with an optional method."""
    return ", ".join(f"{kind}-{seed}" + (f" {rest[0]}" if rest else "") for kind, seed, *rest in worlds)


def signed(value: float) -> str:
    return "n/a" if value != value else f"{value:+.3f}"  # nan: no recall level in the common range


def fraction(part: float, whole: float) -> str:
    return "n/a" if part != part or whole != whole or whole == 0 else f"{part / whole:.2f} of it"


def with_history(record: dict) -> dict:
    """The run's record with its logged training metrics per step (``trainer_state.json``)."""
    state = json.loads((Path(record["run_dir"]) / "trainer_state.json").read_text())
    return {**record, "history": [entry for entry in state["log_history"] if "loss" in entry]}


def mean_drift(entry: dict) -> float:
    return (entry["tpo/score_drift_chosen"] + entry["tpo/score_drift_rejected"]) / 2


def first_step_below(history: list[dict], fraction: float) -> int | None:
    """The first logged step at which the chosen answers' mean log-probability is below ``fraction`` times its
    first logged value (log-probabilities are negative: 2.0 means the chosen answers' NLL doubled)."""
    first = history[0]["logps/chosen"]
    return next((entry["step"] for entry in history if entry["logps/chosen"] < fraction * first), None)


def logged_warning_step(train_log: Path) -> int | None:
    """The step the shipped monitor named in its warning, read from the run's log; None if it did not warn."""
    found = WARNING.search(train_log.read_text())
    return int(found.group(1)) if found else None


def checkpoint_recalls(job: Job, steps: list[int | None], eval_batch_size: int) -> dict:
    """Object recall of the run's checkpoint at each step (None for a step that is None); deletes the others."""
    recalls = {}
    for step in set(steps) - {None}:
        metrics = evaluate.evaluate_model(job.run_dir / f"checkpoint-{step}", job.world_dir, eval_batch_size)
        recalls[step] = metrics["metrics"]["recall"]
    for checkpoint in job.run_dir.glob("checkpoint-*"):
        if checkpoint.name not in {f"checkpoint-{step}" for step in recalls}:
            shutil.rmtree(checkpoint)
    return {step: recalls.get(step) for step in steps}


def watched_run(job: Job, protocol) -> dict:
    """Train and evaluate (``run.run_job``), then evaluate the checkpoint of the step the shipped monitor warned at
    and keep only it (a run that saves no checkpoints: no recall); both kept in ``warning.json``."""
    record = with_history(run.run_job(job, protocol))
    extra = job.run_dir / "warning.json"
    if not extra.exists():
        step, recall = logged_warning_step(job.run_dir / "train.log"), None
        if job.recipe.get("save_strategy") == "steps":
            recall = checkpoint_recalls(job, [step], protocol.eval_batch_size)[step]
        extra.write_text(json.dumps({"warning_step": step, "recall_at_warning": recall}))
    return {**record, **json.loads(extra.read_text())}


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


def write_keeping_section(path: Path, sections: list[str], heading: str | None = None) -> None:
    """Write the report's sections; an earlier report's hand-written part, from ``heading`` on, is kept."""
    earlier = path.read_text() if heading and path.exists() else ""
    kept = earlier[earlier.index(heading) :].rstrip("\n") if heading and heading in earlier else None
    path.write_text("\n\n".join(sections + ([kept] if kept else [])) + "\n")


def sft_recall(by_key: dict, kind: str, seed: int) -> float:
    return by_key[kind, seed, "sft", 0.0]["recall"]


def below(by_key: dict, r: dict, fraction: float) -> bool:
    """The run's object recall is below ``fraction`` × its world's SFT recall."""
    return r["recall"] < fraction * sft_recall(by_key, r["world_kind"], r["world_seed"])


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


def warning(step: int | None, recall: float | None) -> str:
    return "—" if step is None else f"{step}, {recall:.2f}"


def runs_table(by_key: dict, watched: list[dict], rules: dict[str, str], constants: dict) -> str:
    """One row per watched run: recall, collapsed, degraded, and each rule's warning (``rules``: key to label)."""
    largest, collapse, degraded = (
        constants["largest_rate"],
        constants["collapse_fraction"],
        constants["degraded_fraction"],
    )
    lines = [
        "| world | lr | method | recall (SFT) | collapsed | degraded | "
        + "".join(f"{label}: step, recall then | " for label in rules.values())
        + f"dpo at {largest:g}: recall |",
        "|---|---|---|---|---|---|" + "---|" * len(rules) + "---|",
    ]
    for r in watched:
        world = (r["world_kind"], r["world_seed"])
        sft, dpo = by_key[(*world, "sft", 0.0)], by_key[(*world, "dpo", largest)]
        cells = "".join(f"{warning(*r['warnings'][rule])} | " for rule in rules)
        lines.append(
            f"| {world[0]}-{world[1]} | {r['learning_rate']:g} | {r['variant']} | {r['recall']:.2f} "
            f"({sft['recall']:.2f}) | {yes(below(by_key, r, collapse))} | "
            f"{yes(below(by_key, r, degraded))} | {cells}{dpo['recall']:.2f} |"
        )
    return "\n".join(lines)


def rule_verdicts(
    by_key: dict, watched: list[dict], replayed: str, rule_names: dict[str, str], constants: dict
) -> tuple[dict[str, tuple[list, list]], list[str]]:
    """Whether the runner's replay of the shipped rule (record key ``replayed``) names the step the monitor logged,
    then :func:`rule_verdict` for each rule (``rule_names``: its key in the records' warnings, the shipped one
    first, to its name)."""
    consistent = [r for r in watched if r[replayed] == r["warnings"]["logged"][0]]
    lines = [
        f"- **Consistency**: the replayed {rule_names['logged'].lower()} names the monitor's logged step in "
        f"{len(consistent)} of {len(watched)} TPO runs: {yes(len(consistent) == len(watched))}."
    ]
    counts = {}
    for rule, name in rule_names.items():
        counts[rule], line = rule_verdict(by_key, watched, rule, name, constants)
        lines.append(line)
    return counts, lines


def rule_verdict(
    by_key: dict, watched: list[dict], rule: str, name: str, constants: dict
) -> tuple[tuple[list, list], str]:
    """A rule's collapsed runs warned in time (recall then at least the collapse line) and its false alarms
    (warned, not degraded), with the verdict's line: warns before collapse, false alarms, missed."""
    collapse = constants["collapse_fraction"]
    collapsed = [r for r in watched if below(by_key, r, collapse)]
    degraded = [r for r in watched if below(by_key, r, constants["degraded_fraction"])]

    def in_time(r: dict) -> bool:
        held = r["warnings"][rule][1]
        return held is not None and held >= collapse * sft_recall(by_key, r["world_kind"], r["world_seed"])

    timely = [r for r in collapsed if in_time(r)]
    alarms = [r for r in watched if r["warnings"][rule][0] is not None and r not in degraded]
    missed = [r for r in degraded if r["warnings"][rule][0] is None]
    monitor = "not tested (no TPO run collapsed)" if not collapsed else yes(len(timely) == len(collapsed))
    line = (
        f"- **{name}**: warns before collapse {monitor} ({len(timely)} of {len(collapsed)}); false alarms "
        f"{len(alarms)} of {len(watched)}; missed {len(missed)} of {len(degraded)} degraded runs."
    )
    return (timely, alarms), line


def guard_verdict(by_key: dict, worlds: list[tuple[str, int]], constants: dict) -> str:
    """In each world where ``tpo`` collapsed at the largest rate, did ``tpo_anchor``; and did ``dpo``."""
    largest = constants["largest_rate"]

    def collapsed(world: tuple[str, int], method: str) -> bool:
        return below(by_key, by_key[(*world, method, largest)], constants["collapse_fraction"])

    fell = [world for world in worlds if collapsed(world, "tpo")]
    still = [world for world in fell if collapsed(world, "tpo_anchor")]
    own = [world for world in fell if not collapsed(world, "dpo")]
    guard = "not tested (`tpo` collapsed in no world)" if not fell else yes(not still)
    return (
        f"- **Guard prevents collapse** (lr {largest:g}): {guard} — `tpo` collapsed in "
        f"{names(fell) or 'no world'}; `tpo_anchor` did too in {len(still)} of them. **TPO's own collapses** "
        f"(`dpo` held): {len(own)} ({names(own) or 'none'})."
    )
