"""Which optimizer step each training sample trains at, known when the data loader reads it.

With ``tpo_noise_per: step`` an image's noise is keyed by the global step (docs/method.md §1), so the collator can
corrupt a batch's images (in the data loader's workers, off the training step's path) only if it knows the step
the batch will train at. The loader's index sampler knows it: its n-th index of an epoch trains at the epoch's
first step plus n // (samples per optimizer step), since the batch sampler (and, with several processes,
Accelerate's round-robin shard) cuts the sampler's order into consecutive batches and each optimizer step
takes ``gradient_accumulation_steps`` of them per process. :class:`StepKeyedSampler` yields ``(index, step)``
and :class:`StepKeyedDataset` reads such keys, adding the step to the sample; :class:`StepKeyedTraining` puts
both into the trainer's training loader.

Where this arithmetic does not hold (the repeated samples that even out the last batches across processes, an
unusual loader), the collator's step is simply wrong: :meth:`TPODataCollatorWithPadding.unpack` compares it with
the step the trainer is at and builds the corrupted inputs itself when they differ, so results never depend on
it, only speed does.
"""

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from datasets import Dataset

from .keys import STEP_FIELD


class StepKeyedDataset(torch.utils.data.Dataset):
    """The training set, read by plain indices (unchanged samples) or by ``(index, step)`` keys."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Any) -> dict[str, Any]:
        if isinstance(key, tuple):
            index, step = key
            return {**self.dataset[index], STEP_FIELD: step}
        return self.dataset[key]


class StepKeyedSampler(torch.utils.data.Sampler):
    """The loader's own sampler (same order), each index paired with the optimizer step it trains at."""

    def __init__(self, sampler: Any, samples_per_step: int, first_step_of_epoch: Callable[[], int]):
        self.sampler = sampler
        self.samples_per_step = samples_per_step
        self.first_step_of_epoch = first_step_of_epoch  # read when an epoch's iteration starts

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        first_step = self.first_step_of_epoch()
        for position, index in enumerate(self.sampler):
            yield index, first_step + position // self.samples_per_step

    def set_epoch(self, epoch: int) -> None:
        """Accelerate seeds each epoch's shuffle through this; the wrapped sampler must receive it."""
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)


class StepKeyedTraining:
    """Trainer mix-in: the usual training loader, its sampler wrapped so that each sample carries its step.

    The collator then corrupts a batch's images with the step's noise in the loader's workers. Accelerate's
    ``set_sampler`` replaces the index sampler under its batch sampler (and its process shard), after it has made
    the sampler seedable, so the data order is unchanged.
    """

    def __init__(self, *args, train_dataset: Any = None, **kwargs):
        if isinstance(train_dataset, Dataset):  # read by (index, step) keys: get_train_dataloader
            train_dataset = StepKeyedDataset(train_dataset)
        super().__init__(*args, train_dataset=train_dataset, **kwargs)

    def get_train_dataloader(self):
        loader = super().get_train_dataloader()
        sampler = loader.get_sampler() if hasattr(loader, "get_sampler") else None
        if sampler is None or not isinstance(loader.dataset, StepKeyedDataset):  # streamed data, another loader:
            return loader  # each batch is corrupted in its step (TPODataCollatorWithPadding.unpack)

        accumulation = self.args.gradient_accumulation_steps
        updates_per_epoch = max(math.ceil(len(loader) / accumulation), 1)  # as transformers' Trainer counts them
        samples_per_step = self._train_batch_size * self.accelerator.num_processes * accumulation
        loader.set_sampler(
            StepKeyedSampler(
                sampler,
                samples_per_step,
                # The epoch's first step, also when a resumed run starts inside the epoch.
                lambda: self.state.global_step // updates_per_epoch * updates_per_epoch,
            )
        )
        return loader
