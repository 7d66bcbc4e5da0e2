"""The efficient paths give the results of the straightforward ones: clean and corrupted rows in one forward
equal two forwards, and corrupted inputs built once per pair equal those built for every row."""

import pytest
import torch
from transformers import AutoModelForImageTextToText

from tpo_plugin.collator import PAIR_IMAGES_KEY, TPODataCollatorWithPadding
from tpo_plugin.corruption import ImageCorrupter, corrupt_image
from tpo_plugin.objective import target_token_scores
from tpo_plugin.trainer import concat_rows

from conftest import train_config


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
