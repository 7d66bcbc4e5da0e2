"""The logged visual score equals an independent computation with a white image (docs/method.md §2–§3).

The independent side uses only LLaMA-Factory's data pipeline (to encode the pair exactly as training
does) and a transformers model loaded from the same directory: clean image vs. a white image of the same
size, target-token logits of the chosen answer, mean over its tokens.
"""

import math

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from conftest import run_cli, train_config, train_logs, write_yaml


pytestmark = pytest.mark.e2e


def independent_chosen_token_scores(config: dict) -> torch.Tensor:
    """Per-token ``logit(clean) - logit(white)`` of the chosen answer of the dataset's only pair."""
    from llamafactory.data import PairwiseDataCollatorWithPadding, get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    model_args, data_args, training_args, _, _ = get_train_args({**config, "output_dir": config["output_dir"] + "-x"})
    tokenizer_module = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
    (pair,) = get_dataset(template, model_args, data_args, training_args, stage="rm", **tokenizer_module)[
        "train_dataset"
    ]
    model = AutoModelForImageTextToText.from_pretrained(config["model_name_or_path"]).eval()
    collator = PairwiseDataCollatorWithPadding(
        template=template, model=model, label_pad_token_id=-100, **tokenizer_module
    )

    white = Image.new("RGB", Image.open(pair["images"][0]).size, (255, 255, 255))
    target_logits = []
    for images in (pair["images"], [white]):
        batch = collator([{**pair, "images": images}])
        labels = batch.pop("labels")[0]  # row 0: the chosen answer
        with torch.no_grad():
            logits = model(**batch).logits[0]
        positions = (labels[1:] != -100).nonzero().squeeze(-1)
        target_logits.append(logits[positions, labels[1:][positions]])

    return target_logits[0] - target_logits[1]


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_blank_image_score_and_weight_match_independent_computation(family, model_dirs, dataset_dir, tmp_path):
    output_dir = tmp_path / "out"
    config = train_config(
        model_dirs[family],
        family,
        dataset_dir,
        output_dir,
        dataset="one_pair",
        tpo_corruption="blank",
        per_device_train_batch_size=1,
        max_steps=1,
    )
    run_cli(["train", str(write_yaml(tmp_path / "tpo.yaml", config))], cwd=tmp_path)
    (first_step,) = train_logs(output_dir)

    token_scores = independent_chosen_token_scores(config)
    expected_score = token_scores.mean().item()
    expected_weight = sum(0.5 + 1 / (1 + math.exp(-s)) for s in token_scores.tolist()) / len(token_scores)
    assert abs(expected_score) > 1e-4  # the white image does change the logits, so the check has teeth
    assert first_step["tpo/score_chosen"] == pytest.approx(expected_score, rel=0.01)
    assert first_step["tpo/weight_chosen"] == pytest.approx(expected_weight, rel=0.01)
