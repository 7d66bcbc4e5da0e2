"""The controlled-world experiments' record (issue #35): every check's frozen protocol file expands to exactly the
job list its own runner launched before the one runner existed, and no check reads another check's constants."""

import ast
import dataclasses
import json
import re
from pathlib import Path

import pytest

from benchmarks.hallucination_world_v2 import checks, run
from benchmarks.hallucination_world_v2.checks import trajectory


CHECKS_DIR = Path(checks.__file__).resolve().parent
OUT = Path("/record/out")  # jobs are built without side effects: any folder will do
# The trajectory invocations TRAJECTORY.md records, as the runner's arguments (kind, seed, lr, methods).
TRAJECTORIES = {
    "trajectory-word-3-lr1e-4": ("word", 3, 1e-4, ["dpo", "tpo"]),
    "trajectory-word-3-lr3e-5": ("word", 3, 3e-5, ["dpo", "tpo"]),
    "trajectory-word-3-lr1e-4-clip": ("word", 3, 1e-4, ["tpo_clip"]),
    "trajectory-word-4-lr1e-4": ("word", 4, 1e-4, ["dpo", "tpo", "tpo_clip"]),
}


def relative(value):
    if isinstance(value, dict):
        return {key: relative(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [relative(item) for item in value]
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str) and value.startswith(str(OUT)):
        return "<out>" + value[len(str(OUT)) :]
    return value


def job_entry(job: run.Job, protocol) -> dict:
    return {
        "recipe": relative(job.recipe),
        "run_dir": relative(job.run_dir),
        "world_dir": relative(job.world_dir),
        "sft_dir": relative(job.sft_dir),
        "record": job.record,
        "eval_batch_size": protocol.eval_batch_size,
    }


def launched(protocol, extra_jobs: list[run.Job]) -> dict:
    """What a check launches, in the fixture's form: worlds, protocol.json, every job in launch order."""
    specs, sft_jobs, preference = run.protocol_plan(protocol, OUT)
    worlds = [
        {
            "kind": spec.kind,
            "config": dataclasses.asdict(spec.config),
            "num_heldout": spec.num_heldout,
            "dir": relative(run.world_dir(OUT, spec.kind, spec.config.seed)),
        }
        for spec in specs
    ]
    jobs = [job_entry(job, protocol) for job in sft_jobs + preference + extra_jobs]
    return json.loads(json.dumps({"worlds": worlds, "protocols": [protocol.as_dict()], "jobs": jobs}))


def expanded(name: str) -> dict:
    if name in TRAJECTORIES:
        kind, seed, lr, methods = TRAJECTORIES[name]
        protocol = trajectory.protocol_for(kind, seed, lr)
        return launched(protocol, [trajectory.trajectory_job(protocol, OUT, kind, seed, m, lr) for m in methods])
    check = checks.load(name)
    return launched(check.protocol, checks.check_jobs(check, OUT))


FIXTURES = sorted(path.name.removesuffix(".jobs.json") for path in CHECKS_DIR.glob("*.jobs.json"))


def test_every_check_has_its_recorded_job_list():
    protocols = set(checks.names())
    experiments = {"v2", "quick", "pilot", "trajectory"}
    assert protocols == experiments | {"stability", "heldout", "anchor", "gain", "floor", "window", "grounding"}
    assert set(FIXTURES) == (protocols - {"trajectory"}) | set(TRAJECTORIES)


@pytest.mark.parametrize("name", FIXTURES)
def test_frozen_protocol_reproduces_the_recorded_jobs(name):
    recorded = json.loads((CHECKS_DIR / f"{name}.jobs.json").read_text())
    now = expanded(name)
    assert now["worlds"] == recorded["worlds"]
    assert now["protocols"] == recorded["protocols"]
    assert len(now["jobs"]) == len(recorded["jobs"])
    for new, old in zip(now["jobs"], recorded["jobs"], strict=True):
        assert json.dumps(new) == json.dumps(old)  # key order too: it is the order of recipe.yaml


def test_no_check_imports_another_check():
    check_modules = set(checks.names())
    for path in CHECKS_DIR.glob("*.py"):
        others = check_modules - {path.stem}
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                named = {(node.module or "").split(".")[-1]} | {alias.name for alias in node.names}
            elif isinstance(node, ast.Import):
                named = {alias.name.split(".")[-1] for alias in node.names}
            else:
                continue
            assert not named & others, f"{path.name} imports the check(s) {named & others}"
        loaded = set(re.findall(r'load\("([^"]+)"\)', path.read_text()))
        assert loaded == ({path.stem} if path.stem in check_modules else set()), f"{path.name} loads {loaded}"
