"""The experiment's protocol as data: every setting of the full run and of ``--quick``, fixed before results.

PROTOCOL.md explains each value; ``run.py`` writes the protocol it ran into ``protocol.json`` and RESULTS.md.
"""

from __future__ import annotations

import dataclasses

from .world import WorldConfig


# The TPO defaults of the plugin (README "Keys"); the main TPO runs set them explicitly, so the recipe says so.
TPO_DEFAULTS = {
    "tpo_noise_step": 500,
    "tpo_corruption": "diffusion",
    "tpo_reward_offset": 0.5,
    "tpo_reward_on": "both",
    "tpo_score": "logit",
    "tpo_detach_reward": False,
}


@dataclasses.dataclass(frozen=True)
class Protocol:
    world_seeds: tuple[int, ...] = (0, 1, 2)
    train_seeds: tuple[int, ...] = (0, 1)
    world: WorldConfig = WorldConfig()
    sft: dict = dataclasses.field(default_factory=lambda: {"batch_size": 16, "epochs": 4.0, "learning_rate": 1e-3})
    preference: dict = dataclasses.field(
        default_factory=lambda: {"batch_size": 8, "steps": 100, "beta": 0.1, "logging_steps": 5}
    )
    learning_rates: tuple[float, ...] = (1e-4, 3e-4)
    # Ablations of TPO (one key changed from the defaults each), at the first learning rate and the first
    # training seed, on every world seed.
    ablations: tuple[tuple[str, object], ...] = (
        ("tpo_noise_step", 250),
        ("tpo_noise_step", 999),
        ("tpo_reward_on", "chosen"),
        ("tpo_reward_on", "rejected"),
    )
    token_view_pairs: int = 100  # pairs with a dog whose token scores are averaged; the first 4 are drawn
    eval_batch_size: int = 100

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


FULL = Protocol()

QUICK = Protocol(
    world_seeds=(0,),
    train_seeds=(0,),
    world=WorldConfig(num_sft=48, num_pairs=16, num_test=24),
    sft={"batch_size": 16, "epochs": 1.0, "learning_rate": 1e-3},
    preference={"batch_size": 4, "steps": 2, "beta": 0.1, "logging_steps": 1},
    learning_rates=(1e-4,),
    ablations=(("tpo_noise_step", 250), ("tpo_reward_on", "rejected")),
    token_view_pairs=2,
    eval_batch_size=24,
)
