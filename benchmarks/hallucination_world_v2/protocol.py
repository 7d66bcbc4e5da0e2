"""The v2 protocol as data: every setting of the full run, of ``--quick`` and of the pilots, fixed before results.

PROTOCOL_v2.md explains each value; ``run.py`` writes the protocol it ran into ``protocol.json`` and RESULTS_v2.md.
"""

from __future__ import annotations

import dataclasses

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

    def __post_init__(self):
        unknown = [method for method in self.methods if method not in METHODS]
        if unknown:
            raise ValueError(f"Unknown methods {unknown}; allowed: {', '.join(METHODS)}.")
        for kind in self.world_kinds:
            if self.view_learning_rates[kind] not in self.learning_rates[kind]:
                raise ValueError(f"view_learning_rates[{kind!r}] must be one of learning_rates[{kind!r}].")

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "method_settings": {name: METHODS[name] for name in self.methods}}


FULL = Protocol()

QUICK = Protocol(
    world_seeds=(0,),
    world=WorldConfig(num_sft=48, num_pairs=16, num_test=24),
    num_heldout=8,
    sft={"batch_size": 16, "epochs": 1.0, "learning_rate": 1e-3},
    preference={"batch_size": 4, "steps": 2, "beta": 0.1, "logging_steps": 1},
    learning_rates={PIXEL: (1e-4,), WORD: (1e-4,)},
    view_learning_rates={PIXEL: 1e-4, WORD: 1e-4},
    view_pairs=2,
    eval_batch_size=24,
)

PILOT = Protocol(
    world_seeds=(0,),
    methods=("dpo",),
    learning_rates={PIXEL: (1e-6, 3e-6, 1e-5, 3e-5, 1e-4), WORD: (1e-6, 3e-6, 1e-5, 3e-5, 1e-4)},
    view_learning_rates={PIXEL: 1e-5, WORD: 1e-5},
)
"""SFT and DPO only, on world seed 0 of each kind: the runs from which ``FULL.learning_rates`` were chosen."""
