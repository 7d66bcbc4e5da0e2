"""The stability monitor's rule (``training/stability.py``) on hand-written logs."""

from tpo_plugin.training import stability
from tpo_plugin.training.stability import RunawayMonitor, runaway_message


def logs(drift_chosen: float, drift_rejected: float, share: float) -> dict[str, float]:
    return {
        "loss": 0.3,
        "tpo/score_drift_chosen": drift_chosen,
        "tpo/score_drift_rejected": drift_rejected,
        "tpo/weight_term_share": share,
    }


def test_rule_needs_both_a_large_share_and_a_large_drift():
    share, drift = stability.SHARE_THRESHOLD, stability.DRIFT_THRESHOLD
    assert runaway_message(logs(2 * drift, 2 * drift, share / 2), 10) is None  # drift, but the margin is DPO's
    assert runaway_message(logs(drift / 2, drift / 2, (1 + share) / 2), 10) is None  # share, but scores stayed
    # the mean drift of both answers counts: one answer's drift alone past the threshold is not enough
    assert runaway_message(logs(1.5 * drift, 0.0, (1 + share) / 2), 10) is None
    message = runaway_message(logs(2 * drift, 2 * drift, (1 + share) / 2), 37)
    assert "step 37" in message and "tpo_weight_clip" in message and "learning_rate" in message


def test_rule_is_silent_without_the_monitor_keys():
    assert runaway_message({"loss": 0.3, "tpo/score_chosen": 9.0}, 5) is None  # multiplicative: nothing logged


def test_monitor_warns_once_naming_the_first_step(tpo_log_records):
    monitor = RunawayMonitor()
    high = logs(3 * stability.DRIFT_THRESHOLD, 3 * stability.DRIFT_THRESHOLD, (1 + stability.SHARE_THRESHOLD) / 2)
    for step, entry in ((5, logs(0.0, 0.0, 0.1)), (10, high), (15, high), (20, {**high, "eval_loss": 1.0})):
        monitor.on_log(None, type("State", (), {"global_step": step})(), None, logs=entry)
    assert [record.getMessage().split(":")[0] for record in tpo_log_records] == ["Stage tpo, step 10"]
