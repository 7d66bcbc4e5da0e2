"""The v2 protocol as data: the settings every run of the controlled worlds is built from.

The class's defaults are v2's full protocol (PROTOCOL_v2.md explains each value). What each experiment ran is
frozen in its own file, ``checks/<check>.json`` (``load``): ``v2`` (the full run), ``quick`` and ``pilot`` here,
the stability checks with their own jobs (``checks/__init__.py``). ``run.py`` writes the protocol it ran into
``protocol.json`` and the report.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from benchmarks.hallucination_world.protocol import TPO_DEFAULTS as V1_TPO_DEFAULTS
from benchmarks.hallucination_world.world import WorldConfig

from .world import PIXEL, WORD


# The plugin's TPO defaults, written out in every TPO recipe (v1's, and the weighting added since).
TPO_DEFAULTS = {**V1_TPO_DEFAULTS, "tpo_weighting": "log_additive"}

METHODS = {
    "dpo": {"stage": "dpo", "tpo_keys": {}},
    "tpo": {"stage": "tpo", "tpo_keys": TPO_DEFAULTS},
    "tpo_detach": {"stage": "tpo", "tpo_keys": {**TPO_DEFAULTS, "tpo_detach_reward": True}},
    "tpo_mult": {"stage": "tpo", "tpo_keys": {**TPO_DEFAULTS, "tpo_weighting": "multiplicative"}},
}
"""Every method: its LLaMA-Factory stage and its ``tpo_*`` keys; all else in their recipes is the same."""
BASELINE = "dpo"  # paired differences are (TPO variant) - (this)


@dataclasses.dataclass(frozen=True)
class Protocol:
    world_kinds: tuple[str, ...] = (PIXEL, WORD)
    world_seeds: tuple[int, ...] = (0, 1, 2)
    train_seed: int = 0  # one training seed (model init, data order) per world
    world: WorldConfig = WorldConfig()  # v1's sizes and rates, for both kinds
    num_heldout: int = 200  # held-out pairs: KL on their chosen captions; the trigger ones feed the token view
    sft: dict = dataclasses.field(default_factory=lambda: {"batch_size": 16, "epochs": 4.0, "learning_rate": 1e-3})
    preference: dict = dataclasses.field(
        default_factory=lambda: {"batch_size": 8, "steps": 100, "beta": 0.1, "logging_steps": 5}
    )
    methods: tuple[str, ...] = tuple(METHODS)
    # Per world kind, from "prior barely moves" to "prior gone" for DPO (chosen from the pilots, PROTOCOL_v2.md),
    # densest where DPO's pilot prior hallucination fell.
    learning_rates: dict = dataclasses.field(
        default_factory=lambda: {
            PIXEL: (1e-5, 2e-5, 3e-5, 5e-5, 1e-4),
            WORD: (3e-6, 1e-5, 2e-5, 3e-5, 1e-4),
        }
    )
    # Hallucination is compared at these object recalls (and KLs to SFT), where they lie in the range common to
    # all methods of a world; D averages over them. The recall table shows the multiples of 0.05.
    recall_levels: tuple[float, ...] = tuple(round(0.01 * step, 2) for step in range(1, 100))
    kl_levels: tuple[float, ...] = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
    view_learning_rates: dict = dataclasses.field(default_factory=lambda: {PIXEL: 2e-5, WORD: 2e-5})
    view_pairs: int = 100  # held-out pairs with the trigger inspected per method (first world seed)
    eval_batch_size: int = 100
    # Each method's stage and ``tpo_*`` keys, as a frozen protocol file spells them out; empty: ``METHODS``.
    method_settings: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        known = self.method_settings or METHODS
        unknown = [method for method in self.methods if method not in known]
        if unknown:
            raise ValueError(f"Unknown methods {unknown}; allowed: {', '.join(known)}.")
        for kind in self.world_kinds:
            if self.view_learning_rates[kind] not in self.learning_rates[kind]:
                raise ValueError(f"view_learning_rates[{kind!r}] must be one of learning_rates[{kind!r}].")

    def settings(self, method: str) -> dict:
        """The method's LLaMA-Factory stage and ``tpo_*`` keys."""
        return (self.method_settings or METHODS)[method]

    def as_dict(self) -> dict:
        fields = dataclasses.asdict(self)
        del fields["method_settings"]
        return {**fields, "method_settings": {name: self.settings(name) for name in self.methods}}

    @classmethod
    def from_dict(cls, fields: dict) -> Protocol:
        """The protocol ``as_dict`` wrote (a frozen protocol file's ``protocol``)."""
        tuples = ("world_kinds", "world_seeds", "methods", "recall_levels", "kl_levels")
        values = {key: tuple(value) if key in tuples else value for key, value in fields.items()}
        world = {**fields["world"], "test_kinds": tuple(tuple(kind) for kind in fields["world"]["test_kinds"])}
        values["world"] = WorldConfig(**world)
        values["learning_rates"] = {kind: tuple(rates) for kind, rates in fields["learning_rates"].items()}
        return cls(**values)


CHECKS_DIR = Path(__file__).resolve().parent / "checks"


def load(check: str) -> Protocol:
    """The base protocol (worlds, SFT and its ``methods`` at its learning rates) frozen in ``checks/<check>.json``."""
    return Protocol.from_dict(json.loads((CHECKS_DIR / f"{check}.json").read_text())["protocol"])


FULL = load("v2")
QUICK = load("quick")  # tiny worlds, 2 steps: checks every stage and metric
PILOT = load("pilot")
"""SFT and DPO only, on world seed 0 of each kind: the runs from which ``FULL.learning_rates`` were chosen."""
