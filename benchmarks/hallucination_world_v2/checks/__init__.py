"""The controlled-world experiments' frozen protocols, one file per check, and the job list each expands to.

``<check>.json`` holds everything a check runs: ``protocol`` (its worlds, their SFT and the base methods at their
learning rates, as ``Protocol.as_dict`` writes it), ``jobs`` (the check's own runs: per group, methods with
their stage, ``tpo_*`` keys and extra recipe keys, at learning rates per world kind) and ``constants`` (the
numbers its verdicts read). A check reads only its own file, so a newer check never changes an older one;
``<check>.jobs.json`` is the job list the check's runner launched before these files existed, which
tests/test_research_record.py holds the expansion to.

    python -m benchmarks.hallucination_world_v2.run CHECK    # CHECK: one of names()
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..protocol import CHECKS_DIR, Protocol
from ..run import Job, preference_job, world_dir


@dataclasses.dataclass(frozen=True)
class Check:
    """One frozen protocol file: its base protocol, its own job groups and constants, its record's files."""

    name: str
    question: str
    rules: str | None  # the protocol's markdown, fixed before the runs
    results: str | None  # the report it writes (relative to the package)
    out: str  # default run folder (relative to the package)
    protocol: Protocol
    groups: tuple[dict, ...]
    constants: dict


def names() -> list[str]:
    return sorted(path.name.removesuffix(".json") for path in CHECKS_DIR.glob("*.json") if ".jobs." not in path.name)


def load(name: str) -> Check:
    fields = json.loads((CHECKS_DIR / f"{name}.json").read_text())
    return Check(
        name=fields["check"],
        question=fields["question"],
        rules=fields["rules"],
        results=fields["results"],
        out=fields["out"],
        protocol=Protocol.from_dict(fields["protocol"]),
        groups=tuple(fields["jobs"]),
        constants=fields.get("constants", {}),
    )


def rates(group: dict) -> dict[str, tuple[float, ...]]:
    """A job group's learning rates per world kind."""
    return {kind: tuple(values) for kind, values in group["learning_rates"].items()}


def group_job(protocol: Protocol, out: Path, kind: str, seed: int, method: str, settings: dict, lr: float, suffix=""):
    """One run of a job group's method: v2's preference recipe, then the method's extra recipe keys."""
    directory = world_dir(out, kind, seed)
    run_dir = directory / f"{method}-lr{lr:g}{suffix}" if suffix else None
    job = preference_job(protocol, directory, kind, seed, method, settings, lr, run_dir)
    job.recipe.update(settings.get("recipe", {}))
    return job


def check_jobs(check: Check, out: Path) -> list[Job]:
    """The check's own runs, in launch order: per world seed, world kind, learning rate, then method; a method
    with ``only`` runs in that one world at that one learning rate."""
    jobs = []
    for group in check.groups:
        for seed in check.protocol.world_seeds:
            for kind in check.protocol.world_kinds:
                for lr in rates(group)[kind]:
                    for method, settings in group["methods"].items():
                        only = settings.get("only")
                        if only and (only["world_kind"], only["world_seed"], only["learning_rate"]) != (
                            kind,
                            seed,
                            lr,
                        ):
                            continue
                        jobs.append(group_job(check.protocol, out, kind, seed, method, settings, lr))
    return jobs
