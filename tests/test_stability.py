"""The stability monitor (``training/stability.py``): its rule on hand-written logs and batches, and its
wiring into a real training run."""

import json
from types import SimpleNamespace

import pytest

from tpo_plugin.training.run import stability
from tpo_plugin.training.run.stability import RunawayMonitor, runaway_message

from conftest import train_logs


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


ONE_PROCESS = SimpleNamespace(num_processes=1)  # what the monitor reads of an accelerator on one rank


def state(step: int, history: list[dict]) -> SimpleNamespace:
    return SimpleNamespace(global_step=step, log_history=history)


def train(
    monitor: RunawayMonitor, steps: dict[int, list[dict]], history: list[dict] = (), args=None, save_at=None
) -> None:
    """The trainer's calls: each step's batches recorded, then its step end (and its save at ``save_at``)."""
    first = min(steps) - 1  # the step the run starts from: 0, or a resumed checkpoint's
    monitor.on_train_begin(args, state(first, list(history)), None)
    for step, batches in steps.items():
        for batch in batches:
            monitor.record(batch)
        monitor.on_step_end(args, state(step, list(history)), None)
        if step == save_at:
            monitor.on_save(args, state(step, list(history)), None)


def warned_steps(records) -> list[str]:
    return [record.getMessage().split(":")[0] for record in records]


def test_monitor_warns_once_naming_the_first_window_that_ran_away(tpo_log_records):
    healthy, fallen = logs(-2.0, 0.0, 0.0), logs(-5.0, 1.0, 1.0)
    steps = {step: [healthy] for step in range(1, 6)} | {step: [fallen] for step in range(6, 21)}
    train(RunawayMonitor(ONE_PROCESS), steps)
    assert warned_steps(tpo_log_records) == ["Stage tpo, step 10"]


def test_monitor_reads_five_step_means_over_all_batches_whatever_is_logged(tpo_log_records):
    # No on_log at all: the monitor does not wait for logging_steps. One fallen step (8) leaves its window's mean
    # at (4 * -2.0 + -12.0) / 5 = -4.0, not below twice -2.0. Steps 11-15 hold two batches each (gradient
    # accumulation); their mean is (-1.0 + -9.0) / 2 = -5.0 with drift 1.0: fallen.
    steps = {step: [logs(-2.0, 0.0, 0.0)] for step in (1, 2, 3, 4, 5, 6, 7, 9, 10)} | {8: [logs(-12.0, 2.0, 2.0)]}
    steps |= {step: [logs(-1.0, 0.5, 0.5), logs(-9.0, 1.5, 1.5)] for step in range(11, 16)}
    monitor = RunawayMonitor(ONE_PROCESS)
    train(monitor, dict(sorted(steps.items())))
    assert warned_steps(tpo_log_records) == ["Stage tpo, step 15"]
    assert "fell from -2.00, the highest it reached, to -5.00" in tpo_log_records[0].getMessage()
    assert "rose by 1.00" in tpo_log_records[0].getMessage()


def test_monitor_compares_with_the_highest_window_so_far(tpo_log_records):
    # TPO first raises its chosen answers' likelihood (-2.0 to -1.0), then loses it: -3.0 is not twice the first
    # window's NLL, but it is three times the lowest NLL the run reached.
    steps = {}
    for window, chosen_logp in enumerate((-2.0, -1.0, -1.5, -3.0)):
        steps |= {5 * window + i: [logs(chosen_logp, 0.5, 0.5)] for i in range(1, 6)}
    train(RunawayMonitor(ONE_PROCESS), steps)
    assert warned_steps(tpo_log_records) == ["Stage tpo, step 20"]


def resume_args(output_dir, checkpoint_step: int) -> SimpleNamespace:
    checkpoint = output_dir / f"checkpoint-{checkpoint_step}"
    checkpoint.mkdir(parents=True, exist_ok=True)
    return SimpleNamespace(output_dir=str(output_dir), resume_from_checkpoint=str(checkpoint), should_save=True)


def test_monitor_resumed_from_its_checkpoint_decides_as_the_uninterrupted_run(tmp_path, tpo_log_records):
    # Steps 1-7 at -2.0, then -4.5: window 6-10 = (2 * -2.0 + 3 * -4.5) / 5 = -3.5 is not below twice -2.0;
    # window 11-15 at -4.5 is. A resume from checkpoint-8 must know steps 6-8 and the best, -2.0.
    steps = {step: [logs(-2.0 if step < 8 else -4.5, 0.5, 0.5)] for step in range(1, 16)}
    train(RunawayMonitor(ONE_PROCESS), steps)
    uninterrupted = warned_steps(tpo_log_records)
    assert uninterrupted == ["Stage tpo, step 15"]

    args = resume_args(tmp_path, 8)
    train(RunawayMonitor(ONE_PROCESS), {step: steps[step] for step in range(1, 9)}, args=args, save_at=8)
    seen = json.loads((tmp_path / "checkpoint-8" / stability.MONITOR_STATE_FILE).read_text())
    assert seen == {"warned": False, "best_chosen_logp": -2.0, "window": [[-2.0, 0.5, 0.5]] * 2 + [[-4.5, 0.5, 0.5]]}
    train(RunawayMonitor(ONE_PROCESS), {step: steps[step] for step in range(9, 16)}, args=args)
    assert warned_steps(tpo_log_records) == uninterrupted * 2

    # a run that had warned before its checkpoint does not warn again after the resume
    args = resume_args(tmp_path / "warned", 15)
    train(RunawayMonitor(ONE_PROCESS), steps, args=args, save_at=15)
    fallen_further = {step: [logs(-20.0, 2.0, 2.0)] for step in range(16, 21)}
    train(RunawayMonitor(ONE_PROCESS), fallen_further, args=args)
    assert warned_steps(tpo_log_records) == uninterrupted * 3


def test_monitor_resumed_from_an_older_checkpoint_compares_with_the_logged_history(tmp_path, tpo_log_records):
    # checkpoint-12 of an older tpo-plugin holds no monitor state; the history holds the logs before it (-2.0 at
    # its best). Steps 13-15 are the end of a window whose start was not seen: no decision; steps 16-20 (-4.5) are
    # above twice -3.5 but below twice -2.0, the whole run's best.
    history = [{**logs(-2.0, 0.0, 0.0), "step": 5}, {**logs(-3.5, 0.5, 0.5), "step": 10}]
    steps = {13: [logs(-9.0, 2.0, 2.0)], 14: [logs(-9.0, 2.0, 2.0)], 15: [logs(-9.0, 2.0, 2.0)]}
    steps |= {step: [logs(-4.5, 0.5, 0.5)] for step in range(16, 21)}
    train(RunawayMonitor(ONE_PROCESS), steps, history, args=resume_args(tmp_path, 12))
    assert warned_steps(tpo_log_records) == ["Stage tpo, step 20"]
    assert "fell from -2.00" in tpo_log_records[0].getMessage()


def test_monitor_is_silent_and_keeps_nothing_without_the_monitor_keys(tpo_log_records):
    # tpo_weighting: multiplicative logs no score drift: nothing to watch, and no batch is kept.
    monitor = RunawayMonitor(ONE_PROCESS)
    unwatched = {"loss": 0.3, "logps/chosen": -9.0, "tpo/score_chosen": 9.0}
    train(monitor, {step: [unwatched] for step in range(1, 11)})
    assert warned_steps(tpo_log_records) == [] and monitor._batch_values == [] and monitor._window == []


@pytest.mark.e2e
def test_a_training_run_hands_every_batch_to_the_monitor(
    model_dirs, dataset_dir, tmp_path, monkeypatch, tpo_log_records
):
    # With the thresholds opened (every window "runs away") the warning names the end of the first window, step 5,
    # not the first logged step, and its value is the mean of the five steps LLaMA-Factory logged on its own,
    # over two batches a step (gradient accumulation).
    from llamafactory.train.tuner import run_exp

    from conftest import train_config

    monkeypatch.setattr(stability, "NLL_GROWTH", 0.0)
    monkeypatch.setattr(stability, "NLL_FALL", float("-inf"))
    monkeypatch.setattr(stability, "DRIFT_THRESHOLD", float("-inf"))
    output_dir = tmp_path / "out"
    config = train_config(
        model_dirs["qwen2_vl"],
        "qwen2_vl",
        dataset_dir,
        output_dir,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=2,
        max_steps=6,
    )
    run_exp(args=config)

    warnings = [record.getMessage() for record in tpo_log_records if "the chosen answers' mean" in record.getMessage()]
    assert [message.split(":")[0] for message in warnings] == ["Stage tpo, step 5"]
    logged = [entry["logps/chosen"] for entry in train_logs(output_dir)]
    assert len(logged) == 6
    window_mean = sum(logged[:5]) / 5
    assert f"to {window_mean:.2f} while" in warnings[0]
