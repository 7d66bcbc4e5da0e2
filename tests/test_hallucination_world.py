"""The hallucination-world experiment end to end in ``--quick`` mode: every stage runs, every metric is produced.

The quick protocol is a tiny world with a few training steps: it says nothing about TPO vs DPO, only that the
pipeline (world, SFT, DPO, TPO and its ablations through ``llamafactory-cli train``, evaluation, per-token
view, report) works and yields every number the full protocol reports.
"""

import json
import math

import pytest

from benchmarks.hallucination_world import run, world
from benchmarks.hallucination_world.report import METRICS


@pytest.mark.e2e
def test_quick_mode_runs_every_stage_and_metric(tmp_path):
    assert run.main(["--quick", "--out", str(tmp_path / "runs")]) == 0

    records = [json.loads(path.read_text()) for path in sorted((tmp_path / "runs").rglob("metrics.json"))]
    variants = {record["variant"] for record in records}
    assert variants == {"sft", "dpo", "tpo", "tpo tpo_noise_step=250", "tpo tpo_reward_on=rejected"}
    for record in records:
        for key, _ in METRICS:
            assert isinstance(record[key], float) and not math.isinf(record[key]), (record["variant"], key)
        for key in ("recall", "chair_i", "pope_accuracy", "pope_yes_ratio", "objects_per_caption"):
            assert not math.isnan(record[key]), (record["variant"], key)
    tpo = next(record for record in records if record["variant"] == "tpo")
    assert {"tpo/weight_chosen", "tpo/weight_rejected"} <= set(tpo["train_log"])

    recipes = [path.read_text() for path in (tmp_path / "runs").rglob("recipe.yaml")]
    assert len(recipes) == len(records)
    assert any("stage: tpo" in text and "tpo_noise_step: 500" in text for text in recipes)
    assert any("stage: dpo" in text for text in recipes)

    results = (tmp_path / "runs" / "RESULTS.md").read_text()
    for heading in ("## Outcome", "## Paired differences", "## Trade-off", "## Per-token view"):
        assert heading in results
    for image in ("tradeoff.png", "token_view_0.png", "token_view_1.png"):
        assert (tmp_path / "runs" / image).stat().st_size > 0


def test_captions_list_objects_in_a_fixed_order_and_parse_back():
    assert world.caption(["tree", "ball", "dog"]) == "A dog, a ball and a tree."
    assert world.caption(["cup"]) == "A cup."
    assert world.mentioned_objects("A dog, a ball and a tree.") == {"dog", "ball", "tree"}


def test_world_carries_the_prior_and_pairs_reject_the_partner(tmp_path):
    config = world.WorldConfig(seed=3, num_sft=400, num_pairs=20, num_test=50)
    world.build_world(config, tmp_path)
    captions = [row["messages"][1]["content"] for row in json.loads((tmp_path / "sft.json").read_text())[::2]]
    with_dog = [world.mentioned_objects(text) for text in captions if "dog" in text]
    assert sum("ball" in objects for objects in with_dog) / len(with_dog) > 0.8
    for pair in json.loads((tmp_path / "pairs.json").read_text()):
        chosen, rejected = (world.mentioned_objects(pair[side]["content"]) for side in ("chosen", "rejected"))
        assert "ball" not in chosen and rejected == chosen | {"ball"}
    test = json.loads((tmp_path / "test.json").read_text())
    assert sum(row["kind"] == world.TRIGGER_ONLY for row in test) >= 10
    assert all([probe[1] for probe in row["probes"]] == [True, False] for row in test)
