"""The family matrix: a tiny model of every vision-language family LLaMA-Factory 0.9.5 has an image template for
and transformers builds from a config (:mod:`tpo_plugin.testing.tiny_models`: its own architecture, processor and
tokenizer), trained with ``stage: tpo`` through ``llamafactory-cli train`` with its own template; and freeze
fine-tuning.

Each family trains once, on one pair with two images, and that one run shows: finite TPO metrics; the first
step's logged visual score equals an independent computation with *both* images white (and differs from the
score with only the first one white, so an image left clean would be caught); and the image-feature reuse
(``training/batch/image_features.py``) is on or off as ``SUPPORTED_MODEL_TYPES`` says, by counting what the family's
vision encoder encodes inside the CLI's process.
"""

import json
import math
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_e2e_train import DPO_KEYS, TPO_KEYS

from tpo_plugin.testing.tiny_models import FAMILIES, build_tiny_model
from tpo_plugin.training.batch.image_features import SUPPORTED_MODEL_TYPES

from conftest import PAIR_COLUMNS, draw, run_cli, train_config, train_logs, write_yaml


MODEL_TYPES = {
    "qwen2_vl": ("qwen2_vl", "Qwen2VLProcessor"),
    "llava": ("llava", "LlavaProcessor"),
    "qwen2_5_vl": ("qwen2_5_vl", "Qwen2_5_VLProcessor"),
    "qwen3_vl": ("qwen3_vl", "Qwen3VLProcessor"),
    "qwen3_vl_moe": ("qwen3_vl_moe", "Qwen3VLProcessor"),
    "qwen3_5": ("qwen3_5", "Qwen3VLProcessor"),
    "llava_next": ("llava_next", "LlavaNextProcessor"),
    "llava_next_video": ("llava_next_video", "LlavaNextVideoProcessor"),
    "video_llava": ("video_llava", "VideoLlavaProcessor"),
    "internvl": ("internvl", "InternVLProcessor"),
    "gemma3": ("gemma3", "Gemma3Processor"),
    "paligemma": ("paligemma", "PaliGemmaProcessor"),
    "pixtral": ("llava", "PixtralProcessor"),
    "mistral3": ("mistral3", "PixtralProcessor"),
    "glm4v": ("glm4v", "Glm4vProcessor"),
    "glm4v_moe": ("glm4v_moe", "Glm4vProcessor"),
    "mllama": ("mllama", "MllamaProcessor"),
    "llama4": ("llama4", "Llama4Processor"),
}
"""Each tiny family's transformers model type and processor class, as the real checkpoints have them."""

REUSE_OFF = {
    "mllama": "images reach the text model through cross-attention; there is no get_image_features to share",
    "llama4": "its forward reads get_image_features(...).last_hidden_state, which the reuse does not rebuild",
}
"""Families whose image features are encoded for every row and forward (as LLaMA-Factory does), and why."""

VISION_TOWER_TRAINS = {
    "video_llava": (
        "LLaMA-Factory 0.9.5 registers its vision tower under the default name `vision_tower`, but Video-LLaVA's "
        "are `image_tower` and `video_tower`, so `lora_target: all` puts LoRA adapters into them"
    ),
}
"""Families whose vision tower LLaMA-Factory's LoRA trains (a frozen one is encoded once per step)."""

# Llama 4's image processor returns bfloat16 pixels (as Meta's code), so the model must run in bfloat16 too.
OVERRIDES = {"llama4": {"bf16": True, "use_cpu": True}}

# Counts, inside the CLI's process, the units (dim 0 of the first tensor argument: images, tiles or patches)
# that modules of the class named by TPO_TEST_ENCODER encode; one line per call, appended to TPO_TEST_ENCODED.
COUNTING_SITECUSTOMIZE = """
import os
import torch.nn.modules.module


def _record(module, args, kwargs, output):
    if type(module).__name__ == os.environ["TPO_TEST_ENCODER"]:
        first = next(value for value in (*args, *kwargs.values()) if hasattr(value, "shape"))
        with open(os.environ["TPO_TEST_ENCODED"], "a") as log:
            log.write(f"{first.shape[0]}\\n")


torch.nn.modules.module.register_module_forward_hook(_record, with_kwargs=True)
"""


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory):
    """Build a family's tiny model on first use, once per session."""
    root, built = tmp_path_factory.mktemp("family-models"), {}

    def build(family: str) -> Path:
        if family not in built:
            built[family] = build_tiny_model(family, root / family)
        return built[family]

    return build


@pytest.fixture(scope="session")
def two_image_data(tmp_path_factory) -> Path:
    """A dataset_dir with ``two_images``: one pair whose prompt shows two different pictures."""
    root = tmp_path_factory.mktemp("two-image-data")
    (root / "img").mkdir()
    draw("red", "ball").save(root / "img" / "red-ball.png")
    draw("blue", "box").save(root / "img" / "blue-box.png")
    pair = {
        "conversations": [{"from": "human", "value": "<image><image>What is in the pictures?"}],
        "chosen": {"from": "gpt", "value": "A red ball and a blue box."},
        "rejected": {"from": "gpt", "value": "A red ball and a dog."},
        "images": ["img/red-ball.png", "img/blue-box.png"],
    }
    (root / "two_images.json").write_text(json.dumps([pair]))
    info = {"file_name": "two_images.json", "formatting": "sharegpt", "ranking": True, "columns": PAIR_COLUMNS}
    (root / "dataset_info.json").write_text(json.dumps({"two_images": info}))
    return root


@pytest.fixture(scope="session")
def encoder_counter(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("count-encodings")
    (directory / "sitecustomize.py").write_text(COUNTING_SITECUSTOMIZE)
    return directory


def family_config(family: str, model_dir: Path, dataset_dir: Path, output_dir: Path, **overrides) -> dict:
    config = train_config(model_dir, "qwen2_vl", dataset_dir, output_dir, **overrides)
    config["template"] = FAMILIES[family]
    return config


def vision_encoder(model: torch.nn.Module) -> torch.nn.Module:
    """The module that encodes the images (Video-LLaVA's image tower, not its video tower)."""
    names = ("visual", "vision_tower", "vision_model", "image_tower")
    return next(
        getattr(module, name)
        for module in model.modules()
        for name in names
        if isinstance(getattr(module, name, None), torch.nn.Module)
    )


class IndependentPass:
    """The pair as LLaMA-Factory's data pipeline encodes it, run through a transformers model loaded from the
    same directory: per answer (row 0 chosen, row 1 rejected) the per-token ``logit(clean) - logit(corrupted)``
    for a given set of white images, and what the vision encoder encodes for one row."""

    def __init__(self, config: dict):
        from llamafactory.data import PairwiseDataCollatorWithPadding, get_dataset, get_template_and_fix_tokenizer
        from llamafactory.hparams import get_train_args
        from llamafactory.model import load_tokenizer
        from transformers import AutoModelForImageTextToText

        args = get_train_args({**config, "output_dir": config["output_dir"] + "-independent"})
        model_args, data_args, training_args = args[:3]
        tokenizer_module = load_tokenizer(model_args)
        template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
        dataset = get_dataset(template, model_args, data_args, training_args, stage="rm", **tokenizer_module)
        (self.pair,) = dataset["train_dataset"]
        dtype = torch.bfloat16 if config.get("bf16") else torch.float32
        self.model = AutoModelForImageTextToText.from_pretrained(config["model_name_or_path"], dtype=dtype).eval()
        self.collator = PairwiseDataCollatorWithPadding(
            template=template, model=self.model, label_pad_token_id=-100, **tokenizer_module
        )
        self.encoder = vision_encoder(self.model)
        self.clean_logits = self._target_logits(self.pair["images"])

    def _target_logits(self, images: list) -> list[torch.Tensor]:
        """Per row (chosen, rejected), the logits of the answer's target tokens."""
        batch = self.collator([{**self.pair, "images": images}])
        labels = batch.pop("labels")
        with torch.no_grad():
            logits = self.model(**batch).logits
        targets = []
        for row in range(2):
            positions = (labels[row, 1:] != -100).nonzero().squeeze(-1)
            targets.append(logits[row, positions, labels[row, 1:][positions]].float())
        return targets

    def token_scores(self, white: list[int]) -> list[torch.Tensor]:
        """Per answer, the per-token visual scores with the images at the positions ``white`` made white."""
        images = [
            Image.new("RGB", Image.open(path).size, (255, 255, 255)) if index in white else path
            for index, path in enumerate(self.pair["images"])
        ]
        return [
            clean - corrupted for clean, corrupted in zip(self.clean_logits, self._target_logits(images), strict=True)
        ]

    def units_encoded_per_row(self) -> int:
        """Dim 0 of what the vision encoder gets for one row's images (chosen and rejected carry the same)."""
        units = []
        handle = self.encoder.register_forward_hook(
            lambda module, args, kwargs, output: units.append(
                next(value for value in (*args, *kwargs.values()) if hasattr(value, "shape")).shape[0]
            ),
            with_kwargs=True,
        )
        try:
            self._target_logits(self.pair["images"])  # one forward of the chosen and the rejected row
        finally:
            handle.remove()
        assert len(units) == 1 and units[0] % 2 == 0, units
        return units[0] // 2


def test_templates_are_llamafactorys_own():
    from llamafactory.data.template import TEMPLATES

    assert "qwen2_5_vl" not in TEMPLATES and FAMILIES["qwen2_5_vl"] == "qwen2_vl"  # 0.9.5 uses qwen2_vl for both
    for family, template in FAMILIES.items():
        assert TEMPLATES[template].mm_plugin.image_token is not None, family


@pytest.mark.parametrize("family", sorted(MODEL_TYPES))
def test_tiny_model_is_its_own_family(family, family_dir):
    from transformers import AutoConfig, AutoProcessor

    model_type, processor_class = MODEL_TYPES[family]
    config = AutoConfig.from_pretrained(family_dir(family))
    processor = AutoProcessor.from_pretrained(family_dir(family))
    assert config.model_type == model_type
    assert type(processor).__name__ == processor_class
    # The token the processor puts where image features go is a special token, and the one the model replaces.
    special = {token.content for token in processor.tokenizer.added_tokens_decoder.values() if token.special}
    assert processor.image_token in special
    image_token_id = getattr(config, "image_token_id", None) or config.image_token_index
    assert processor.tokenizer.convert_tokens_to_ids(processor.image_token) == image_token_id


def test_every_tiny_family_is_in_the_matrix():
    assert sorted(MODEL_TYPES) == sorted(FAMILIES)


@pytest.mark.e2e
@pytest.mark.parametrize("family", sorted(MODEL_TYPES))
def test_family_trains_with_every_image_of_the_pair_corrupted(
    family, family_dir, two_image_data, encoder_counter, tmp_path
):
    """Two LoRA steps on one two-image pair, both images blanked (white): finite metrics; the first step's scores
    and weights equal an independent computation with both images white; the vision encoder encoded each image
    once per step and corruption (reuse on: 2 rows' worth per step) or once per row and forward (off: 8). Both
    answers' scores and weights are checked, so at least one of them tells both images from the first alone."""
    output_dir = tmp_path / "out"
    config = family_config(
        family,
        family_dir(family),
        two_image_data,
        output_dir,
        dataset="two_images",
        tpo_corruption="blank",
        per_device_train_batch_size=1,
        **OVERRIDES.get(family, {}),
    )
    independent = IndependentPass(config)
    both_white, first_white = independent.token_scores(white=[0, 1]), independent.token_scores(white=[0])
    units_per_row = independent.units_encoded_per_row()

    encoded_log = tmp_path / "encoded.txt"
    env = {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(encoder_counter), os.environ.get("PYTHONPATH")])),
        "TPO_TEST_ENCODER": type(independent.encoder).__name__,
        "TPO_TEST_ENCODED": str(encoded_log),
    }
    result = run_cli(["train", str(write_yaml(tmp_path / "tpo.yaml", config))], cwd=tmp_path, extra_env=env)
    assert "Fine-tuning method: LoRA" in result.stdout + result.stderr

    logs = train_logs(output_dir)
    assert [entry["step"] for entry in logs] == [1, 2]
    for entry in logs:
        for key in ["loss", *DPO_KEYS, *TPO_KEYS]:
            assert math.isfinite(entry[key]), (key, entry)
        assert 0.5 < entry["tpo/weight_chosen"] < 1.5 and 0.5 < entry["tpo/weight_rejected"] < 1.5
    assert (output_dir / "adapter_model.safetensors").is_file()

    # Both answers' logged means equal the independent ones with both images white; with the first image white
    # only, at least one of them differs by more than the tolerance, so a run that left an image clean would not
    # pass. The weights are c = 0.5 + sigmoid(s) in the chosen answer and 0.5 + 1 - sigmoid(s) in the rejected
    # one. bfloat16 keeps 8 significant bits of each logit and the trainer's joined 4-row forward rounds
    # differently from the 2-row one here, so in bf16 a score (a difference of two logits, far smaller than
    # either) is known only to about one logit's rounding, 2^-8 of the logits' size (measured: llama4's chosen
    # score 3.8e-4 off on one CPU, where that rounding is 1.0e-3, and exact on another).
    bf16 = config.get("bf16")
    rel = 0.05 if bf16 else 0.01
    means = [scores.mean().item() for scores in both_white]
    tolerances = [
        max(rel * abs(mean), 2**-8 * clean.abs().mean().item() if bf16 else 1e-5)
        for mean, clean in zip(means, independent.clean_logits, strict=True)
    ]
    for side, scores, tolerance in zip(("chosen", "rejected"), both_white, tolerances, strict=True):
        weights = 0.5 + torch.sigmoid(scores) if side == "chosen" else 1.5 - torch.sigmoid(scores)
        assert logs[0][f"tpo/score_{side}"] == pytest.approx(scores.mean().item(), abs=tolerance), side
        assert logs[0][f"tpo/weight_{side}"] == pytest.approx(weights.mean().item(), rel=0.01), side
    assert max(abs(mean) for mean in means) > 1e-3  # white images do change the logits
    assert any(
        abs(first_only.mean().item() - mean) > max(max(0.05, 3 * rel) * abs(mean), tolerance)
        for first_only, mean, tolerance in zip(first_white, means, tolerances, strict=True)
    ), (means, [first_only.mean().item() for first_only in first_white], tolerances)

    # Per step, the policy's joined clean + corrupted forward gets 4 rows' images and the reference's 4 more.
    # Reuse encodes only the clean and the corrupted images once (2 rows' worth); where LoRA trains the vision
    # tower, the reference (adapter off) encodes its own 2; without reuse all 8 are encoded.
    reuse = family not in REUSE_OFF
    assert reuse == (MODEL_TYPES[family][0] in SUPPORTED_MODEL_TYPES)
    rows_per_step = 8 if not reuse else 4 if family in VISION_TOWER_TRAINS else 2
    encoded = [int(line) for line in encoded_log.read_text().split()]
    assert sum(encoded) == 2 * rows_per_step * units_per_row, (encoded, units_per_row)


@pytest.mark.e2e
def test_freeze_finetuning_trains_the_last_layers_only(family_dir, dataset_dir, tmp_path):
    from safetensors.torch import load_file

    output_dir = tmp_path / "out"
    model_dir = family_dir("qwen2_5_vl")
    config = family_config("qwen2_5_vl", model_dir, dataset_dir, output_dir, finetuning_type="freeze")
    config.pop("lora_target")
    config["freeze_trainable_layers"] = 1
    result = run_cli(["train", str(write_yaml(tmp_path / "tpo.yaml", config))], cwd=tmp_path)
    assert "Fine-tuning method: Freeze" in result.stdout + result.stderr

    logs = train_logs(output_dir)
    assert [entry["step"] for entry in logs] == [1, 2]
    assert all(math.isfinite(entry[key]) for entry in logs for key in ["loss", *TPO_KEYS])
    before = load_file(model_dir / "model.safetensors")
    after = load_file(output_dir / "model.safetensors")
    changed = {name for name in before if not (before[name] == after[name]).all()}
    assert changed and all(".layers.1." in name for name in changed), sorted(changed)


def test_family_table_matches_llamafactorys_templates():
    import llamafactory
    from llamafactory.data.template import TEMPLATES

    from tpo_plugin.training.checks import families

    image_templates = {name for name, template in TEMPLATES.items() if template.mm_plugin.image_token is not None}
    tabled = set(families.TRAINED) | set(families.UNTESTED)
    assert set(FAMILIES.values()) <= set(families.TRAINED)
    assert not set(families.TRAINED) & set(families.UNTESTED)
    assert tabled <= image_templates
    if llamafactory.__version__ == "0.9.5":  # the table is 0.9.5's; main adds templates (e.g. moss_vl)
        assert tabled == image_templates
    for name in ("idefics3", "smolvlm", "llava_onevision"):
        assert not any(name in template for template in TEMPLATES), name


def test_untested_template_is_named_in_a_warning(tpo_log_records):
    from tpo_plugin.training.checks.families import check_template_family

    check_template_family("qwen2_vl")
    assert tpo_log_records == []
    check_template_family("gemma4")
    (record,) = tpo_log_records
    assert "`gemma4` (Gemma 4:" in record.getMessage() and "qwen2_vl" in record.getMessage()
