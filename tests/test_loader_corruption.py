"""The collator builds the corrupted images' tensors, keyed by the step each batch trains at (or by the sample,
with `tpo_noise_per: sample`), so `dataloader_num_workers` overlaps them with the training step; the losses are
those of the trainer building them in the step, also over several epochs with gradient accumulation and after
a resume."""

import pytest

import tpo_plugin.training.batch.collator
from tpo_plugin.training.batch.collator import TPODataCollatorWithPadding
from tpo_plugin.training.batch.corruption import ImageCorrupter
from tpo_plugin.training.batch.keys import CORRUPTED_INPUTS_KEY, NOISE_KEY, STEP_FIELD
from tpo_plugin.training.batch.step_keys import StepKeyedDataset, StepKeyedSampler

from conftest import assert_resumed_steps_equal, train_config, train_logs


COMPARED = ("loss", "grad_norm", "rewards/margins", "logps/chosen", "tpo/score_chosen", "tpo/weight_rejected")
# 8 pairs, 2 per batch, 2 batches per step: 2 steps per epoch, so 5 steps run into a third epoch
LOADER_KEYS = dict(max_steps=5, per_device_train_batch_size=2, gradient_accumulation_steps=2)


def test_sampler_pairs_each_index_with_the_step_it_trains_at():
    steps_done = [0]
    sampler = StepKeyedSampler([5, 3, 0, 7, 1, 2, 6, 4], samples_per_step=3, first_step_of_epoch=lambda: steps_done[0])
    assert list(sampler) == [(5, 0), (3, 0), (0, 0), (7, 1), (1, 1), (2, 1), (6, 2), (4, 2)]
    steps_done[0] = 6  # read when an epoch's iteration starts
    assert [step for _, step in sampler] == [6, 6, 6, 7, 7, 7, 8, 8]
    assert len(sampler) == 8


def test_dataset_adds_the_step_only_to_keyed_reads():
    dataset = StepKeyedDataset([{"a": 1}, {"a": 2}])
    assert dataset[1] == {"a": 2} and dataset[(0, 4)] == {"a": 1, STEP_FIELD: 4} and len(dataset) == 2


@pytest.mark.e2e
@pytest.mark.parametrize(
    "tpo_keys",
    [{"tpo_noise_per": "step"}, {"tpo_noise_per": "sample"}, {"tpo_noise_per": "sample", "tpo_precompute_ref": True}],
)
def test_corrupting_in_the_data_loader_gives_the_losses_of_corrupting_in_the_step(
    tpo_keys, model_dirs, dataset_dir, tmp_path, monkeypatch
):
    from llamafactory.train.tuner import run_exp

    calls_here = record_main_process_corruption(monkeypatch)
    collate = TPODataCollatorWithPadding.__call__
    runs, calls = {}, {}
    for name, workers in (("in_step", 0), ("in_loader", 0), ("in_workers", 2)):
        if name == "in_step":  # today's trainer: the batch carries no corrupted tensors, the step builds them

            def collate_without_corruption(self, features):
                batch = collate(self, features)
                batch.pop(CORRUPTED_INPUTS_KEY, None)
                batch[NOISE_KEY] = None
                return batch

            monkeypatch.setattr(
                tpo_plugin.training.batch.collator.TPODataCollatorWithPadding, "__call__", collate_without_corruption
            )
        else:
            monkeypatch.setattr(tpo_plugin.training.batch.collator.TPODataCollatorWithPadding, "__call__", collate)
        calls_here.clear()
        config = train_config(
            model_dirs["qwen2_vl"],
            "qwen2_vl",
            dataset_dir,
            tmp_path / name,
            dataloader_num_workers=workers,
            **LOADER_KEYS,
            **tpo_keys,
        )
        run_exp(args=config)
        runs[name], calls[name] = train_logs(tmp_path / name), len(calls_here)

    # precomputation scores the 8 pairs in one batch (per_device_eval_batch_size 8) in the main process; with
    # workers the main process corrupts nothing else, so the collator knew every batch's step
    before_training = 1 if "tpo_precompute_ref" in tpo_keys else 0
    assert calls["in_workers"] == before_training
    assert calls["in_loader"] - before_training >= 10  # 10 batches, built by the collator in this process
    assert [entry["step"] for entry in runs["in_step"]] == [1, 2, 3, 4, 5]
    for name in ("in_loader", "in_workers"):
        for expected, got in zip(runs["in_step"], runs[name], strict=True):
            for key in COMPARED:
                assert got[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-7), (name, key)


@pytest.mark.e2e
def test_a_resumed_run_corrupts_in_the_workers_with_the_steps_noise(model_dirs, dataset_dir, tmp_path, monkeypatch):
    from llamafactory.train.tuner import run_exp

    calls_here = record_main_process_corruption(monkeypatch)
    common = dict(dataloader_num_workers=2, save_strategy="steps", save_steps=3, **LOADER_KEYS)
    uninterrupted = tmp_path / "uninterrupted"
    run_exp(args=train_config(model_dirs["qwen2_vl"], "qwen2_vl", dataset_dir, uninterrupted, **common))
    calls_here.clear()
    resumed = tmp_path / "resumed"
    checkpoint = str(uninterrupted / "checkpoint-3")  # inside the second epoch
    run_exp(
        args=train_config(
            model_dirs["qwen2_vl"], "qwen2_vl", dataset_dir, resumed, resume_from_checkpoint=checkpoint, **common
        )
    )

    assert calls_here == []  # the workers knew the steps of the resumed epoch's remaining batches
    assert_resumed_steps_equal(uninterrupted, resumed, 3, [4, 5], COMPARED)


def record_main_process_corruption(monkeypatch) -> list[int]:
    """A list that grows by one at each corrupted_inputs call in this (the main) process; a worker's are not seen."""
    calls_here = []
    corrupted_inputs = ImageCorrupter.corrupted_inputs

    def recording(self, *args, **kwargs):
        calls_here.append(1)
        return corrupted_inputs(self, *args, **kwargs)

    monkeypatch.setattr(ImageCorrupter, "corrupted_inputs", recording)
    return calls_here
