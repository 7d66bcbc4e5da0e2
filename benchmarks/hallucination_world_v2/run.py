"""The one runner of the controlled-world (v2) experiments: each check's protocol is a frozen file,
``checks/<CHECK>.json``, and this command runs it.

    python -m benchmarks.hallucination_world_v2.run [CHECK] [--out DIR] [--jobs 2] [--results PATH]

CHECK: ``v2`` (the default: Evidence v2, below), ``quick`` (the same on tiny worlds, 2 steps; also ``--quick``),
``pilot`` (the SFT + DPO pilots that chose v2's learning rates; prints its table), the stability checks
``stability``, ``heldout``, ``anchor``, ``gain``, ``floor``, ``window`` (each writes its STABILITY report),
``grounding`` (mDPO's terms along v2's frontier; writes GROUNDING.md), and
``trajectory --kind K --seed S --lr LR [--methods dpo,tpo] [--append FILE]`` (a diagnosis: recall step by step).
Every check runs the same way: its base protocol (worlds, SFT, base methods at their learning rates, as Evidence
v2 below), then its own jobs (``checks.check_jobs``), ``--jobs`` at a time, then its report
(``checks/<CHECK>.py``).

Evidence v2: both kinds of world, SFT, DPO and three TPO variants along a learning-rate sweep, evaluation (v1's
metrics and KL to SFT), per-token views from ``tpo-plugin inspect``, and ``RESULTS_v2.md``.

For every world kind and world seed: draw the world, build the random tiny Qwen2-VL, train it with ``stage: sft``;
then, from that checkpoint, every method at every learning rate of its world kind; evaluate every model on the
world's test set and its KL to the SFT model on held-out chosen captions; run ``tpo-plugin inspect`` on every
method's model at the view learning rate (first world seed), the SFT model as reference. Every stage is a
``llamafactory-cli train`` on a recipe written into its run folder. A run whose ``metrics.json`` exists (a view
whose ``tokens.jsonl`` exists) is reused, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import yaml


if __package__ in (None, ""):  # run as a script: make the repository importable as the package's root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.hallucination_world import train  # noqa: E402
from benchmarks.hallucination_world.run import _train_summary  # noqa: E402
from benchmarks.hallucination_world_v2 import evaluate, model, report, world  # noqa: E402
from benchmarks.hallucination_world_v2.protocol import TPO_DEFAULTS, Protocol  # noqa: E402


HERE = Path(__file__).resolve().parent
VIEW_DIR = "views"


@dataclasses.dataclass(frozen=True)
class Job:
    """One training run: its recipe, where it goes, the world it is evaluated on, and its record's settings."""

    recipe: dict
    run_dir: Path
    world_dir: Path
    sft_dir: Path
    record: dict


def main(argv: list[str] | None = None) -> int:
    from benchmarks.hallucination_world_v2 import checks

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("check", nargs="?", default="v2", choices=checks.names(), help="which check (default: v2)")
    parser.add_argument("--quick", action="store_true", help="the check 'quick': tiny worlds, 2 steps")
    parser.add_argument("--out", type=Path, help="run folder (default: the check's, next to run.py)")
    parser.add_argument("--results", type=Path, help="report path (default: the check's; quick: in --out)")
    parser.add_argument("--jobs", type=int, default=2, help="runs trained side by side, one thread each (default: 2)")
    trajectory = parser.add_argument_group("trajectory")
    trajectory.add_argument("--kind", help="world kind")
    trajectory.add_argument("--seed", type=int, help="world seed")
    trajectory.add_argument("--lr", type=float, help="learning rate")
    trajectory.add_argument("--methods", default="dpo,tpo", help="comma-separated (default: dpo,tpo)")
    trajectory.add_argument("--append", type=Path, help="also append the tables to this markdown file")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    name = "quick" if args.quick else args.check
    check = checks.load(name)
    out = (args.out or HERE / check.out).resolve()
    results = args.results or (out / "RESULTS_v2.md" if name == "quick" else check.results and HERE / check.results)
    torch.set_num_threads(1)  # evaluation in this process: one thread per lane, as the training runs (train.py)
    os.environ.update(train.OFFLINE_ENV)  # for the in-process ``tpo-plugin inspect``, as for the training runs
    start = time.perf_counter()
    if name in ("v2", "quick"):
        runs = run_protocol(check.protocol, out, args.jobs)
        views = run_views(check.protocol, out)
        mode = "quick" if name == "quick" else "full"
        report.write_results(check.protocol, runs, views, out, results, mode, time.perf_counter() - start, args.jobs)
        print(f"[evidence-v2] {len(runs)} runs in {time.perf_counter() - start:.0f} s; report: {results}")
    elif name == "pilot":
        runs = run_protocol(check.protocol, out, args.jobs)
        print(pilot_table(runs))
        print(f"[evidence-v2 pilot] {len(runs)} runs, {time.perf_counter() - start:.0f} s")
    elif name == "trajectory":
        from benchmarks.hallucination_world_v2.checks import trajectory as module

        if args.kind not in check.protocol.world_kinds or args.seed is None or args.lr is None:
            parser.error(f"trajectory needs --kind ({', '.join(check.protocol.world_kinds)}), --seed and --lr")
        methods = [method.strip() for method in args.methods.split(",") if method.strip()]
        unknown = [method for method in methods if method not in module.TRAJECTORY_METHODS]
        if unknown:
            parser.error(f"--methods: unknown {unknown}; allowed: {', '.join(module.TRAJECTORY_METHODS)}")
        print(module.run_trajectory(out, args.kind, args.seed, args.lr, methods, args.jobs, args.append))
    else:
        runs = run_check(check, out, results, args.jobs)
        print(f"[{name}] {len(runs)} runs in {time.perf_counter() - start:.0f} s; report: {results}")
    return 0


def run_check(check, out: Path, results: Path, jobs: int) -> list[dict]:
    """A check's base protocol, then its own jobs (``jobs`` at a time), then its report; every record."""
    from benchmarks.hallucination_world_v2 import checks

    module = importlib.import_module(f"benchmarks.hallucination_world_v2.checks.{check.name}")
    start = time.perf_counter()
    base_runs = run_protocol(check.protocol, out, jobs)  # worlds, SFT and the base methods, reused where finished
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        runs = list(pool.map(module.run_one, checks.check_jobs(check, out)))
    module.report_check(base_runs, runs, results, time.perf_counter() - start, jobs)
    return base_runs + runs


PILOT_COLUMNS = (
    "prior_hallucination",
    "recall",
    "partner_recall",
    "partner_recall_alone",
    "chair_i",
    "pope_accuracy",
    "pope_partner_yes_on_trigger_only",
    "kl_to_sft",
    "train_seconds",
    "eval_seconds",
)


def pilot_table(runs: list[dict]) -> str:
    """The pilot's runs, one row each (PROTOCOL_v2.md records what it printed)."""
    lines = [
        "| world | method | lr | " + " | ".join(PILOT_COLUMNS) + " |",
        "|---|---|---|" + "---|" * len(PILOT_COLUMNS),
    ]
    for run in sorted(runs, key=lambda run: (run["world_kind"], run["learning_rate"])):
        cells = [f"{run[key]:.3f}" if "seconds" not in key else f"{run[key]:.0f}" for key in PILOT_COLUMNS]
        lines.append(
            f"| {run['world_kind']} | {run['variant']} | {run['learning_rate']:g} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def world_dir(out: Path, kind: str, seed: int) -> Path:
    return out / f"{kind}-{seed}"


def protocol_plan(protocol: Protocol, out: Path) -> tuple[list[world.WorldSpec], list[Job], list[Job]]:
    """What ``run_protocol`` launches, built without side effects: the worlds, the SFT jobs, the preference jobs."""
    worlds = [(kind, seed) for seed in protocol.world_seeds for kind in protocol.world_kinds]
    specs = [
        world.WorldSpec(kind, dataclasses.replace(protocol.world, seed=seed), protocol.num_heldout)
        for kind, seed in worlds
    ]
    sft_jobs = [sft_job(protocol, world_dir(out, kind, seed), kind, seed) for kind, seed in worlds]
    preference = [
        job for kind, seed in worlds for job in preference_jobs(protocol, world_dir(out, kind, seed), kind, seed)
    ]
    return specs, sft_jobs, preference


def run_protocol(protocol: Protocol, out: Path, jobs: int) -> list[dict]:
    """Draw the worlds, train and evaluate every run; one record per run (settings, metrics, timings).

    All SFT runs first, then all preference runs, each phase ``jobs`` runs at a time (one thread each).
    """
    out.mkdir(parents=True, exist_ok=True)
    (out / "protocol.json").write_text(json.dumps(protocol.as_dict(), indent=1))
    specs, sft_jobs, preference = protocol_plan(protocol, out)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(lambda spec: world.build_world(spec, world_dir(out, spec.kind, spec.config.seed)), specs))
        for job in sft_jobs:  # each world's random initial model
            model.build_world_model(job.world_dir / "init", seed=protocol.train_seed)
        runs = list(pool.map(lambda job: run_job(job, protocol), sft_jobs))
        runs += list(pool.map(lambda job: run_job(job, protocol), preference))
    return runs


def sft_job(protocol: Protocol, directory: Path, kind: str, seed: int) -> Job:
    """SFT of a fresh random model (init seed = training seed, built by ``run_protocol``) on the world's SFT set
    (v1's recipe)."""
    init_dir = directory / "init"
    recipe = train.sft_recipe(init_dir, directory, directory / "sft", protocol.train_seed, protocol.sft)
    record = {"world_kind": kind, "world_seed": seed, "variant": "sft", "learning_rate": 0.0}
    return Job(recipe, directory / "sft", directory, directory / "sft", record)


def preference_jobs(protocol: Protocol, directory: Path, kind: str, seed: int) -> list[Job]:
    """Every method at every learning rate of the world's kind, from the world's SFT model (v1's recipe)."""
    return [
        preference_job(protocol, directory, kind, seed, method, protocol.settings(method), lr)
        for lr in protocol.learning_rates[kind]
        for method in protocol.methods
    ]


def preference_job(
    protocol: Protocol,
    directory: Path,
    kind: str,
    seed: int,
    method: str,
    settings: dict,
    lr: float,
    run_dir: Path | None = None,
) -> Job:
    """One preference run of ``settings`` (a stage and its ``tpo_*`` keys) from the world's SFT model, v1's
    recipe; ``method`` names its record and, unless ``run_dir`` is given, its folder."""
    run_dir = run_dir or directory / f"{method}-lr{lr:g}"
    recipe = train.preference_recipe(
        directory / "sft",
        directory,
        run_dir,
        protocol.train_seed,
        protocol.preference,
        settings["stage"],
        lr,
        settings["tpo_keys"],
    )
    record = {"world_kind": kind, "world_seed": seed, "variant": method, "learning_rate": lr}
    return Job(recipe, run_dir, directory, directory / "sft", record)


def run_job(job: Job, protocol: Protocol) -> dict:
    """Train (unless done) and evaluate one run; its record is saved as ``metrics.json`` in the run folder."""
    done = job.run_dir / "metrics.json"
    if done.exists():
        return json.loads(done.read_text())
    print(f"[evidence-v2] {job.run_dir.parent.name}/{job.run_dir.name}: training", flush=True)
    train_seconds, train_cpu_seconds = train_timed(job.recipe, job.run_dir / "recipe.yaml", job.run_dir / "train.log")
    start, start_cpu = time.perf_counter(), time.thread_time()
    result = evaluate.evaluate_model(job.run_dir, job.world_dir, protocol.eval_batch_size)
    kl = evaluate.heldout_kl(job.run_dir, job.sft_dir, job.world_dir, protocol.eval_batch_size)
    (job.run_dir / "captions.json").write_text(json.dumps(result["details"], indent=1))
    record = {
        **job.record,
        "run_dir": str(job.run_dir),
        "train_seconds": train_seconds,
        "train_cpu_seconds": train_cpu_seconds,
        "eval_seconds": time.perf_counter() - start,
        "eval_cpu_seconds": time.thread_time() - start_cpu,  # this thread's: evaluation runs on one thread
        "train_log": _train_summary(job.run_dir),
        **result["metrics"],
        "kl_to_sft": kl,
    }
    done.write_text(json.dumps(record, indent=1))
    return record


def train_timed(recipe: dict, recipe_path: Path, log_path: Path) -> tuple[float, float]:
    """v1's ``train.train`` (recipe written, ``llamafactory-cli train``, a failure raised with the log's tail),
    returning the wall time and the CPU time of the run.

    The CPU time (user + system, from ``wait4``) is what a run costs on a core of its own: the pilots ran on
    cores shared with other work, so their wall times alone could not size the protocol (PROTOCOL_v2.md).
    """
    recipe_path.parent.mkdir(parents=True, exist_ok=True)
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    command = [sys.executable, "-m", "llamafactory.cli", "train", str(recipe_path)]
    start = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command, env={**os.environ, **train.OFFLINE_ENV}, stdout=log, stderr=subprocess.STDOUT
        )
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
    elapsed = time.perf_counter() - start
    if process.returncode != 0:
        tail = log_path.read_text()[-4000:]
        raise RuntimeError(f"{' '.join(command)} failed (exit code {process.returncode}); log {log_path}:\n{tail}")
    return elapsed, usage.ru_utime + usage.ru_stime


def view_recipe(run_dir: Path, sft_dir: Path, output_dir: Path, method: str, protocol: Protocol) -> dict:
    """A ``stage: tpo`` recipe for ``tpo-plugin inspect``: the trained model as policy, the SFT model as reference.

    Built from the run's own recipe, on the world's held-out trigger pairs (``world_view``); a DPO model is
    viewed with the TPO defaults (the weights TPO would give its tokens).
    """
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    recipe.update(
        stage="tpo",
        model_name_or_path=str(run_dir),
        ref_model=str(sft_dir),
        dataset="world_view",
        output_dir=str(output_dir),
        **(protocol.settings(method)["tpo_keys"] or TPO_DEFAULTS),
    )
    return recipe


def run_views(protocol: Protocol, out: Path) -> dict:
    """``tpo-plugin inspect`` on each method's model at the view learning rate, per world kind (first world seed).

    Returns ``{kind: {method: [token views]}}``: per pair and side the policy's (after training) and the
    reference's (SFT, before) tokens, visual scores, weights and log-probabilities.
    """
    seed = protocol.world_seeds[0]
    views: dict = {}
    for kind in protocol.world_kinds:
        directory = world_dir(out, kind, seed)
        lr = protocol.view_learning_rates[kind]
        for method in protocol.methods:
            output_dir = directory / VIEW_DIR / method
            tokens = inspect_view(directory / f"{method}-lr{lr:g}", output_dir, method, protocol)
            views.setdefault(kind, {})[method] = [json.loads(line) for line in tokens.read_text().splitlines()]
    return views


def inspect_view(run_dir: Path, output_dir: Path, method: str, protocol: Protocol) -> Path:
    """Run ``tpo-plugin inspect`` (unless its ``tokens.jsonl`` exists); return the path of ``tokens.jsonl``.

    The command runs in this process (its output goes to ``inspect.log``): one start-up of LLaMA-Factory for
    all views instead of one per view.
    """
    from tpo_plugin.commands import inspect as inspect_command

    tokens = output_dir / inspect_command.TOKENS_FILE
    if tokens.exists():
        return tokens
    output_dir.mkdir(parents=True, exist_ok=True)
    recipe_path = output_dir / "inspect.yaml"
    recipe = view_recipe(run_dir, run_dir.parent / "sft", output_dir, method, protocol)
    recipe_path.write_text(yaml.safe_dump(recipe))
    argv = [str(recipe_path), "--output-dir", str(output_dir), "--num-pairs", str(protocol.view_pairs), "--overwrite"]
    parser = argparse.ArgumentParser(prog="tpo-plugin inspect")
    inspect_command.add_arguments(parser)
    log_path = output_dir / "inspect.log"
    with open(log_path, "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        code = inspect_command.run(parser.parse_args(argv))
    if code != 0:
        raise RuntimeError(
            f"tpo-plugin inspect {' '.join(argv)} failed (exit code {code}):\n{log_path.read_text()[-4000:]}"
        )
    return tokens


if __name__ == "__main__":
    sys.exit(main())
