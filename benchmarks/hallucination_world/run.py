"""One command for the whole hallucination-world experiment: worlds, SFT, DPO, TPO, ablations, evaluation, report.

    python -m benchmarks.hallucination_world.run [--quick] [--out DIR]

For every world seed: build the world (images, SFT set, pairs, test set); for every training seed: build the
random tiny Qwen2-VL, train it with ``stage: sft``, then from that checkpoint ``stage: dpo`` and ``stage: tpo``
at every learning rate, and the TPO ablations; evaluate every model on the world's test set; finally write
``RESULTS.md`` with the tables, the trade-off plot and the per-token view. Every stage is ``llamafactory-cli
train`` on a recipe written into its run folder. A run whose ``metrics.json`` exists is not repeated, so an
interrupted experiment resumes where it stopped (delete the folder to start over).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch


if __package__ in (None, ""):  # run as a script: make the repository importable as the package's root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.hallucination_world import evaluate, model, report, token_view, train, world  # noqa: E402
from benchmarks.hallucination_world.protocol import FULL, QUICK, TPO_DEFAULTS, Protocol  # noqa: E402


DEFAULT_OUT = Path(__file__).resolve().parent / "runs"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny world, few steps: checks every stage and metric")
    parser.add_argument("--out", type=Path, help=f"run folder (default: {DEFAULT_OUT}[_quick])")
    parser.add_argument("--results", type=Path, help="where RESULTS.md goes (default: next to run.py; --quick: --out)")
    parser.add_argument("--jobs", type=int, default=2, help="runs trained side by side, one thread each (default: 2)")
    args = parser.parse_args(argv)

    protocol = QUICK if args.quick else FULL
    out = (args.out or Path(f"{DEFAULT_OUT}{'_quick' if args.quick else ''}")).resolve()
    results_path = args.results or (
        out / "RESULTS.md" if args.quick else Path(__file__).resolve().parent / "RESULTS.md"
    )
    torch.set_num_threads(1)  # evaluation in this process: one thread, as the training runs (train.py)
    start = time.perf_counter()
    runs = run_protocol(protocol, out, args.jobs)
    views = per_token_views(protocol, out)
    (out / "token_view.json").write_text(json.dumps(views, indent=1))
    mode = "quick" if args.quick else "full"
    report.write_results(protocol, runs, views, out, results_path, mode, time.perf_counter() - start, args.jobs)
    print(f"[hallucination-world] {len(runs)} runs in {time.perf_counter() - start:.0f} s; report: {results_path}")
    return 0


def run_protocol(protocol: Protocol, out: Path, parallel: int = 2) -> list[dict]:
    """Train and evaluate every run of the protocol; return one record per run (settings, metrics, timings).

    Per world: the SFT runs of all training seeds, then all preference runs from those checkpoints. Runs of
    one phase are independent, so up to ``parallel`` of them train (one thread each) and evaluate at once.
    """
    out.mkdir(parents=True, exist_ok=True)
    (out / "protocol.json").write_text(json.dumps(protocol.as_dict(), indent=1))
    runs = []
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        for world_seed in protocol.world_seeds:
            world_dir = out / f"world-{world_seed}"
            world.build_world(dataclasses.replace(protocol.world, seed=world_seed), world_dir)
            sft_jobs = [_sft_job(protocol, world_dir, world_seed, seed) for seed in protocol.train_seeds]
            runs += pool.map(lambda job: _run(*job), sft_jobs)
            preference_jobs = [
                job for seed in protocol.train_seeds for job in _preference_jobs(protocol, world_dir, world_seed, seed)
            ]
            runs += pool.map(lambda job: _run(*job), preference_jobs)
    return runs


def _sft_job(protocol: Protocol, world_dir: Path, world_seed: int, train_seed: int) -> tuple:
    """SFT of a fresh random model (init seed = training seed) on the world's SFT set."""
    seed_dir = world_dir / f"train-{train_seed}"
    init_dir = model.build_world_model(seed_dir / "init", seed=train_seed)
    recipe = train.sft_recipe(init_dir, world_dir, seed_dir / "sft", train_seed, protocol.sft)
    record = {"world_seed": world_seed, "train_seed": train_seed, "method": "sft", "learning_rate": None}
    return recipe, seed_dir / "sft", world_dir, {**record, "variant": "sft"}, protocol


def _preference_jobs(protocol: Protocol, world_dir: Path, world_seed: int, train_seed: int) -> list[tuple]:
    """DPO and TPO at every learning rate, and (first training seed only) the TPO ablations, from one SFT model."""
    seed_dir = world_dir / f"train-{train_seed}"
    settings = [(method, lr, {}) for lr in protocol.learning_rates for method in ("dpo", "tpo")]
    if train_seed == protocol.train_seeds[0]:
        settings += [("tpo", protocol.learning_rates[0], {key: value}) for key, value in protocol.ablations]
    jobs = []
    for method, lr, change in settings:
        variant = method if not change else "tpo " + " ".join(f"{k}={v}" for k, v in change.items())
        run_dir = seed_dir / (
            f"{method}-lr{lr:g}" + "".join(f"-{k.removeprefix('tpo_')}-{v}" for k, v in change.items())
        )
        recipe = train.preference_recipe(
            seed_dir / "sft",
            world_dir,
            run_dir,
            train_seed,
            protocol.preference,
            method,
            lr,
            {**TPO_DEFAULTS, **change},
        )
        record = {"world_seed": world_seed, "train_seed": train_seed, "method": method, "learning_rate": lr}
        jobs.append((recipe, run_dir, world_dir, {**record, "variant": variant}, protocol))
    return jobs


def _run(recipe: dict, run_dir: Path, world_dir: Path, record: dict, protocol: Protocol) -> dict:
    """Train (unless done) and evaluate one run; its record is saved as ``metrics.json`` in the run folder."""
    done = run_dir / "metrics.json"
    if done.exists():
        return json.loads(done.read_text())
    print(f"[hallucination-world] {run_dir.relative_to(run_dir.parents[2])}: training", flush=True)
    train_seconds = train.train(recipe, run_dir / "recipe.yaml", run_dir / "train.log")
    start = time.perf_counter()
    result = evaluate.evaluate_model(run_dir, world_dir, protocol.eval_batch_size)
    (run_dir / "captions.json").write_text(json.dumps(result["details"], indent=1))
    record = {
        **record,
        "run_dir": str(run_dir),
        "train_seconds": train_seconds,
        "eval_seconds": time.perf_counter() - start,
        "train_log": _train_summary(run_dir),
        **result["metrics"],
    }
    done.write_text(json.dumps(record, indent=1))
    return record


def _train_summary(run_dir: Path) -> dict:
    """The last logged training step (loss, rewards, TPO scores and weights) and ``train_loss``."""
    state = json.loads((run_dir / "trainer_state.json").read_text())
    steps = [entry for entry in state["log_history"] if "loss" in entry]
    results = json.loads((run_dir / "all_results.json").read_text())
    return {**(steps[-1] if steps else {}), "train_loss": results.get("train_loss")}


def per_token_views(protocol: Protocol, out: Path) -> dict[str, list[dict]]:
    """Token scores and weights on a few pairs of the first world, by the SFT model and the default TPO model."""
    world_seed, train_seed, lr = protocol.world_seeds[0], protocol.train_seeds[0], protocol.learning_rates[0]
    seed_dir = out / f"world-{world_seed}" / f"train-{train_seed}"
    views = {}
    for label, run_dir in (
        ("SFT (the reference model)", seed_dir / "sft"),
        (f"TPO lr {lr:g}", seed_dir / f"tpo-lr{lr:g}"),
    ):
        views[label] = token_view.token_view(
            run_dir, out / f"world-{world_seed}", protocol.token_view_pairs, seed=train_seed
        )
    return views


if __name__ == "__main__":
    sys.exit(main())
