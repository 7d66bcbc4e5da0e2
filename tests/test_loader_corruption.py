"""With `tpo_noise_per: sample` the collator builds the corrupted images' tensors, so `dataloader_num_workers`
overlaps them with the training step; the losses are those of the trainer building them in the step."""

import pytest

import tpo_plugin.training.collator
from tpo_plugin.training.collator import TPODataCollatorWithPadding
from tpo_plugin.training.corruption import ImageCorrupter

from conftest import train_config, train_logs


pytestmark = pytest.mark.e2e

COMPARED = ("loss", "grad_norm", "rewards/margins", "logps/chosen", "tpo/score_chosen", "tpo/weight_rejected")


@pytest.mark.parametrize("tpo_keys", [{}, {"tpo_precompute_ref": True}])
def test_corrupting_in_the_data_loader_gives_the_losses_of_corrupting_in_the_step(
    tpo_keys, model_dirs, dataset_dir, tmp_path, monkeypatch
):
    from llamafactory.train.tuner import run_exp

    calls_here = []  # corrupted_inputs calls in this (the main) process; a loader worker's are not seen here
    corrupted_inputs = ImageCorrupter.corrupted_inputs

    def recording(self, *args, **kwargs):
        calls_here.append(1)
        return corrupted_inputs(self, *args, **kwargs)

    monkeypatch.setattr(ImageCorrupter, "corrupted_inputs", recording)
    collate = TPODataCollatorWithPadding.__call__
    runs, calls = {}, {}
    for name, workers in (("in_step", 0), ("in_loader", 0), ("in_workers", 2)):
        if name == "in_step":  # today's trainer: the batch carries no corrupted tensors, the step builds them

            def collate_without_corruption(self, features):
                self.image_corrupter.noise_per = "step"  # the collator then leaves the corruption to the step
                try:
                    return collate(self, features)
                finally:
                    self.image_corrupter.noise_per = "sample"

            monkeypatch.setattr(
                tpo_plugin.training.collator.TPODataCollatorWithPadding, "__call__", collate_without_corruption
            )
        else:
            monkeypatch.setattr(tpo_plugin.training.collator.TPODataCollatorWithPadding, "__call__", collate)
        calls_here.clear()
        config = train_config(
            model_dirs["qwen2_vl"],
            "qwen2_vl",
            dataset_dir,
            tmp_path / name,
            max_steps=3,
            tpo_noise_per="sample",
            dataloader_num_workers=workers,
            **tpo_keys,
        )
        run_exp(args=config)
        runs[name], calls[name] = train_logs(tmp_path / name), len(calls_here)

    # precomputation scores the 8 pairs in one batch (per_device_eval_batch_size 8) in the main process; the
    # loader may collate one batch ahead of the last step
    before_training = 1 if tpo_keys else 0
    assert calls["in_step"] == 3 + before_training and calls["in_workers"] == before_training
    assert calls["in_loader"] - before_training in (3, 4)
    for name in ("in_loader", "in_workers"):
        for expected, got in zip(runs["in_step"], runs[name], strict=True):
            for key in COMPARED:
                assert got[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-7), (name, key)
