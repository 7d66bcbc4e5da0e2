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
