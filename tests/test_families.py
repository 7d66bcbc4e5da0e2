"""The vision-language families beyond the two of ``test_e2e_train.py``, each a tiny model of its own
architecture, tokenizer and processor (:mod:`tpo_plugin.testing.tiny_models`), trained with ``stage: tpo``
through ``llamafactory-cli train`` with its own LLaMA-Factory template; and freeze fine-tuning.

Qwen2.5-VL trains with the ``qwen2_vl`` template: LLaMA-Factory 0.9.5 has no ``qwen2_5_vl`` template and uses
``qwen2_vl`` for both. Qwen3-VL (dense) trains with ``qwen3_vl``.
"""

import math
from pathlib import Path

import pytest
from test_e2e_train import DPO_KEYS, TPO_KEYS
from test_logged_scores import independent_chosen_token_scores

from tpo_plugin.testing.tiny_models import FAMILIES, build_tiny_model
from tpo_plugin.training.image_features import SUPPORTED_MODEL_TYPES

from conftest import run_cli, train_config, train_logs, write_yaml


NEW_FAMILIES = ["qwen2_5_vl", "qwen3_vl", "llava_next"]
QWEN_FAMILIES = ["qwen2_5_vl", "qwen3_vl"]


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("family-models")
    return {family: build_tiny_model(family, root / family) for family in NEW_FAMILIES}


def family_config(family: str, model_dir: Path, dataset_dir: Path, output_dir: Path, **overrides) -> dict:
    config = train_config(model_dir, "qwen2_vl", dataset_dir, output_dir, **overrides)
    config["template"] = FAMILIES[family]
    return config


def test_templates_are_llamafactorys_own():
    from llamafactory.data.template import TEMPLATES

    assert FAMILIES["qwen2_5_vl"] == "qwen2_vl" and "qwen2_5_vl" not in TEMPLATES
    assert FAMILIES["qwen3_vl"] == "qwen3_vl"
    for family, template in FAMILIES.items():
        expected = "<image>" if family.startswith("llava") else "<|image_pad|>"
        assert TEMPLATES[template].mm_plugin.image_token == expected, family


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_tiny_model_is_its_own_family(family, family_dirs):
    from transformers import AutoConfig, AutoProcessor

    config = AutoConfig.from_pretrained(family_dirs[family])
    processor = AutoProcessor.from_pretrained(family_dirs[family])
    assert config.model_type == family
    assert type(processor).__name__ == {"qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor"}[family]
    assert processor.image_processor.patch_size == {"qwen2_5_vl": 14, "qwen3_vl": 16}[family]
    if family == "qwen3_vl":
        assert list(config.vision_config.deepstack_visual_indexes) == [0, 1]
    else:
        assert list(config.vision_config.fullatt_block_indexes) == [1]


@pytest.mark.e2e
@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_family_trains_two_steps_and_logs_the_blank_image_score(family, family_dirs, dataset_dir, tmp_path):
    """Two LoRA steps on one pair with a white corrupted image: finite metrics, and the first step's logged
    score and weight equal an independent computation with the initial model (``test_logged_scores.py``)."""
    output_dir = tmp_path / "out"
    config = family_config(
        family,
        family_dirs[family],
        dataset_dir,
        output_dir,
        dataset="one_pair",
        tpo_corruption="blank",
        per_device_train_batch_size=1,
    )
    result = run_cli(["train", str(write_yaml(tmp_path / "tpo.yaml", config))], cwd=tmp_path)
    assert "Fine-tuning method: LoRA" in result.stdout + result.stderr

    logs = train_logs(output_dir)
    assert [entry["step"] for entry in logs] == [1, 2]
    for entry in logs:
        for key in ["loss", *DPO_KEYS, *TPO_KEYS]:
            assert math.isfinite(entry[key]), (key, entry)
        assert 0.5 < entry["tpo/weight_chosen"] < 1.5 and 0.5 < entry["tpo/weight_rejected"] < 1.5
    assert (output_dir / "adapter_model.safetensors").is_file()

    token_scores = independent_chosen_token_scores(config)
    expected_weight = sum(0.5 + 1 / (1 + math.exp(-s)) for s in token_scores.tolist()) / len(token_scores)
    assert abs(token_scores.mean().item()) > 1e-4  # the white image does change the logits
    assert logs[0]["tpo/score_chosen"] == pytest.approx(token_scores.mean().item(), rel=0.01)
    assert logs[0]["tpo/weight_chosen"] == pytest.approx(expected_weight, rel=0.01)


def vision_tower_class(family: str):
    if family == "qwen2_5_vl":
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

        return Qwen2_5_VisionTransformerPretrainedModel
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    return Qwen3VLVisionModel


@pytest.mark.e2e
@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_training_encodes_each_image_once_per_step(family, family_dirs, dataset_dir, tmp_path, monkeypatch):
    """The image-feature reuse is on for the family: with LoRA (frozen vision tower) a step of 2 pairs encodes
    each pair's clean and corrupted image once, shared by chosen and rejected rows and the reference model:
    4 encodings, where encoding every row of every forward would be 16."""
    from llamafactory.train.tuner import run_exp
    from transformers import TrainerCallback

    assert family in SUPPORTED_MODEL_TYPES
    tower = vision_tower_class(family)
    total, per_step = [0], []

    def counting_forward(self, hidden_states, grid_thw, _forward=tower.forward, **kwargs):
        total[0] += len(grid_thw)
        return _forward(self, hidden_states, grid_thw, **kwargs)

    monkeypatch.setattr(tower, "forward", counting_forward)

    class PerStep(TrainerCallback):
        def on_step_end(self, *args, **kwargs):
            per_step.append(total[0] - sum(per_step))

    config = family_config(family, family_dirs[family], dataset_dir, tmp_path / "out")
    run_exp(args=config, callbacks=[PerStep()])

    assert per_step == [4, 4]
    assert all(math.isfinite(entry["tpo/score_chosen"]) for entry in train_logs(tmp_path / "out"))


def test_llava_next_is_its_own_family_without_image_feature_reuse(family_dirs):
    from transformers import AutoConfig, AutoProcessor

    config = AutoConfig.from_pretrained(family_dirs["llava_next"])
    assert config.model_type == "llava_next" and config.model_type not in SUPPORTED_MODEL_TYPES
    assert type(AutoProcessor.from_pretrained(family_dirs["llava_next"])).__name__ == "LlavaNextProcessor"


@pytest.mark.e2e
def test_freeze_finetuning_trains_the_last_layers_only(family_dirs, dataset_dir, tmp_path):
    from safetensors.torch import load_file

    output_dir = tmp_path / "out"
    config = family_config("qwen2_5_vl", family_dirs["qwen2_5_vl"], dataset_dir, output_dir, finetuning_type="freeze")
    config.pop("lora_target")
    config["freeze_trainable_layers"] = 1
    result = run_cli(["train", str(write_yaml(tmp_path / "tpo.yaml", config))], cwd=tmp_path)
    assert "Fine-tuning method: Freeze" in result.stdout + result.stderr

    logs = train_logs(output_dir)
    assert [entry["step"] for entry in logs] == [1, 2]
    assert all(math.isfinite(entry[key]) for entry in logs for key in ["loss", *TPO_KEYS])
    before = load_file(family_dirs["qwen2_5_vl"] / "model.safetensors")
    after = load_file(output_dir / "model.safetensors")
    changed = {name for name in before if not (before[name] == after[name]).all()}
    assert changed and all(".layers.1." in name for name in changed), sorted(changed)


def test_family_table_matches_llamafactorys_templates():
    from llamafactory.data.template import TEMPLATES

    from tpo_plugin.training import families

    for template in [*families.TRAINED, *families.UNTESTED]:
        assert TEMPLATES[template].mm_plugin.image_token is not None, template
    assert set(FAMILIES.values()) <= set(families.TRAINED)
    image_templates = {name for name, template in TEMPLATES.items() if template.mm_plugin.image_token is not None}
    for name in ("idefics3", "smolvlm", "llava_onevision"):
        assert not any(name in template for template in TEMPLATES), name
    assert {"gemma3", "glm4v", "intern_vl", "paligemma", "pixtral"} <= image_templates


def test_untested_template_is_named_in_a_warning():
    import logging

    from tpo_plugin.training.families import check_template_family

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("llamafactory.train.tpo")
    logger.addHandler(handler)
    try:
        check_template_family("qwen2_vl")
        assert records == []
        check_template_family("gemma3")
    finally:
        logger.removeHandler(handler)
    (record,) = records
    assert "`gemma3` (Gemma 3)" in record.getMessage() and "qwen2_vl" in record.getMessage()
