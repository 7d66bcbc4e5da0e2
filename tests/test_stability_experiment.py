"""The stability experiment's rules (``benchmarks/hallucination_world_v2/checks/``) on hand-written logs."""

import pytest

from benchmarks.hallucination_world_v2.checks import stability


def entry(step: int, share: float, drift: float, logp: float = -10.0) -> dict:
    return {
        "step": step,
        "loss": 0.5,
        "logps/chosen": logp,
        "tpo/weight_term_share": share,
        "tpo/score_drift_chosen": drift + 0.5,  # the rule reads the mean of both answers' drifts
        "tpo/score_drift_rejected": drift - 0.5,
    }


RUNAWAY = [entry(5, 0.1, 0.1), entry(10, 0.6, 0.8), entry(15, 0.7, 3.0, -15.0), entry(20, 0.9, 9.0, -25.0)]
STABLE = [entry(5, 0.1, 0.1), entry(10, 0.3, 0.4), entry(15, 0.35, 0.6), entry(20, 0.4, 0.7)]


def test_warning_step_is_the_first_step_past_both_thresholds():
    assert stability.warning_step(RUNAWAY, 0.5, 1.0) == 15  # step 10 has the share but not the drift
    assert stability.warning_step(RUNAWAY, 0.5, 0.5) == 10
    assert stability.warning_step(RUNAWAY, 0.95, 0.5) is None
    assert stability.warning_step(STABLE, 0.2, 0.5) == 15
    assert stability.warning_step([{"step": 5, "loss": 0.5}], 0.1, 0.1) is None  # no monitor keys logged


def test_nll_doubled_step():
    assert stability.first_step_below(RUNAWAY, 2.0) == 20  # -25 < 2 * -10; -15 is not
    assert stability.first_step_below(STABLE, 2.0) is None


def test_calibration_picks_the_separating_thresholds_that_warn_earliest():
    runs = [{"history": RUNAWAY, "collapsed": True}, {"history": STABLE, "collapsed": False}]
    (share, drift), errors = stability.calibrate(runs, lambda record: record["collapsed"])
    assert errors == {"misses": 0, "alarms": 0}
    # Warning at step 10 (share 0.6, drift 0.8) needs share < 0.6 and drift < 0.8; STABLE never has share > 0.4,
    # so share 0.4 or 0.5 with drift 0.25 or 0.5 separate the two and warn at step 10 (share 0.3 would alarm on
    # STABLE unless drift >= 0.7, which delays RUNAWAY's warning to step 15). Ties: larger share, larger drift.
    assert (share, drift) == (0.5, 0.5)
    assert stability.warning_step(RUNAWAY, share, drift) == 10
    assert stability.warning_step(STABLE, share, drift) is None


def test_collapse_is_recall_below_half_of_sfts():
    assert stability.collapsed({"recall": 0.39}, sft_recall=0.8)
    assert not stability.collapsed({"recall": 0.41}, sft_recall=0.8)


def test_second_check_reads_the_step_the_shipped_monitor_names(tmp_path):
    from benchmarks.hallucination_world_v2.checks import heldout as stability_heldout
    from tpo_plugin.training.run.stability import runaway_message

    logs = {"loss": 0.3, "logps/chosen": -9.0, "tpo/score_drift_chosen": 2.0, "tpo/score_drift_rejected": 1.0}
    log = tmp_path / "train.log"
    log.write_text(f"[WARNING|2026-12-03] llamafactory.train.tpo:143 >> {runaway_message(logs, 35, -2.0)}\n")
    assert stability_heldout.warning_step(log) == 35
    log.write_text("[INFO] {'loss': 0.3, 'logps/chosen': -9.0}\n")
    assert stability_heldout.warning_step(log) is None


def test_third_check_verdicts_on_hand_written_runs(tmp_path):
    from benchmarks.hallucination_world_v2.checks import anchor as stability_anchor

    def record(kind, variant, recall, prior=0.1, chair=0.1, warned=None):
        r = {"world_kind": kind, "variant": variant, "recall": recall, "prior_hallucination": prior, "chair_i": chair}
        if variant.startswith("tpo"):
            step, held = warned or (None, None)
            r.update(warning_step=step, recall_at_warning=held, history=[entry(100, 0.1, 2.0)])
        return r

    records = [
        record("pixel", "sft", 0.80),
        record("pixel", "dpo", 0.70),
        record("pixel", "dpo_anchor", 0.78, prior=0.20, chair=0.10),
        record("pixel", "tpo", 0.30, warned=(40, 0.60)),  # collapsed (< 0.40), warned while at 0.60
        record("pixel", "tpo_anchor", 0.79, prior=0.15, chair=0.12),
        record("word", "sft", 0.90),
        record("word", "dpo", 0.85),
        record("word", "dpo_anchor", 0.88),
        record("word", "tpo", 0.70, warned=(25, 0.85)),  # degraded (< 0.81), warned while still at 0.85
        record("word", "tpo_anchor", 0.86, warned=(60, 0.86)),  # warned, not degraded: a false alarm
    ]
    report = tmp_path / "STABILITY_3.md"
    report.write_text("# an earlier report\n\n## Verdicts\n\n- old\n\n## What led here\n\nexplored by hand\n")
    stability_anchor.write_report(records, report, 2)
    text = report.read_text()
    assert "- old" not in text and text.endswith("## What led here\n\nexplored by hand\n")  # the hand-written part
    assert "**Monitor warns before collapse**: yes — 1 of 1 collapsed TPO runs" in text
    assert "Degraded TPO runs: 2, of which 1 warned while recall was still at least 0.9" in text
    assert "**Monitor's false alarms** (warned, not degraded): 1 of 4 TPO runs" in text
    assert "**Guard prevents collapse**: yes — `tpo` did in pixel; `tpo_anchor` did too in 0 of them" in text
    assert "**Guard prevents degradation**: yes — `tpo` did in pixel, word; `tpo_anchor` did too in 0" in text
    assert "pixel: prior hallucination -0.050, CHAIR_i +0.020, recall +0.010" in text
    assert "| pixel-5 | tpo | 0.30 (0.80) | 0.100 | 0.100 | yes | yes | 40 | 0.60 | +2.00 |" in text


def test_fourth_check_compares_methods_at_matched_recall(tmp_path):
    from benchmarks.hallucination_world_v2.checks import gain as stability_gain

    # Every method's three runs lie at recall 0.7, 0.6, 0.5 with prior hallucination 0.4, 0.3, 0.2 less its
    # offset, and every frontier starts at SFT's (0.8, 0.5). Two methods then differ by d = their offsets'
    # difference at the levels 0.50 … 0.70 (21 levels) and by d × 0.9, 0.8, …, 0 at 0.71 … 0.80: D = d × 25.5 / 31.
    taper = 25.5 / 31
    offsets = {  # (tpo, dpo_anchor, tpo_anchor); dpo's is 0
        ("pixel", 6): (0.1, 0.0, 0.05),  # TPO gains, and keeps it anchored
        ("pixel", 7): (-0.1, 0.0, 0.0),  # TPO worse; its run at 1e-4 collapses (set below)
        ("word", 6): (0.1, 0.0, -0.05),  # TPO gains, loses it anchored
        ("word", 7): (0.2, 0.0, 0.2),  # TPO gains, keeps it anchored
    }
    records = []
    for (kind, seed), (tpo, dpo_anchor, tpo_anchor) in offsets.items():
        base = {"world_kind": kind, "world_seed": seed, "chair_i": 0.1}
        records.append({**base, "variant": "sft", "learning_rate": 0.0, "recall": 0.8, "prior_hallucination": 0.5})
        method_offsets = {"dpo": 0.0, "dpo_anchor": dpo_anchor, "tpo": tpo, "tpo_anchor": tpo_anchor}
        for method, offset in method_offsets.items():
            lrs = stability_gain.PROTOCOL.learning_rates[kind]
            for lr, recall, prior in zip(lrs, (0.7, 0.6, 0.5), (0.4, 0.3, 0.2), strict=True):
                record = {**base, "variant": method, "learning_rate": lr, "recall": recall}
                record["prior_hallucination"] = prior - offset
                if method.startswith("tpo"):
                    record.update(warning_step=None, recall_at_warning=None)
                records.append(record)
    by_key = {(r["world_kind"], r["world_seed"], r["variant"], r["learning_rate"]): r for r in records}
    by_key["pixel", 7, "tpo", 1e-4].update(recall=0.3, warning_step=30, recall_at_warning=0.5)  # below 0.4
    by_key["word", 7, "tpo_anchor", 1e-5].update(warning_step=10, recall_at_warning=0.7)  # degraded: no alarm

    for (kind, seed), (tpo, _, _) in offsets.items():
        anchored, span = stability_gain.matched_difference(records, kind, seed, "tpo_anchor", "dpo_anchor", "chair_i")
        assert anchored == pytest.approx(0.0) and span == (0.5, 0.8)
        if (kind, seed) != ("pixel", 7):
            d, _ = stability_gain.matched_difference(records, kind, seed, "tpo", "dpo", "prior_hallucination")
            assert d == pytest.approx(-tpo * taper)

    report = tmp_path / "STABILITY_4.md"
    stability_gain.write_report(records, report, 2)
    text = report.read_text()
    plain, anchored = -(0.1 + 0.1 + 0.2) / 3 * taper, -(0.05 - 0.05 + 0.2) / 3 * taper
    assert "**TPO has a gain** (D(tpo − dpo) < 0 on prior hallucination): 3 of 4 worlds (pixel 1 of 2, word 2" in text
    assert (
        f"**The anchor keeps TPO's gain**: no — the anchored gain is negative in 2 of the 3 worlds where TPO gained "
        f"(pixel-6, word-7); over them, mean D(tpo_anchor − dpo_anchor) {anchored:+.3f} against mean D(tpo − dpo) "
        f"{plain:+.3f} ({anchored / plain:.2f} of it)"
    ) in text
    assert "**Monitor warns before collapse** (lr 0.0001): yes — 1 of 1 collapsed TPO runs (pixel-7 tpo)" in text
    assert "**Guard prevents collapse** (lr 0.0001): yes — `tpo` collapsed in pixel-7; `tpo_anchor` did too in 0" in (
        text
    )
    assert "**TPO's own collapses** (`tpo` collapsed, `dpo` did not, lr 0.0001): 1 (pixel-7)" in text
    assert "**False alarms** (warned, not degraded; every learning rate): 0 of 24 TPO runs" in text
    assert "| pixel-7 | 0.0001 | tpo | 0.30 (0.80) | 0.300 | 0.100 | yes | yes | 30 | 0.50 |" in text
    word_6 = f"| word-6 | prior hallucination | {-0.1 * taper:+.3f} (0.50–0.80) | {0.05 * taper:+.3f} (0.50–0.80) |"
    assert word_6 in text


def hand_written_runs(check, other_rule: str, replayed: str) -> tuple[list[dict], dict]:
    """A two-rule check's records (SFT 0.8, DPO 0.7, every TPO run 0.78 and unwarned), and the same by key."""
    records = []
    for kind, lrs in check.TPO_RATES.items():
        for seed in check.PROTOCOL.world_seeds:
            base = {"world_kind": kind, "world_seed": seed}
            records += [
                {**base, "variant": "sft", "learning_rate": 0.0, "recall": 0.8},
                {**base, "variant": "dpo", "learning_rate": 1e-4, "recall": 0.7},
            ]
            for lr in lrs:
                for method in ("tpo", "tpo_anchor"):
                    unwarned = {"warnings": {"logged": [None, None], other_rule: [None, None]}, replayed: None}
                    records.append({**base, "variant": method, "learning_rate": lr, "recall": 0.78, **unwarned})
    return records, {(r["world_kind"], r["world_seed"], r["variant"], r["learning_rate"]): r for r in records}


def test_fifth_check_replays_both_rules_and_compares_them(tmp_path):
    from benchmarks.hallucination_world_v2.checks import floor as stability_floor

    nearly_certain = [entry(5, 0.1, 0.5, -0.1), entry(10, 0.1, 0.5, -0.3), entry(15, 0.1, 0.5, -1.5)]
    assert stability_floor.replayed_step(nearly_certain, 0.0) == 10  # -0.3 is below twice -0.1: 0.2 nats
    assert stability_floor.replayed_step(nearly_certain, 1.0) == 15  # 1.4 nats below the highest
    assert stability_floor.replayed_step([entry(5, 0.1, 0.2, -0.1), entry(10, 0.1, 0.2, -9.0)], 0.0) is None

    records, by_key = hand_written_runs(stability_floor, "doubling", "replayed_floor")
    # pixel-8 tpo at 1e-4 collapses (0.3 < 0.4): both rules warn, the doubling rule in time (0.6), the floor late
    by_key["pixel", 8, "tpo", 1e-4].update(recall=0.3, warnings={"logged": [40, 0.35], "doubling": [20, 0.6]})
    by_key["pixel", 8, "tpo", 1e-4]["replayed_floor"] = 40
    # word-9 tpo_anchor at 1e-5 keeps its recall: the doubling rule warns (a false alarm), the floor does not
    by_key["word", 9, "tpo_anchor", 1e-5]["warnings"]["doubling"] = [25, 0.79]
    # word-8 tpo at 3e-5 degrades (0.7 < 0.72) and neither rule warns; the replay disagrees with the log here
    by_key["word", 8, "tpo", 3e-5].update(recall=0.7, replayed_floor=15)
    report = tmp_path / "STABILITY_5.md"
    stability_floor.write_report(records, report, 2)
    text = report.read_text()
    assert "**Consistency**: the replayed floor rule names the monitor's logged step in 23 of 24 TPO runs: no" in text
    assert "**Floor rule**: warns before collapse no (0 of 1); false alarms 0 of 24; missed 1 of 2 degraded" in text
    assert "**Doubling rule**: warns before collapse yes (1 of 1); false alarms 1 of 24; missed 1 of 2" in text
    assert (
        "**The floor is kept** (fewer false alarms, and in time for every collapse the doubling rule was): no" in text
    )
    assert "yes — `tpo` collapsed in pixel-8; `tpo_anchor` did too in 0 of them. **TPO's own collapses** " in text
    assert "(`dpo` held): 1 (pixel-8)" in text
    assert "| pixel-8 | 0.0001 | tpo | 0.30 (0.80) | yes | yes | 40, 0.35 | 20, 0.60 | 0.70 |" in text


def per_step(chosen_logps: list[float], drift: float = 0.5) -> list[dict]:
    return [entry(step, 0.1, drift, logp) for step, logp in enumerate(chosen_logps, start=1)]


def test_sixth_check_replays_block_and_sliding_windows():
    from benchmarks.hallucination_world_v2.checks import window as stability_window

    # Steps 1-5 at -1.0; the fall starts at step 8. Window means by hand: sliding 4-8 = (4 * -1 + -6) / 5 = -2.0
    # (not below twice -1.0), 5-9 = (3 * -1 + 2 * -6) / 5 = -3.0 (below -2.0, and 2 nats): the sliding rule warns
    # at step 9; the block rule's 6-10 = (2 * -1 + 3 * -6) / 5 = -4.0 warns at step 10.
    history = per_step([-1.0] * 7 + [-6.0] * 8)
    assert stability_window.window_steps(history, "block") == [(5, -1.0, 0.5), (10, -4.0, 0.5), (15, -6.0, 0.5)]
    assert [end for end, _, _ in stability_window.window_steps(history, "sliding")] == list(range(5, 16))
    assert stability_window.replayed_step(history, "sliding") == 9
    assert stability_window.replayed_step(history, "block") == 10
    assert stability_window.replayed_step(per_step([-1.0] * 7 + [-6.0] * 8, drift=0.2), "sliding") is None
    with pytest.raises(ValueError, match="one logged entry per step"):
        stability_window.window_steps([entry(5, 0.1, 0.5), entry(10, 0.1, 0.5)], "block")


def test_sixth_check_sliding_rule_never_warns_after_the_block_rule():
    # STABILITY_PROTOCOL_6.md's claim, on random falls: the sliding rule reads every block window, with a highest
    # mean at least as high, so where the block rule warns the sliding rule has warned by then.
    import random

    from benchmarks.hallucination_world_v2.checks import window as stability_window

    draw = random.Random(0)
    compared = 0
    for _ in range(300):
        level, logps = -0.5, []
        for _ in range(40):
            level += draw.uniform(-0.6, 0.5)
            logps.append(min(level, -0.01))
        history = per_step(logps, drift=draw.uniform(0.0, 1.0))
        block, sliding = (stability_window.replayed_step(history, rule) for rule in ("block", "sliding"))
        if block is not None:
            compared += 1
            assert sliding is not None and sliding <= block
    assert compared > 50


def test_sixth_check_verdicts_on_hand_written_runs(tmp_path):
    from benchmarks.hallucination_world_v2.checks import window as stability_window

    records, by_key = hand_written_runs(stability_window, "sliding", "replayed_block")
    # pixel-10 tpo at 1e-4 collapses (0.3 < 0.4): the block rule warns late (0.35), the sliding rule 3 steps
    # earlier and in time (0.6)
    by_key["pixel", 10, "tpo", 1e-4].update(recall=0.3, warnings={"logged": [30, 0.35], "sliding": [27, 0.6]})
    by_key["pixel", 10, "tpo", 1e-4]["replayed_block"] = 30
    # word-11 tpo_anchor at 1e-5 keeps its recall: only the sliding rule warns (a false alarm)
    by_key["word", 11, "tpo_anchor", 1e-5]["warnings"]["sliding"] = [12, 0.79]
    report = tmp_path / "STABILITY_6.md"
    stability_window.write_report(records, report, 2)
    text = report.read_text()
    assert "**Consistency**: the replayed block rule names the monitor's logged step in 24 of 24 TPO runs: yes" in text
    assert "**Block rule**: warns before collapse no (0 of 1); false alarms 0 of 24; missed 0 of 1 degraded" in text
    assert "**Sliding rule**: warns before collapse yes (1 of 1); false alarms 1 of 24; missed 0 of 1" in text
    assert "**Steps earlier** (sliding rule, where both warned): pixel-10 tpo 0.0001: 3." in text
    assert "**The sliding rule is adopted** (in time for more collapses, at most one more false alarm): yes" in text
    assert "| pixel-10 | 0.0001 | tpo | 0.30 (0.80) | yes | yes | 30, 0.35 | 27, 0.60 | 0.70 |" in text
    assert "(`dpo` held): 1 (pixel-10)" in text

    # a second false alarm of the sliding rule alone (word-10 tpo at 3e-5) is one more than the protocol allows
    by_key["word", 10, "tpo", 3e-5]["warnings"]["sliding"] = [40, 0.77]
    stability_window.write_report(records, report, 2)
    assert "at most one more false alarm): no" in report.read_text()
