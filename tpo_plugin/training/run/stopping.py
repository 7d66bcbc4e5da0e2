"""Stopping a run without losing it: SIGINT/SIGTERM finish the current step and write a checkpoint.

A signal that lands while the trainer writes a checkpoint would otherwise leave a half-written
``checkpoint-N`` that ``resume_from_checkpoint`` (and LLaMA-Factory's automatic resume) then picks up.
Here the first SIGINT or SIGTERM only sets a flag; at the end of the step every rank learns whether any
rank was signalled, and they all save a checkpoint and stop together. A second signal acts at once.
"""

import signal
from typing import Any, Callable

import torch
from transformers import TrainerCallback


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def any_rank(accelerator: Any, flag: torch.Tensor | bool) -> bool:
    """True if ``flag`` is true on any rank; every rank must call this, so that all ranks stop together."""
    if accelerator.num_processes == 1:
        return bool(flag)
    flag = torch.as_tensor(flag, dtype=torch.float32, device=accelerator.device)
    return accelerator.reduce(flag, "sum").item() > 0


class PassInterrupted(Exception):
    """A stop signal ended a pass over the data before training (the reference scores); nothing of it is kept."""

    def __init__(self, done: int, total: int):
        super().__init__(f"after {done} of {total} batches")
        self.done, self.total = done, total


def stop_between_batches(accelerator: Any, requested: Callable[[], bool], done: int, total: int) -> None:
    """Raise :class:`PassInterrupted` on every rank once any rank was asked to stop (every rank must call this)."""
    if any_rank(accelerator, requested()):
        raise PassInterrupted(done, total)


class StopOnSignalCallback(TrainerCallback):
    """Turns SIGINT/SIGTERM into "save a checkpoint at the end of this step, then stop"."""

    def __init__(self, accelerator: Any):
        self.accelerator = accelerator
        self.received: signal.Signals | None = None  # on the rank that got the signal
        self.stopped = False  # on every rank, once any rank got one
        self._previous_handlers: dict[int, Any] = {}

    def requested(self) -> bool:
        """Whether this rank got a stop signal: passes that run before the first step check it between batches."""
        return self.received is not None

    def exit_code(self) -> int:
        """The shell's code for a run ended by the signal (128 + its number; SIGTERM's on a rank not signalled)."""
        return 128 + int(self.received or signal.SIGTERM)

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum)
        for stop_signal, handler in self._previous_handlers.items():  # a second signal acts at once
            signal.signal(stop_signal, handler)

    def on_train_begin(self, args, state, control, **kwargs):
        self._previous_handlers = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}

    def on_step_end(self, args, state, control, **kwargs):
        if any_rank(self.accelerator, self.received is not None):
            self.stopped = True
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        for stop_signal, handler in self._previous_handlers.items():
            signal.signal(stop_signal, handler)
        self._previous_handlers = {}
