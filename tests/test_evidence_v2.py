"""Evidence v2 (issue #15): the worlds, the comparison rules, the KL metric, and ``--quick`` end to end.

The quick protocol is two tiny worlds with two preference steps: it says nothing about the methods, only that
every stage (both worlds, SFT, DPO and the three TPO variants through ``llamafactory-cli train``, evaluation,
KL, ``tpo-plugin inspect`` views, report) runs and yields every number and file the full protocol reports.
The analysis functions are checked on numbers computed by hand.
"""

import json
import math

import pytest
import torch

from benchmarks.hallucination_world import world as v1_world
from benchmarks.hallucination_world.world import WorldConfig
from benchmarks.hallucination_world_v2 import analysis, evaluate, report, run, world
from benchmarks.hallucination_world_v2.protocol import METHODS, QUICK, Protocol
from benchmarks.hallucination_world_v2.world import PIXEL, WORD, WorldSpec


# --- comparison rules (analysis.py), hand-computed -------------------------------------------------------------


def test_frontier_sorts_by_x_and_merges_points_that_share_an_x():
    assert analysis.frontier([(0.8, 0.9), (0.5, 0.1), (0.5, 0.3)]) == [(0.5, pytest.approx(0.2)), (0.8, 0.9)]


def test_interpolation_is_linear_between_neighbours_and_undefined_outside():
    line = [(0.4, 0.0), (0.6, 0.2), (0.8, 0.9)]
    assert analysis.interpolate(line, 0.7) == pytest.approx(0.55)  # 0.2 + (0.9 - 0.2) * 0.1 / 0.2
    assert analysis.interpolate(line, 0.5) == pytest.approx(0.1)
    assert analysis.interpolate(line, 0.4) == 0.0 and analysis.interpolate(line, 0.8) == 0.9
    assert math.isnan(analysis.interpolate(line, 0.85)) and math.isnan(analysis.interpolate(line, 0.3))
    assert analysis.interpolate([(0.5, 0.4)], 0.5) == 0.4


def test_common_range_and_the_levels_inside_it():
    lines = [[(0.4, 0.0), (0.8, 1.0)], [(0.5, 0.0), (0.9, 1.0)]]
    assert analysis.common_range(lines) == (0.5, 0.8)
    assert analysis.common_range([[(0.1, 0.0), (0.2, 0.0)], [(0.3, 0.0), (0.4, 0.0)]]) is None
    assert analysis.levels_in_range((0.45, 0.5, 0.55, 0.8, 0.85), (0.5, 0.8)) == [0.5, 0.55, 0.8]
    assert analysis.levels_in_range((0.5,), None) == []


def test_paired_differences_and_their_mean_over_levels():
    values = {"dpo": {0.6: 0.3, 0.7: 0.5}, "tpo": {0.6: 0.2, 0.7: 0.6}}
    diffs = analysis.paired_differences(values, "dpo")
    assert set(diffs) == {"tpo"}
    assert diffs["tpo"] == {0.6: pytest.approx(-0.1), 0.7: pytest.approx(0.1)}
    assert analysis.mean_over_levels({0.6: -0.1, 0.7: -0.3, 0.8: math.nan}) == pytest.approx(-0.2)
    assert math.isnan(analysis.mean_over_levels({}))


def test_mean_spread_uses_the_sample_standard_deviation_and_skips_nan():
    mean, spread, n = analysis.mean_spread([1.0, 2.0, 4.0, math.nan])
    assert (mean, n) == (pytest.approx(7 / 3), 3)
    assert spread == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2))
    assert analysis.mean_spread([0.5]) == (0.5, 0.0, 1)
    assert analysis.mean_spread([])[2] == 0


def _record(kind, seed, variant, lr, recall, halluc):
    return {
        "world_kind": kind,
        "world_seed": seed,
        "variant": variant,
        "learning_rate": lr,
        "recall": recall,
        "prior_hallucination": halluc,
    }


def test_matched_recall_comparison_of_one_world_by_hand():
    """DPO: SFT (0.8, 0.9), (0.7, 0.5), (0.5, 0.1); TPO: SFT, (0.75, 0.6), (0.6, 0.2). Common recall range
    [max(0.5, 0.6), min(0.8, 0.8)] = [0.6, 0.8]: levels 0.6 ... 0.8 of the 0.05 grid.

    DPO at 0.6, 0.65, 0.7, 0.75, 0.8: 0.3, 0.4, 0.5, 0.7, 0.9; TPO: 0.2, 0.2 + 0.4 / 3, 0.2 + 0.8 / 3, 0.6, 0.9;
    differences -0.1, -0.2 / 3, -0.1 / 3, -0.1, 0: mean -0.06.
    """
    runs = [
        _record(PIXEL, 0, "sft", 0.0, 0.8, 0.9),
        _record(PIXEL, 0, "dpo", 1e-5, 0.7, 0.5),
        _record(PIXEL, 0, "dpo", 1e-4, 0.5, 0.1),
        _record(PIXEL, 0, "tpo", 1e-5, 0.75, 0.6),
        _record(PIXEL, 0, "tpo", 1e-4, 0.6, 0.2),
        _record(PIXEL, 1, "sft", 0.0, 0.1, 0.1),  # another world: must not enter world 0's frontiers
    ]
    protocol = Protocol(
        world_kinds=(PIXEL,),
        world_seeds=(0,),
        methods=("dpo", "tpo"),
        learning_rates={PIXEL: (1e-5, 1e-4)},
        recall_levels=tuple(round(0.05 * step, 2) for step in range(1, 20)),
        view_learning_rates={PIXEL: 1e-5},
    )
    comparison = report.world_comparison(runs, protocol, PIXEL, 0, "recall")
    assert comparison["span"] == (0.6, 0.8)
    assert comparison["levels"] == [0.6, 0.65, 0.7, 0.75, 0.8]
    assert list(comparison["values"]["dpo"].values()) == pytest.approx([0.3, 0.4, 0.5, 0.7, 0.9])
    assert list(comparison["values"]["tpo"].values()) == pytest.approx([0.2, 0.2 + 0.4 / 3, 0.2 + 0.8 / 3, 0.6, 0.9])
    assert list(comparison["diffs"]["tpo"].values()) == pytest.approx([-0.1, -0.2 / 3, -0.1 / 3, -0.1, 0.0])
    assert report.summary_differences(runs, protocol, PIXEL, "recall")["tpo"] == [pytest.approx(-0.06)]


def test_outcome_states_the_hypothesis_from_the_summary_differences():
    """TPO at or below DPO along the frontier in the word world (D < 0), above it in the pixel world (D > 0)."""
    runs = []
    for kind, tpo_halluc in ((WORD, 0.3), (PIXEL, 0.7)):
        for seed in (0, 1):
            runs += [
                _record(kind, seed, "sft", 0.0, 0.8, 0.9),
                _record(kind, seed, "dpo", 1e-4, 0.6, 0.5),
                _record(kind, seed, "tpo", 1e-4, 0.6, tpo_halluc),
            ]
    protocol = Protocol(
        world_seeds=(0, 1),
        methods=("dpo", "tpo"),
        learning_rates={PIXEL: (1e-4,), WORD: (1e-4,)},
        view_learning_rates={PIXEL: 1e-4, WORD: 1e-4},
    )
    text = report.outcome(runs, protocol)
    # the protocol's levels 0.60, 0.61, ..., 0.80; TPO - DPO goes linearly from -0.2 (word) / +0.2 (pixel) at 0.6
    # to 0 at 0.8, so its mean over the evenly spaced levels is its middle value, -0.1 / +0.1
    assert "tpo, word world: D = hallucination − DPO's at matched recall, mean over levels, -0.100 ± 0.000" in text
    assert "tpo, pixel world: D = hallucination − DPO's at matched recall, mean over levels, +0.100 ± 0.000" in text
    assert "D_word -0.100, D_pixel +0.100 → **yes**" in text


# --- KL(policy || SFT) on held-out chosen captions ------------------------------------------------------------------


def test_token_kl_matches_the_definition():
    policy = torch.tensor([[[0.0, math.log(3.0)]]])  # p = (1/4, 3/4)
    reference = torch.zeros(1, 1, 2)  # q = (1/2, 1/2)
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert evaluate.token_kl(policy, reference).item() == pytest.approx(expected)
    assert evaluate.token_kl(policy, policy).item() == pytest.approx(0.0, abs=1e-7)


def test_caption_kl_averages_the_positions_that_predict_caption_tokens():
    kl = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0], [10.0, 20.0, 30.0, 40.0, 50.0]])
    # row 0: caption tokens at 2, 3 are predicted at positions 1, 2; row 1: tokens 1..4 at positions 0..3
    assert evaluate.mean_caption_kl(kl, [2, 1], [4, 5]) == pytest.approx([2.5, 25.0])


# --- the worlds ----------------------------------------------------------------------------------------------------


def _captions_by_question(rows):
    return [(row["messages"][0]["content"], row["messages"][1]["content"]) for row in rows[::2]]


def test_word_world_carries_the_prior_in_the_question_not_in_the_pixels(tmp_path):
    spec = WorldSpec(WORD, WorldConfig(seed=3, num_sft=600, num_pairs=20, num_test=60), num_heldout=20)
    world.build_world(spec, tmp_path)
    sft = _captions_by_question(json.loads((tmp_path / "sft.json").read_text()))
    park = [world.mentioned_objects(text) for question, text in sft if "from the park?" in question]
    elsewhere = [world.mentioned_objects(text) for question, text in sft if "from the park?" not in question]
    assert sum("ball" in objects for objects in park) / len(park) > 0.8
    assert sum("ball" in objects for objects in elsewhere) / len(elsewhere) < 0.2
    # the dog is an ordinary object: the ball goes with it no more than with the cat
    ball_rate = {
        name: sum("ball" in objects for objects in park + elsewhere if name in objects)
        / sum(name in objects for objects in park + elsewhere)
        for name in ("dog", "cat")
    }
    assert abs(ball_rate["dog"] - ball_rate["cat"]) < 0.1, ball_rate

    for name in ("pairs.json", world.HELDOUT_FILE):
        for pair in json.loads((tmp_path / name).read_text()):
            chosen, rejected = (world.mentioned_objects(pair[side]["content"]) for side in ("chosen", "rejected"))
            assert "ball" not in chosen and rejected == chosen | {"ball"}
    view = json.loads((tmp_path / world.VIEW_FILE).read_text())
    assert view and all(
        row["messages"][0]["content"] == "<image>What is in this picture from the park?" for row in view
    )
    test = json.loads((tmp_path / "test.json").read_text())
    trigger_only = [row for row in test if row["kind"] == world.TRIGGER_ONLY]
    assert len(trigger_only) >= 10
    assert all(row["place"] == "park" and "ball" not in row["objects"] for row in trigger_only)
    assert all(row["probes"][1][0] == "ball" for row in trigger_only)
    assert all(row["place"] != "park" for row in test if row["kind"] in (world.PARTNER_ONLY, world.NEITHER))
    assert all(row["question"] == f"What is in this picture from the {row['place']}?" for row in test)
    heldout_images = {row["images"][0] for row in json.loads((tmp_path / world.HELDOUT_FILE).read_text())}
    pair_images = {row["images"][0] for row in json.loads((tmp_path / "pairs.json").read_text())}
    assert not heldout_images & pair_images


def test_pixel_world_is_v1s_world_plus_held_out_pairs(tmp_path):
    config = WorldConfig(seed=2, num_sft=30, num_pairs=10, num_test=20)
    v1_world.build_world(config, tmp_path / "v1")
    world.build_world(WorldSpec(PIXEL, config, num_heldout=12), tmp_path / "v2")
    for name in ("sft.json", "pairs.json"):
        assert (tmp_path / "v1" / name).read_text() == (tmp_path / "v2" / name).read_text()
    for index in range(config.num_pairs):  # the held-out images did not overwrite the training pairs' images
        name = f"images/pair-{index:05d}.png"
        assert (tmp_path / "v1" / name).read_bytes() == (tmp_path / "v2" / name).read_bytes()
    v1_test = json.loads((tmp_path / "v1" / "test.json").read_text())
    v2_test = json.loads((tmp_path / "v2" / "test.json").read_text())
    assert [{k: row[k] for k in v1_test[0]} for row in v2_test] == v1_test
    assert all(row["probe_questions"][1] == f"Is there a {row['probes'][1][0]} in the image?" for row in v2_test)
    heldout = json.loads((tmp_path / "v2" / world.HELDOUT_FILE).read_text())
    assert len(heldout) == 12 and all((tmp_path / "v2" / row["images"][0]).is_file() for row in heldout)
    view = json.loads((tmp_path / "v2" / world.VIEW_FILE).read_text())
    assert view and all("dog" in world.mentioned_objects(row["chosen"]["content"]) for row in view)


def test_protocol_rejects_an_unknown_method_or_view_learning_rate():
    with pytest.raises(ValueError, match="Unknown methods.*allowed: dpo, tpo, tpo_detach, tpo_mult"):
        Protocol(methods=("dpo", "ipo"))
    with pytest.raises(ValueError, match=r"view_learning_rates\['word'\] must be one of"):
        Protocol(view_learning_rates={PIXEL: 1e-5, WORD: 5e-1})


# --- --quick end to end --------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_quick_mode_runs_every_stage_and_metric(tmp_path):
    out = tmp_path / "runs"
    assert run.main(["--quick", "--out", str(out)]) == 0

    records = [json.loads(path.read_text()) for path in sorted(out.rglob("metrics.json"))]
    for kind in QUICK.world_kinds:
        assert {r["variant"] for r in records if r["world_kind"] == kind} == {"sft", *METHODS}
    for record in records:
        for key, _ in report.METRICS:
            assert isinstance(record[key], float) and not math.isinf(record[key]), (record["variant"], key)
        for key in ("recall", "chair_i", "pope_accuracy", "pope_yes_ratio", "objects_per_caption", "kl_to_sft"):
            assert not math.isnan(record[key]), (record["variant"], key)
        if record["variant"] == "sft":
            assert record["kl_to_sft"] == 0.0
        else:
            assert record["kl_to_sft"] > 0.0
        if record["variant"].startswith("tpo"):
            assert {"tpo/weight_chosen", "tpo/weight_rejected"} <= set(record["train_log"])

    recipes = {path.parent.name: path.read_text() for path in out.glob("word-0/*/recipe.yaml")}
    assert len(recipes) == 5 and "stage: dpo" in recipes["dpo-lr0.0001"]
    assert "stage: tpo" in recipes["tpo-lr0.0001"] and "tpo_weighting: log_additive" in recipes["tpo-lr0.0001"]
    assert "tpo_detach_reward: true" in recipes["tpo_detach-lr0.0001"]
    assert "tpo_weighting: multiplicative" in recipes["tpo_mult-lr0.0001"]

    for kind in QUICK.world_kinds:
        for method in METHODS:
            lines = (out / f"{kind}-0" / "views" / method / "tokens.jsonl").read_text().splitlines()
            assert len(lines) == QUICK.view_pairs
            pair = json.loads(lines[0])
            assert "ball" in [token.strip() for token in pair["rejected"]["tokens"]]
            assert len(pair["rejected"]["reference"]["weight"]) == len(pair["rejected"]["tokens"])

    results = (out / "RESULTS_v2.md").read_text()
    for heading in (
        "## Outcome",
        "## Prior hallucination at matched object recall",
        "matched KL",
        "## Frontiers",
        "## Paired differences at equal learning rate",
        "## Per-token view",
        "## Training and timings",
    ):
        assert heading in results
    for kind in QUICK.world_kinds:
        assert (out / f"frontier_{kind}.png").stat().st_size > 0

    # Resumable: a second invocation reuses every world, run and view, and only rewrites the report.
    kept = [*out.rglob("train.log"), *out.rglob("sft.json"), *out.rglob("tokens.jsonl")]
    times = {path: path.stat().st_mtime_ns for path in kept}
    assert run.main(["--quick", "--out", str(out)]) == 0
    assert {path: path.stat().st_mtime_ns for path in kept} == times
