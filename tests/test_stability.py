"""The stability monitor's rule (``training/stability.py``) on hand-written logs."""

from types import SimpleNamespace

from tpo_plugin.training import stability
from tpo_plugin.training.stability import RunawayMonitor, runaway_message


def logs(chosen_logp: float, drift_chosen: float, drift_rejected: float) -> dict[str, float]:
    return {
        "loss": 0.3,
        "logps/chosen": chosen_logp,
        "tpo/score_drift_chosen": drift_chosen,
        "tpo/score_drift_rejected": drift_rejected,
        "tpo/weight_term_share": 0.2,
    }


def test_rule_needs_both_a_fallen_chosen_logp_and_a_drift():
    drift, best = stability.DRIFT_THRESHOLD, -2.0
    fallen = 2 * stability.NLL_GROWTH * best  # -8: the NLL grew fourfold
    assert runaway_message(logs(fallen, drift / 2, drift / 2), 10, best) is None  # fell, but scores stayed
    assert runaway_message(logs(0.9 * stability.NLL_GROWTH * best, 4 * drift, 4 * drift), 10, best) is None
    # the mean drift of both answers counts: one answer's drift alone past the threshold is not enough
    assert runaway_message(logs(fallen, 1.5 * drift, 0.0), 10, best) is None
    message = runaway_message(logs(fallen, 2 * drift, 2 * drift), 37, best)
    assert "step 37" in message and "fell from -2.00, the highest it reached, to -8.00" in message
    assert "pref_ftx" in message and "learning_rate" in message
    assert "checkpoints saved before step 37" in message  # the warning can come after the collapse


def test_rule_needs_a_fall_of_a_nat_when_the_chosen_answers_are_nearly_certain():
    drift, best = 4 * stability.DRIFT_THRESHOLD, -0.1
    assert runaway_message(logs(-0.9, drift, drift), 10, best) is None  # NLL nine times its lowest, 0.8 nats
    assert runaway_message(logs(-1.1, drift, drift), 10, best) is not None  # 1.0 nat: e times less likely
    assert runaway_message(logs(-1.9, drift, drift), 10, -1.0) is None  # a nat and more, but NLL not doubled


def test_rule_is_silent_without_the_monitor_keys():
    assert runaway_message({"loss": 0.3, "logps/chosen": -9.0, "tpo/score_chosen": 9.0}, 5, -1.0) is None


def state(step: int, history: list[dict]) -> SimpleNamespace:
    return SimpleNamespace(global_step=step, log_history=history)


def test_monitor_warns_once_naming_the_first_step(tpo_log_records):
    monitor, history = RunawayMonitor(), []
    fallen = logs(-5.0, 1.0, 1.0)
    for step, entry in ((5, logs(-2.0, 0.0, 0.0)), (10, fallen), (15, fallen), (20, {**fallen, "eval_loss": 1.0})):
        history.append({**entry, "step": step})  # the trainer appends a log to its history before on_log
        monitor.on_log(None, state(step, history), None, logs=entry)
    assert [record.getMessage().split(":")[0] for record in tpo_log_records] == ["Stage tpo, step 10"]


def test_monitor_compares_with_the_highest_chosen_logp_so_far(tpo_log_records):
    # TPO first raises its chosen answers' likelihood (-2.0 to -1.0), then loses it: -3.0 is not twice the first
    # value's NLL, but it is three times the lowest NLL the run reached.
    monitor, history = RunawayMonitor(), []
    for step, chosen_logp in ((5, -2.0), (10, -1.0), (15, -1.5), (20, -3.0)):
        entry = logs(chosen_logp, 0.5, 0.5)
        history.append({**entry, "step": step})
        monitor.on_log(None, state(step, history), None, logs=entry)
    assert [record.getMessage().split(":")[0] for record in tpo_log_records] == ["Stage tpo, step 20"]


def test_monitor_compares_with_the_whole_run_after_a_resume(tpo_log_records):
    # A resumed run's history starts with the logs before the checkpoint: -2.0, not the resumed run's -3.5.
    history = [{**logs(-2.0, 0.0, 0.0), "step": 5}, {**logs(-3.0, 0.5, 0.5), "step": 10}]
    resumed = logs(-4.5, 0.5, 0.5)  # above twice -3.5 but below twice -2.0
    history.append({**resumed, "step": 15})
    RunawayMonitor().on_log(None, state(15, history), None, logs=resumed)
    assert [record.getMessage().split(":")[0] for record in tpo_log_records] == ["Stage tpo, step 15"]
