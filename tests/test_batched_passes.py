"""The efficient paths give the results of the straightforward ones: clean and corrupted rows in one forward
equal two forwards, corrupted inputs built once per pair equal those built for every row, and image features
encoded once per step equal (with their gradients) those encoded for every row and forward."""

import math

import pytest
import torch
from transformers import AutoModelForImageTextToText
from transformers.modeling_outputs import BaseModelOutputWithPooling

import tpo_plugin.training.trainer
from tpo_plugin.method.noise import corrupt_image
from tpo_plugin.method.objective import first_scored_position, target_token_scores
from tpo_plugin.training.batch.collator import TPODataCollatorWithPadding
from tpo_plugin.training.batch.corruption import ImageCorrupter
from tpo_plugin.training.batch.image_features import (
    ImageFeatureCache,
    image_feature_owner,
    join_block_features,
    vision_path_is_frozen,
)
from tpo_plugin.training.batch.keys import PAIR_IMAGES_KEY
from tpo_plugin.training.trainer import concat_rows, logits_from_position

from conftest import log_history, train_config, train_logs


def pairwise_batch(family, model_dirs, dataset_dir, tmp_path):
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    config = train_config(model_dirs[family], family, dataset_dir, tmp_path / "out", dataset="tiny_pairs")
    model_args, data_args, training_args, _, _ = get_train_args(config)
    tokenizer_module = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
    dataset = get_dataset(template, model_args, data_args, training_args, stage="rm", **tokenizer_module)
    model = AutoModelForImageTextToText.from_pretrained(model_dirs[family]).eval()
    corrupter = ImageCorrupter(template, tokenizer_module["processor"], "diffusion", 500, seed=3)
    collator = TPODataCollatorWithPadding(
        template=template, model=model, label_pad_token_id=-100, image_corrupter=corrupter, **tokenizer_module
    )
    features = [dict(dataset["train_dataset"][index]) for index in range(3)]
    return model, corrupter, template, tokenizer_module["processor"], collator(features)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_clean_and_corrupted_rows_in_one_forward_equal_two_forwards(family, model_dirs, dataset_dir, tmp_path):
    model, corrupter, _, _, batch = pairwise_batch(family, model_dirs, dataset_dir, tmp_path)
    pair_images = batch.pop(PAIR_IMAGES_KEY)
    labels = batch.pop("labels")
    corrupted = {**batch, **corrupter.corrupted_inputs(pair_images, batch, step_key=1)}

    with torch.no_grad():
        separate = [target_token_scores(model(**inputs).logits, labels) for inputs in (batch, corrupted)]
        joined = target_token_scores(model(**concat_rows(batch, corrupted)).logits, labels.repeat(2, 1))

    rows = labels.size(0)
    for part, expected in enumerate(separate):
        for name in ("logit", "logp"):
            got = getattr(joined, name)[part * rows : (part + 1) * rows]
            torch.testing.assert_close(got, getattr(expected, name), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(separate[0].logit, separate[1].logit)  # the corruption does change the scores


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_corrupted_inputs_built_once_per_pair_equal_per_row(family, model_dirs, dataset_dir, tmp_path):
    _, corrupter, template, processor, batch = pairwise_batch(family, model_dirs, dataset_dir, tmp_path)
    pair_images = batch[PAIR_IMAGES_KEY]
    reused = corrupter.corrupted_inputs(pair_images, batch, step_key=5)

    images = [[corrupt_image(image, "diffusion", 500, 3, 5) for image in pair] for pair in pair_images]
    rows = images + images
    per_row = template.mm_plugin.get_mm_inputs(
        [image for row in rows for image in row],
        [],
        [],
        [len(row) for row in rows],
        [0] * len(rows),
        [0] * len(rows),
        batch["input_ids"].tolist(),
        processor,
    )
    assert set(reused) == set(per_row) and "pixel_values" in reused
    for key, value in per_row.items():
        assert torch.equal(reused[key], value), key


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_logits_from_the_first_answer_position_score_and_average_like_all_logits(
    family, model_dirs, dataset_dir, tmp_path
):
    model, joined, labels = joined_batch(family, model_dirs, dataset_dir, tmp_path)
    first_position = first_scored_position(labels)
    assert first_position > 10  # the prompt (image tokens, question) is really left out

    def scores_and_grads(keep_from):
        model.zero_grad()
        mean_logits = []
        if keep_from is None:
            logits = model(**joined).logits
            mean_logits.append(logits.detach().mean(dim=(1, 2)))
            scores = target_token_scores(logits, labels)
        else:
            with logits_from_position(model, keep_from, mean_logits) as used:
                logits = model(**joined).logits
            assert used == keep_from and logits.size(1) == labels.size(1) - keep_from
            scores = target_token_scores(logits, labels[:, keep_from:])
        (scores.logp.sum() + scores.logit.sum()).backward()
        grads = [param.grad.clone() for param in model.get_decoder().parameters() if param.grad is not None]
        return scores, mean_logits[0], grads

    all_scores, all_means, all_grads = scores_and_grads(None)
    kept_scores, kept_means, kept_grads = scores_and_grads(first_position)

    for name in ("logit", "logp", "mask"):  # the dropped positions score nothing
        dropped = getattr(all_scores, name)[:, :first_position]
        assert not dropped.any()
        torch.testing.assert_close(getattr(kept_scores, name), getattr(all_scores, name)[:, first_position:])
    torch.testing.assert_close(kept_means, all_means, rtol=1e-5, atol=1e-7)
    assert len(kept_grads) == len(all_grads) > 0
    for kept, full in zip(kept_grads, all_grads, strict=True):
        torch.testing.assert_close(kept, full, rtol=1e-4, atol=1e-6)


def vision_encoder(model):
    owner = image_feature_owner(model)
    return getattr(owner, "visual", None) or owner.vision_tower


def count_encoded_images(model) -> list[int]:
    """A running count of the images the model's vision tower encodes."""
    count = [0]

    def record(module, args, kwargs):
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        count[0] += len(grid) if grid is not None else len(args[0] if args else kwargs["pixel_values"])

    vision_encoder(model).register_forward_pre_hook(record, with_kwargs=True)
    return count


def joined_batch(family, model_dirs, dataset_dir, tmp_path):
    model, corrupter, _, _, batch = pairwise_batch(family, model_dirs, dataset_dir, tmp_path)
    pair_images = batch.pop(PAIR_IMAGES_KEY)
    labels = batch.pop("labels")
    corrupted = {**batch, **corrupter.corrupted_inputs(pair_images, batch, step_key=1)}
    return model, concat_rows(batch, corrupted), labels.repeat(2, 1)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
@pytest.mark.parametrize("share_with_reference", [True, False])
def test_frozen_vision_tower_encodes_each_image_once_per_step(
    family, share_with_reference, model_dirs, dataset_dir, tmp_path
):
    model, joined, labels = joined_batch(family, model_dirs, dataset_dir, tmp_path)
    model.requires_grad_(False)
    model.get_decoder().requires_grad_(True)  # LLaMA-Factory's default: the language model trains
    encoded = count_encoded_images(model)
    images = 4 * 3  # 3 pairs, one image each: chosen and rejected rows, clean and corrupted

    plain = model(**joined).logits
    assert encoded[0] == images

    cache = ImageFeatureCache(reuse_encodings=True, share_with_reference=share_with_reference)
    with cache.encode_once(model, num_blocks=4, reference=False):
        policy = model(**joined).logits
    assert encoded[0] == images + 6  # each distinct image once: 3 clean, 3 corrupted
    with torch.no_grad(), cache.encode_once(model, num_blocks=4, reference=True):
        reference = model(**joined).logits
    assert encoded[0] == images + (6 if share_with_reference else 12)

    torch.testing.assert_close(policy, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reference, plain.detach(), rtol=1e-5, atol=1e-5)
    assert policy.requires_grad and not reference.requires_grad


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_without_reuse_a_frozen_vision_tower_is_encoded_every_time_but_without_a_graph(
    family, model_dirs, dataset_dir, tmp_path
):
    model, joined, labels = joined_batch(family, model_dirs, dataset_dir, tmp_path)
    model.requires_grad_(False)
    model.get_decoder().requires_grad_(True)
    model.enable_input_require_grads()  # as LLaMA-Factory does for gradient checkpointing
    encoded = count_encoded_images(model)
    vision_output_has_graph = []
    vision_encoder(model).register_forward_hook(
        lambda module, args, output: vision_output_has_graph.append(output.pooler_output.requires_grad)
    )

    def decoder_grads():
        model.zero_grad()
        target_token_scores(model(**joined).logits, labels).logp.sum().backward()
        return [param.grad.clone() for param in model.get_decoder().parameters() if param.grad is not None]

    plain = decoder_grads()
    assert vision_output_has_graph == [True]  # without the cache, backward would run through the frozen tower
    cache = ImageFeatureCache(reuse_encodings=False, share_with_reference=True)
    with cache.encode_once(model, num_blocks=4, reference=False):
        cached = decoder_grads()
    with torch.no_grad(), cache.encode_once(model, num_blocks=4, reference=True):
        model(**joined)

    assert encoded[0] == 3 * 12 and vision_output_has_graph == [True, False, False]
    assert len(cached) == len(plain) > 0
    for got, expected in zip(cached, plain, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def tiny_model_and_joined_inputs(family: str):
    """A random tiny Qwen2.5-VL, Qwen3-VL (deepstack features) or InternVL from a config, and the inputs of
    the clean and corrupted passes joined for 2 pairs with an image each: chosen rows, then rejected rows, with
    the clean images, then the same with corrupted copies of them. Each image gives 4 image tokens."""
    from transformers import (
        InternVLConfig,
        InternVLForConditionalGeneration,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
    )

    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128)
    text.update(num_key_value_heads=2, head_dim=8)
    image_token, start, end = 100, 101, 102
    prompts = [[5, 6, start] + [image_token] * 4 + [end, 7 + pair, 8, 9] for pair in range(2)]
    input_ids = torch.tensor(prompts * 4)
    inputs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))

    if family == "internvl":  # one 56x56 tile per image: 4x4 patches, pixel-shuffled to 4 tokens
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
        vision.update(image_size=[56, 56], patch_size=[14, 14])
        config = InternVLConfig(
            vision_config=vision,
            text_config={**text, "model_type": "qwen2"},
            image_token_id=image_token,
            downsample_ratio=0.5,
            vision_feature_layer=-1,
        )
        clean, corrupted = torch.randn(2, 2, 3, 56, 56).unbind(0)
        inputs["pixel_values"] = torch.cat([clean, clean, corrupted, corrupted])
        return InternVLForConditionalGeneration(config).eval(), inputs

    rope = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 1, 1]}
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32)
    vision.update(spatial_merge_size=2, temporal_patch_size=2)
    tokens = dict(image_token_id=image_token, vision_start_token_id=start, vision_end_token_id=end, video_token_id=103)
    if family == "qwen2_5_vl":
        patch = 14
        vision.update(patch_size=patch, window_size=56, fullatt_block_indexes=[1])
        model = Qwen2_5_VLForConditionalGeneration(
            Qwen2_5_VLConfig(text_config={**text, "rope_parameters": rope}, vision_config=vision, **tokens)
        )
    else:
        patch = 16
        vision.update(patch_size=patch, num_position_embeddings=16, deepstack_visual_indexes=[0, 1])
        rope["mrope_interleaved"] = True
        model = Qwen3VLForConditionalGeneration(
            Qwen3VLConfig(text_config={**text, "rope_parameters": rope}, vision_config=vision, **tokens)
        )
    clean, corrupted = torch.randn(2, 2 * 16, 3 * 2 * patch * patch).unbind(0)  # 4x4 patches per image
    inputs["pixel_values"] = torch.cat([clean, clean, corrupted, corrupted])
    inputs.update(image_grid_thw=torch.tensor([[1, 4, 4]] * 8), mm_token_type_ids=(input_ids == image_token).long())
    return model.eval(), inputs


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "internvl"])
def test_other_families_encode_each_image_once_with_unchanged_logits(family):
    model, inputs = tiny_model_and_joined_inputs(family)
    encoded = count_encoded_images(model)

    with torch.no_grad():
        plain = model(**inputs).logits
        assert encoded[0] == 8
        cache = ImageFeatureCache(reuse_encodings=True, share_with_reference=True)
        with cache.encode_once(model, num_blocks=4, reference=False):
            policy = model(**inputs).logits
        with cache.encode_once(model, num_blocks=4, reference=True):
            reference = model(**inputs).logits

    assert encoded[0] == 8 + 4
    torch.testing.assert_close(policy, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(reference, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_trainable_vision_tower_gets_the_gradients_of_encoding_every_row(family, model_dirs, dataset_dir, tmp_path):
    model, joined, labels = joined_batch(family, model_dirs, dataset_dir, tmp_path)
    model.requires_grad_(True)
    encoder_params = [param for param in vision_encoder(model).parameters()]
    encoded = count_encoded_images(model)

    def loss_and_encoder_grads():
        model.zero_grad()
        scores = target_token_scores(model(**joined).logits, labels)
        loss = (scores.logp.sum(-1) * torch.arange(1.0, labels.size(0) + 1)).sum()  # every row counts differently
        loss.backward()
        return loss.detach(), [None if param.grad is None else param.grad.clone() for param in encoder_params]

    plain_loss, plain_grads = loss_and_encoder_grads()
    cache = ImageFeatureCache(reuse_encodings=True, share_with_reference=False)
    with cache.encode_once(model, num_blocks=4, reference=False):
        cached_loss, cached_grads = loss_and_encoder_grads()
        assert encoded[0] == 12 + 6
        with torch.no_grad():  # the same images without a graph: the graph-carrying features are not reused
            detached = model(**joined).logits
        assert encoded[0] == 12 + 12 and not detached.requires_grad

    torch.testing.assert_close(cached_loss, plain_loss, rtol=1e-5, atol=1e-5)
    for cached, plain in zip(cached_grads, plain_grads, strict=True):  # LLaVA's unused last layer has none
        assert (cached is None) == (plain is None)
        if plain is not None:
            torch.testing.assert_close(cached, plain, rtol=1e-4, atol=1e-6)
    assert any(grad is not None and grad.abs().sum() > 0 for grad in cached_grads)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_blocks_that_do_not_split_evenly_are_encoded_as_one_call(family, model_dirs, dataset_dir, tmp_path):
    model, joined, _ = joined_batch(family, model_dirs, dataset_dir, tmp_path)
    encoded = count_encoded_images(model)
    with (
        torch.no_grad(),
        ImageFeatureCache(reuse_encodings=True, share_with_reference=True).encode_once(model, 5, False),
    ):
        model(**joined)
    assert encoded[0] == 12


def test_block_features_join_in_call_order():
    from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

    def block(first_image, layers=2):
        images = (torch.full((2, 3), first_image), torch.full((2, 3), first_image + 1.0))
        deepstack = [torch.full((4, 3), first_image * 10 + layer) for layer in range(layers)]
        return BaseModelOutputWithDeepstackFeatures(pooler_output=images, deepstack_features=deepstack)

    joined = join_block_features([block(0.0), block(2.0), block(0.0)])
    assert [int(image[0, 0]) for image in joined.pooler_output] == [0, 1, 2, 3, 0, 1]
    assert [layer[:, 0].tolist() for layer in joined.deepstack_features] == [
        [0] * 4 + [20] * 4 + [0] * 4,
        [1] * 4 + [21] * 4 + [1] * 4,
    ]

    stacked = join_block_features(
        [BaseModelOutputWithPooling(pooler_output=torch.full((2, 5, 3), value)) for value in (1.0, 2.0)]
    )
    assert stacked.pooler_output[:, 0, 0].tolist() == [1.0, 1.0, 2.0, 2.0]


def test_vision_path_is_frozen_sees_adapters_in_the_vision_tower(model_dirs):
    from peft import LoraConfig, get_peft_model

    model = AutoModelForImageTextToText.from_pretrained(model_dirs["qwen2_vl"])
    language_only = get_peft_model(model, LoraConfig(target_modules=r".*language_model.*\.q_proj"))
    assert vision_path_is_frozen(image_feature_owner(language_only))

    model = AutoModelForImageTextToText.from_pretrained(model_dirs["qwen2_vl"])
    with_vision = get_peft_model(model, LoraConfig(target_modules=r".*(language_model.*\.q_proj|visual.*\.qkv)"))
    assert not vision_path_is_frozen(image_feature_owner(with_vision))


@pytest.fixture
def encoded_images_per_step(monkeypatch):
    """Images encoded by any vision tower (policy and reference model) in each training step."""
    from transformers import CLIPVisionModel, TrainerCallback
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    counts, total = [], [0]
    for tower, count_images in (
        (Qwen2VisionTransformerPretrainedModel, lambda args, kwargs: len(kwargs["grid_thw"])),
        (CLIPVisionModel, lambda args, kwargs: len(kwargs.get("pixel_values", args[0] if args else None))),
    ):

        def counting_forward(self, *args, _forward=tower.forward, _count=count_images, **kwargs):
            total[0] += _count(args, kwargs)
            return _forward(self, *args, **kwargs)

        monkeypatch.setattr(tower, "forward", counting_forward)

    class PerStep(TrainerCallback):
        def on_step_end(self, *args, **kwargs):
            counts.append(total[0] - sum(counts))

    return counts, PerStep()


def load_reference_structure_trainer():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "reference_structure.py"
    spec = importlib.util.spec_from_file_location("reference_structure", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ReferenceStructureTPOTrainer


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("family", "overrides", "per_step"),
    [
        # LoRA, frozen vision tower: 2 pairs' clean and corrupted images once each, shared with the reference.
        ("qwen2_vl", {}, 4),
        ("llava", {"tpo_detach_reward": True}, 4),
        # A trainable vision tower: chosen and rejected rows share an encoding within each forward, no more.
        ("qwen2_vl", {"finetuning_type": "full", "freeze_vision_tower": False, "tpo_detach_reward": True}, 8),
    ],
)
def test_training_encodes_each_image_once_and_equals_the_reference_structure(
    family, overrides, per_step, model_dirs, dataset_dir, tmp_path, monkeypatch, encoded_images_per_step
):
    from llamafactory.train.tuner import run_exp

    counts, callback = encoded_images_per_step
    runs = {}
    for name in ("tpo", "reference_structure"):
        if name == "reference_structure":  # 8 forwards of 2 rows, each encoding its own images: 16 per step
            monkeypatch.setattr(tpo_plugin.training.trainer, "CustomTPOTrainer", load_reference_structure_trainer())
        config = train_config(model_dirs[family], family, dataset_dir, tmp_path / name, **overrides)
        if config["finetuning_type"] == "full":
            config.pop("lora_target")
        run_exp(args=config, callbacks=[callback])
        runs[name] = [entry for entry in log_history(tmp_path / name) if "loss" in entry]

    assert counts == [per_step, per_step, 16, 16]
    for fast, straightforward in zip(runs["tpo"], runs["reference_structure"], strict=True):
        for key in (
            "loss",
            "grad_norm",
            "rewards/margins",
            "logps/chosen",
            "logits/chosen",
            "tpo/score_chosen",
            "tpo/weight_rejected",
        ):
            assert fast[key] == pytest.approx(straightforward[key], rel=1e-5, abs=1e-6), key


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("overrides", "expected_passes"),
    [
        # the paper's objective: policy clean + corrupted rows in one forward with a graph, the reference likewise
        ({}, [("policy", 8, True), ("reference", 8, False)]),
        # c^theta detached: the corrupted policy pass needs no graph; c^ref still needs the corrupted reference pass
        ({"tpo_detach_reward": True}, [("policy", 4, True), ("policy", 4, False), ("reference", 8, False)]),
        # c^theta detached and applied to the reference too: the reference runs on the clean rows only
        ({"tpo_weighting": "multiplicative"}, [("policy", 4, True), ("policy", 4, False), ("reference", 4, False)]),
    ],
)
def test_each_weighting_runs_only_the_passes_its_objective_needs(
    overrides, expected_passes, model_dirs, dataset_dir, tmp_path, monkeypatch
):
    from llamafactory.train.tuner import run_exp

    recorded = []
    token_scores = tpo_plugin.training.trainer.CustomTPOTrainer._token_scores

    def recording_token_scores(self, model, inputs, labels, passes=1, reference=False):
        recorded.append(("reference" if reference else "policy", labels.size(0), torch.is_grad_enabled()))
        return token_scores(self, model, inputs, labels, passes, reference)

    monkeypatch.setattr(tpo_plugin.training.trainer.CustomTPOTrainer, "_token_scores", recording_token_scores)
    output_dir = tmp_path / "out"
    run_exp(args=train_config(model_dirs["qwen2_vl"], "qwen2_vl", dataset_dir, output_dir, **overrides))

    assert recorded == expected_passes * 2  # two steps of 2 pairs (4 rows), every pair with an image
    steps = train_logs(output_dir)
    # LoRA starts as the reference (B = 0): every log-ratio is 0 at the first step, whatever the weights
    assert steps[0]["loss"] == pytest.approx(0.6931, abs=1e-4)
    assert all(math.isfinite(value) for entry in steps for value in entry.values())
