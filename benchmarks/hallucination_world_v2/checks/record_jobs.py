"""Record every job each v2 runner launches, with the runners as they stood before the one-runner refactor (#35).

    python -m benchmarks.hallucination_world_v2.checks.record_jobs

Runs each runner's ``main`` with training, evaluation, views, reports and plots stubbed out, one job at a time,
and writes ``<check>.jobs.json`` next to this file: the worlds drawn, the protocol written to ``protocol.json``,
and per job (in launch order) its recipe, folders (relative to the run folder) and record. These files are the
fixture the refactored runner must reproduce exactly (tests/test_research_record.py).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from unittest import mock

from benchmarks.hallucination_world_v2 import (
    model,
    pilot,
    report,
    run,
    stability,
    stability_anchor,
    stability_floor,
    stability_gain,
    stability_heldout,
    stability_window,
    trajectory,
    world,
)


HERE = Path(__file__).resolve().parent
TRAJECTORIES = {  # the invocations TRAJECTORY.md records, in its order
    "trajectory-word-3-lr1e-4": ["--kind", "word", "--seed", "3", "--lr", "1e-4", "--methods", "dpo,tpo"],
    "trajectory-word-3-lr3e-5": ["--kind", "word", "--seed", "3", "--lr", "3e-5", "--methods", "dpo,tpo"],
    "trajectory-word-3-lr1e-4-clip": ["--kind", "word", "--seed", "3", "--lr", "1e-4", "--methods", "tpo_clip"],
    "trajectory-word-4-lr1e-4": ["--kind", "word", "--seed", "4", "--lr", "1e-4", "--methods", "dpo,tpo,tpo_clip"],
}


def relative(value, out: Path):
    if isinstance(value, dict):
        return {key: relative(item, out) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [relative(item, out) for item in value]
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str) and value.startswith(str(out)):
        return "<out>" + value[len(str(out)) :]
    return value


def record(name: str, invoke) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp).resolve() / "out"
        launched = {"worlds": [], "protocols": [], "jobs": []}

        def fake_run_job(job, protocol):
            launched["jobs"].append(
                {
                    "recipe": relative(job.recipe, out),
                    "run_dir": relative(job.run_dir, out),
                    "world_dir": relative(job.world_dir, out),
                    "sft_dir": relative(job.sft_dir, out),
                    "record": job.record,
                    "eval_batch_size": protocol.eval_batch_size,
                }
            )
            return {**job.record, "run_dir": str(job.run_dir), "recall": 0.5}

        def fake_build_world(spec, directory):
            launched["worlds"].append(
                {
                    "kind": spec.kind,
                    "config": dataclasses.asdict(spec.config),
                    "num_heldout": spec.num_heldout,
                    "dir": relative(directory, out),
                }
            )

        real_run_protocol = run.run_protocol

        def recording_run_protocol(protocol, directory, jobs):
            launched["protocols"].append(json.loads(json.dumps(protocol.as_dict())))
            return real_run_protocol(protocol, directory, jobs)

        patches = [
            mock.patch.object(run, "run_job", fake_run_job),
            mock.patch.object(run, "run_protocol", recording_run_protocol),
            mock.patch.object(pilot, "run_protocol", recording_run_protocol),
            mock.patch.object(pilot, "pilot_table", lambda runs: ""),
            mock.patch.object(run, "run_views", lambda protocol, out: {}),
            mock.patch.object(world, "build_world", fake_build_world),
            mock.patch.object(model, "build_world_model", lambda directory, seed: directory),
            mock.patch.object(report, "write_results", lambda *args: None),
            mock.patch.object(stability, "with_history", lambda record: record),
            mock.patch.object(stability, "write_report", lambda *args: None),
            mock.patch.object(
                stability_heldout, "watched_run", lambda job: run.run_job(job, stability_heldout.PROTOCOL)
            ),
            mock.patch.object(stability_heldout, "write_report", lambda *args: None),
            mock.patch.object(stability_anchor, "one_run", lambda job, protocol: run.run_job(job, protocol)),
            mock.patch.object(stability_anchor, "write_report", lambda *args: None),
            mock.patch.object(stability_gain, "write_report", lambda *args: None),
            mock.patch.object(stability_gain, "plot_frontiers", lambda *args: None),
            mock.patch.object(stability_floor, "watched_run", lambda job: run.run_job(job, stability_floor.PROTOCOL)),
            mock.patch.object(stability_floor, "write_report", lambda *args: None),
            mock.patch.object(
                stability_window, "watched_run", lambda job: run.run_job(job, stability_window.PROTOCOL)
            ),
            mock.patch.object(stability_window, "write_report", lambda *args: None),
            mock.patch.object(
                trajectory.stability,
                "with_history",
                lambda record: {**record, "history": [{"step": 5, "logps/chosen": -1.0}]},
            ),
            mock.patch("builtins.print", lambda *args, **kwargs: None),
        ]
        for patch in patches:
            patch.start()
        try:
            invoke(out)
        finally:
            for patch in reversed(patches):
                patch.stop()
    (HERE / f"{name}.jobs.json").write_text(json.dumps(launched, indent=1) + "\n")


def main() -> int:
    results = ["--results", "/dev/null", "--jobs", "1"]
    record("v2", lambda out: run.main(["--out", str(out), *results]))
    record("quick", lambda out: run.main(["--quick", "--out", str(out), *results]))
    record("pilot", lambda out: pilot.main(["--out", str(out), "--jobs", "1"]))
    for name, module in (
        ("stability", stability),
        ("heldout", stability_heldout),
        ("anchor", stability_anchor),
        ("gain", stability_gain),
        ("floor", stability_floor),
        ("window", stability_window),
    ):
        record(name, lambda out, module=module: module.main(["--out", str(out), *results]))
    for name, argv in TRAJECTORIES.items():
        record(name, lambda out, argv=argv: trajectory.main([*argv, "--out", str(out), "--jobs", "1"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
