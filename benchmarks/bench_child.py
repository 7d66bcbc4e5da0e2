"""Runs inside each benchmark child, then hands over to ``llamafactory.cli.main()`` (``llamafactory-cli train``).

The harness starts ``python -c "...; import bench_child; bench_child.main()" train <recipe.yaml>`` with:

- ``TPO_BENCH_RESULT``: where :class:`StepTimer` writes the step times, peak memory and logs as JSON;
- ``TPO_BENCH_TRAINER=reference_structure``: train ``stage: tpo`` with
  :class:`reference_structure.ReferenceStructureTPOTrainer` instead of the plugin's trainer.

Nothing in ``tpo_plugin`` is edited: the timer joins the callbacks LLaMA-Factory builds for every stage, and the
reference-structure run hands its trainer class to ``run_tpo`` (the run builder's ``trainer_class``). The child
ends right after training (``os._exit``): saving a 2 B model is not part of what is measured, and can take longer
than the steps.
"""

import json
import os
import re
import sys
import time

import torch
from transformers import TrainerCallback


RESULT_ENV = "TPO_BENCH_RESULT"
TRAINER_ENV = "TPO_BENCH_TRAINER"
REFERENCE_STRUCTURE = "reference_structure"


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step, peak memory over training, and the training logs.

    ``step_seconds``: ``on_step_begin`` to ``on_step_end`` (forwards, backward, optimizer), after a
    CUDA synchronize at both ends. ``wall_seconds``: from one ``on_step_end`` to the next, which adds
    fetching and collating the batch (and the images) and logging. ``seconds_before_first_step``: from
    ``on_train_begin`` to the first ``on_step_begin``, which holds ``tpo_precompute_ref``'s reference pass.
    """

    def __init__(self, result_path: str):
        self.result_path = result_path
        self.cuda = False  # whether training runs on a CUDA device; known at on_train_begin
        self.step_seconds: list[float] = []
        self.wall_seconds: list[float] = []
        self.logs: list[dict] = []
        self.trainer_class = None  # set by install(): the class that really trained
        self._step_start = self._last_step_end = None

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self.cuda = args.device.type == "cuda"
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self.rss_peak_reset = reset_peak_rss()
        self.rss_at_train_begin = process_memory("VmRSS")
        self._last_step_end = self._train_begin = self._now()
        self.seconds_before_first_step = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_start = self._now()
        if self.seconds_before_first_step is None:  # later callbacks' on_train_begin (tpo_precompute_ref's pass)
            self.seconds_before_first_step = self._step_start - self._train_begin

    def on_step_end(self, args, state, control, **kwargs):
        now = self._now()
        self.step_seconds.append(now - self._step_start)
        self.wall_seconds.append(now - self._last_step_end)
        self._last_step_end = now

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.logs.append({"step": state.global_step, **logs})

    def on_train_end(self, args, state, control, **kwargs):
        result = {
            "step_seconds": self.step_seconds,
            "wall_seconds": self.wall_seconds,
            "seconds_before_first_step": self.seconds_before_first_step,
            "logs": self.logs,
            "peak_rss_bytes": process_memory("VmHWM"),  # since train begin, unless the reset failed
            "peak_rss_since_train_begin": self.rss_peak_reset,
            "rss_at_train_begin_bytes": self.rss_at_train_begin,
            "batch_pairs": args.per_device_train_batch_size * args.gradient_accumulation_steps,
            "trainer": self.trainer_class,
        }
        if self.cuda:
            result["device"] = torch.cuda.get_device_name()
            result["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
            result["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
        with open(self.result_path, "w") as file:
            json.dump(result, file)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def process_memory(field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of this process in bytes, from /proc (Linux)."""
    with open("/proc/self/status") as status:
        return int(re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE).group(1)) * 1024


def reset_peak_rss() -> bool:
    """Restart ``VmHWM`` from the current RSS (Linux >= 4.0), so the peak covers training only."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def install(result_path: str, trainer: str = "") -> None:
    """Add the timer to every run's callbacks and, if asked, train ``stage: tpo`` with the reference-structure
    trainer."""
    import tpo_plugin

    tpo_plugin.install()  # what the .pth start-up file does, in case this interpreter did not read it
    from llamafactory.train import tuner  # importing it applies tpo_plugin's patches first
    from llamafactory.train.dpo.trainer import CustomDPOTrainer  # the base of the DPO and both TPO trainers

    training_function, trainer_init, run_dpo = tuner._training_function, CustomDPOTrainer.__init__, tuner.run_dpo
    timer = StepTimer(result_path)

    def training_function_with_timer(config):
        config["callbacks"] = [*(config.get("callbacks") or []), timer]
        return training_function(config)

    def trainer_init_recording_class(self, *args, **kwargs):
        timer.trainer_class = type(self).__name__
        trainer_init(self, *args, **kwargs)

    def run_with_reference_structure(*args, **kwargs):
        # The plugin's route to run_tpo (LLaMA-Factory's dispatch hands TPO runs to run_dpo) passes run_tpo's
        # keywords on: the run builder trains with this trainer class, everything else unchanged.
        from reference_structure import ReferenceStructureTPOTrainer

        return run_dpo(*args, trainer_class=ReferenceStructureTPOTrainer, **kwargs)

    tuner._training_function = training_function_with_timer
    CustomDPOTrainer.__init__ = trainer_init_recording_class
    if trainer == REFERENCE_STRUCTURE:
        tuner.run_dpo = run_with_reference_structure
    elif trainer:
        raise ValueError(f"{TRAINER_ENV}={trainer!r}: expected {REFERENCE_STRUCTURE!r} or nothing.")


def main() -> None:
    install(os.environ[RESULT_ENV], os.environ.get(TRAINER_ENV, ""))
    from llamafactory.cli import main as cli_main

    cli_main()
