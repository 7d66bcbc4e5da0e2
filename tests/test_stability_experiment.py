"""The stability experiment's rules (``benchmarks/hallucination_world_v2/stability.py``) on hand-written logs."""

from benchmarks.hallucination_world_v2 import stability


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
    from benchmarks.hallucination_world_v2 import stability_heldout
    from tpo_plugin.training.stability import runaway_message

    logs = {"loss": 0.3, "logps/chosen": -9.0, "tpo/score_drift_chosen": 2.0, "tpo/score_drift_rejected": 1.0}
    log = tmp_path / "train.log"
    log.write_text(f"[WARNING|2026-12-03] llamafactory.train.tpo:143 >> {runaway_message(logs, 35, -2.0)}\n")
    assert stability_heldout.warning_step(log) == 35
    log.write_text("[INFO] {'loss': 0.3, 'logps/chosen': -9.0}\n")
    assert stability_heldout.warning_step(log) is None


def test_third_check_verdicts_on_hand_written_runs(tmp_path):
    from benchmarks.hallucination_world_v2 import stability_anchor

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
    stability_anchor.write_report(records, report, 60.0, 2)
    text = report.read_text()
    assert "**Monitor warns before collapse**: yes — 1 of 1 collapsed TPO runs" in text
    assert "Degraded TPO runs: 2, of which 1 warned while recall was still at least 0.9" in text
    assert "**Monitor's false alarms** (warned, not degraded): 1 of 4 TPO runs" in text
    assert "**Guard prevents collapse**: yes — `tpo` did in pixel; `tpo_anchor` did too in 0 of them" in text
    assert "**Guard prevents degradation**: yes — `tpo` did in pixel, word; `tpo_anchor` did too in 0" in text
    assert "pixel: prior hallucination -0.050, CHAIR_i +0.020, recall +0.010" in text
    assert "| pixel-5 | tpo | 0.30 (0.80) | 0.100 | 0.100 | yes | yes | 40 | 0.60 | +2.00 |" in text
