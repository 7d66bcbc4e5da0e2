"""`tpo_precompute_ref`: the reference model's token scores computed once before training give the losses of
the live reference passes (with one fixed corrupted copy per image, `tpo_noise_per: sample`), the reference
never runs during training, a separate reference model is freed, a resume reuses the stored scores and a
change of what they depend on recomputes them."""

import dataclasses

import pytest
import torch

import tpo_plugin.training.trainer
from tpo_plugin.method.objective import TokenScores
from tpo_plugin.training.reference.scores import (
    NOT_IDENTITY,
    SCORES_FILE,
    ReferenceScores,
    identity_digest,
    pair_values,
    reference_identity,
)

from conftest import log_history, run_cli, train_config, train_logs, write_yaml


COMPARED = ("loss", "grad_norm", "rewards/chosen", "rewards/margins", "logps/rejected", "tpo/weight_rejected")


def test_stored_values_scatter_back_into_any_batch_layout():
    # two pairs; the second without an image keeps only its clean values
    mask = torch.tensor([[0, 1, 1, 0], [0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0]], dtype=torch.bool)
    logit, logp = torch.arange(16.0).view(4, 4), -torch.arange(16.0).view(4, 4)
    clean, corrupted = (
        TokenScores(logit * mask, logp * mask, mask),
        TokenScores(logit / 2 * mask, logp / 2 * mask, mask),
    )
    values = pair_values(clean, corrupted, torch.tensor([True, False, True, False]))
    assert values[0][0].tolist() == [[1.0, 2.0], [-1.0, -2.0], [0.5, 1.0], [-0.5, -1.0]]
    assert values[1][1].tolist() == [[14.0], [-14.0]]  # rejected row of pair 1: clean only

    # the same pairs in another batch: swapped order, other padding
    store = ReferenceScores("digest", {"train/0": values[0], "train/1": values[1]})
    other_mask = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 0, 1, 0], [0, 1, 1, 0, 0]], dtype=torch.bool)
    ref_clean, ref_corrupted = store.token_scores(["train/1", "train/0"], other_mask)
    assert ref_clean.logit[1][other_mask[1]].tolist() == [1.0, 2.0]
    assert ref_corrupted.logp[3][other_mask[3]].tolist() == [-4.0, -4.5]
    assert ref_corrupted.logit[0].abs().sum().item() == 0.0  # pair 1 has no corrupted values

    with pytest.raises(RuntimeError, match="pair train/0 \\(chosen\\) cover 2 tokens, but the batch has 1"):
        store.token_scores(["train/0", "train/1"], torch.tensor([[1, 0], [1, 0], [1, 1], [1, 0]], dtype=torch.bool))


def recording_reference_passes(monkeypatch) -> list[bool]:
    """For every reference forward: whether the trainer already had stored reference scores at that time."""
    calls = []
    token_scores = tpo_plugin.training.trainer.CustomTPOTrainer._token_scores

    def recording(self, model, inputs, labels, passes=1, reference=False):
        if reference:
            calls.append(self.reference_scores is not None)
        return token_scores(self, model, inputs, labels, passes, reference)

    monkeypatch.setattr(tpo_plugin.training.trainer.CustomTPOTrainer, "_token_scores", recording)
    return calls


@pytest.mark.e2e
@pytest.mark.parametrize("finetuning_type", ["lora", "full"])
def test_precomputed_reference_scores_give_the_live_losses_over_two_epochs(
    finetuning_type, model_dirs, dataset_dir, tmp_path, monkeypatch
):
    from llamafactory.train.tuner import run_exp

    freed = []
    use_scores = tpo_plugin.training.trainer.CustomTPOTrainer.use_reference_scores

    def recording_use(self, scores):
        use_scores(self, scores)
        freed.append(self.ref_model is None)

    monkeypatch.setattr(tpo_plugin.training.trainer.CustomTPOTrainer, "use_reference_scores", recording_use)
    reference_calls = recording_reference_passes(monkeypatch)
    runs = {}
    for precompute in (False, True):
        # 8 pairs, 2 per step: 6 steps are one and a half epochs, so pairs come back in another batch
        config = train_config(
            model_dirs["qwen2_vl"],
            "qwen2_vl",
            dataset_dir,
            tmp_path / f"precompute-{precompute}",
            finetuning_type=finetuning_type,
            max_steps=6,
            tpo_noise_per="sample",
            tpo_precompute_ref=precompute,
            per_device_eval_batch_size=2,
        )
        if finetuning_type == "full":
            config.pop("lora_target")
        reference_calls.clear()
        run_exp(args=config)
        runs[precompute] = train_logs(tmp_path / f"precompute-{precompute}")
        if precompute:
            # 8 pairs in batches of per_device_eval_batch_size, before training; none during it
            assert reference_calls == [False] * 4
            assert freed == [True]
            assert (tmp_path / "precompute-True" / SCORES_FILE).is_file()
        else:
            assert reference_calls == [False] * 6

    assert len(runs[True]) == len(runs[False]) == 6
    for live, stored in zip(runs[False], runs[True], strict=True):
        for key in COMPARED:
            assert stored[key] == pytest.approx(live[key], rel=1e-5, abs=1e-6), key


def parsed_identity(model_dir, **overrides) -> dict:
    from llamafactory.hparams import get_train_args

    config = {
        "model_name_or_path": str(model_dir), "stage": "tpo", "do_train": True, "finetuning_type": "lora",
        "dataset": "tiny_pairs", "template": "qwen2_vl", "output_dir": "unused", "report_to": "none",
        "tpo_noise_per": "sample", "tpo_precompute_ref": True, **overrides,
    }  # fmt: skip
    model_args, data_args, training_args, finetuning_args, _ = get_train_args(config)
    return reference_identity(model_args, data_args, training_args, finetuning_args, {}, "data")


def test_every_model_argument_is_part_of_the_identity(model_dirs):
    from llamafactory.hparams import ModelArguments

    identity = parsed_identity(model_dirs["qwen2_vl"])
    expected = {field.name for field in dataclasses.fields(ModelArguments)} - NOT_IDENTITY
    assert expected <= set(identity["model_arguments"])
    assert not NOT_IDENTITY & set(identity["model_arguments"])  # no hub token is ever written into the store


@pytest.mark.parametrize(
    "changes",
    [
        {"quantization_bit": 4, "quantization_type": "fp4"},  # against nf4: reused stale scores in issue #34
        {"add_special_tokens": "<extra_0>", "resize_vocab": True},
        {"image_max_pixels": 50176},
        {"model_revision": "other"},
        {"upcast_layernorm": True},
    ],
)
def test_a_changed_model_argument_changes_the_digest(changes, model_dirs):
    quantized = {"quantization_bit": 4} if "quantization_bit" in changes else {}
    base = identity_digest(parsed_identity(model_dirs["qwen2_vl"], **quantized))
    assert identity_digest(parsed_identity(model_dirs["qwen2_vl"], **changes)) != base
    assert identity_digest(parsed_identity(model_dirs["qwen2_vl"], **quantized)) == base  # and nothing else does


def test_an_unreadable_store_is_computed_anew(tmp_path):
    scores = ReferenceScores("digest", {"train/0": (torch.zeros(2, 3), torch.zeros(2, 4))})
    scores.save(str(tmp_path), {"any": "identity"})
    assert ReferenceScores.load(str(tmp_path), "digest").values.keys() == {"train/0"}
    whole = (tmp_path / SCORES_FILE).read_bytes()
    (tmp_path / SCORES_FILE).write_bytes(whole[: len(whole) // 2])  # a disk that filled up, a copy cut short
    assert ReferenceScores.load(str(tmp_path), "digest") is None


@pytest.mark.e2e
def test_a_resume_reuses_the_stored_scores_and_a_change_recomputes_them(model_dirs, dataset_dir, tmp_path):
    output_dir = tmp_path / "out"
    config = train_config(
        model_dirs["qwen2_vl"],
        "qwen2_vl",
        dataset_dir,
        output_dir,
        tpo_noise_per="sample",
        tpo_precompute_ref=True,
        overwrite_output_dir=False,
        save_strategy="steps",
        save_steps=2,
    )
    first = run_cli(["train", str(write_yaml(tmp_path / "first.yaml", config))], cwd=tmp_path)
    assert "Computing the reference scores of 8 pairs once (they are not stored yet)" in first.stdout + first.stderr
    stored = (output_dir / SCORES_FILE).read_bytes()

    resumed = {**config, "max_steps": 4, "resume_from_checkpoint": str(output_dir / "checkpoint-2")}
    second = run_cli(["train", str(write_yaml(tmp_path / "second.yaml", resumed))], cwd=tmp_path)
    assert f"Reusing the reference scores stored in {output_dir / SCORES_FILE}" in second.stdout + second.stderr
    assert (output_dir / SCORES_FILE).read_bytes() == stored
    assert [entry["step"] for entry in train_logs(output_dir)] == [1, 2, 3, 4]

    changed = {**resumed, "max_steps": 6, "resume_from_checkpoint": str(output_dir / "checkpoint-4")}
    changed.update(tpo_noise_step=250, tpo_allow_changed_settings=True)
    third = run_cli(["train", str(write_yaml(tmp_path / "third.yaml", changed))], cwd=tmp_path)
    assert (
        "Computing the reference scores of 8 pairs once (what they depend on changed)" in third.stdout + third.stderr
    )
    assert (output_dir / SCORES_FILE).read_bytes() != stored
    assert any("loss" in entry for entry in log_history(output_dir))
