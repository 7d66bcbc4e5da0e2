"""The shipped recipes in ``recipes/``: each one parses, names only known datasets and existing DeepSpeed
files, has a TPO/DPO counterpart that differs only where it must, and trains one step on CPU through
``llamafactory-cli train`` with the model swapped for a tiny local one of the same family.

Recipes are found by glob, so a new ``recipes/*.yaml`` is covered without editing this file.
"""

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tpo_plugin.hparams.tpo_args import tpo_defaults
from tpo_plugin.testing.tiny_models import FAMILIES, build_tiny_model
from tpo_plugin.training.run.settings import NON_OBJECTIVE_TPO_KEYS

from conftest import log_history, run_cli, write_yaml


ROOT = Path(__file__).resolve().parent.parent
RECIPES_DIR = ROOT / "recipes"
DATA_INFO = ROOT / "data_info"
RECIPES = sorted([*RECIPES_DIR.glob("*.yaml"), *RECIPES_DIR.glob("*.yml")])
TPO_RECIPES = [path for path in RECIPES if path.stem.endswith("_tpo")]
DPO_RECIPES = [path for path in RECIPES if path.stem.endswith("_dpo")]
TPO_KEYS = sorted(tpo_defaults())
PAIR_KEYS = {"stage", "output_dir", *TPO_KEYS}
TPO_METRICS = ["tpo/score_chosen", "tpo/score_rejected", "tpo/weight_chosen", "tpo/weight_rejected"]
PROJECTOR_FROZEN_LOG = "Set multi model projector not trainable"
VISION_FROZEN_LOG = "Set vision model not trainable"


def load(path: Path) -> dict[str, Any]:
    config = yaml.safe_load(path.read_text())
    assert isinstance(config, dict), f"{path.name} is not a YAML mapping"
    return config


# The tiny family of each recipe's model, by the model's name (Qwen2.5-VL shares its template with Qwen2-VL).
MODEL_FAMILIES = {"Qwen2.5-VL": "qwen2_5_vl", "Qwen3-VL": "qwen3_vl", "Qwen2-VL": "qwen2_vl", "llava": "llava"}


@pytest.fixture(scope="session")
def recipe_model_dirs(model_dirs, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("recipe-models")
    return {**model_dirs, **{family: build_tiny_model(family, root / family) for family in ("qwen2_5_vl", "qwen3_vl")}}


def family(config: dict[str, Any]) -> str:
    """The tiny test model family of the recipe's model (see conftest's ``model_dirs`` and ``recipe_model_dirs``)."""
    model = str(config.get("model_name_or_path", ""))
    for name, tiny_family in MODEL_FAMILIES.items():
        if name.lower() in model.lower():
            return tiny_family
    raise AssertionError(f"no tiny test model for {model!r}; add one to MODEL_FAMILIES in this test")


def on_tiny_model(config: dict[str, Any], model_dirs: dict[str, Path]) -> dict[str, Any]:
    """The recipe with the tiny model of its family and without DeepSpeed (not installed here). bf16 on CPU
    needs ``use_cpu`` (HF refuses "bf16/gpu" otherwise), so it is kept on and ``use_cpu`` added. The recipe's
    template is kept: it must be one that trains its family's tiny model."""
    tiny = {key: value for key, value in config.items() if key != "deepspeed"}
    tiny["model_name_or_path"] = str(model_dirs[family(config)])
    template = str(config.get("template", ""))
    assert template.startswith(FAMILIES[family(config)]), f"template {template!r} for a {family(config)} model"
    if tiny.get("bf16") or tiny.get("fp16"):
        tiny["use_cpu"] = True
    return tiny


def dataset_names(value: Any) -> list[str]:
    if value is None:
        return []
    names = value if isinstance(value, list) else str(value).split(",")
    return [name.strip() for name in names if name.strip()]


def counterpart(path: Path) -> Path:
    stem = path.stem
    swapped = stem[: -len("_tpo")] + "_dpo" if stem.endswith("_tpo") else stem[: -len("_dpo")] + "_tpo"
    return path.with_name(swapped + path.suffix)


def shared_keys(config: dict[str, Any]) -> dict[str, Any]:
    """What a TPO recipe and its DPO baseline must have in common: all but stage, tpo_* and output_dir."""
    return {key: value for key, value in config.items() if key not in PAIR_KEYS and not key.startswith("tpo_")}


def ids(paths: list[Path]) -> list[str]:
    return [path.stem for path in paths]


def test_recipes_are_there():
    assert RECIPES, f"no recipes in {RECIPES_DIR}"
    assert TPO_RECIPES and DPO_RECIPES
    unnamed = [path.name for path in RECIPES if path not in TPO_RECIPES + DPO_RECIPES]
    assert not unnamed, f"recipe names must end in _tpo or _dpo (to find the counterpart): {unnamed}"


@pytest.mark.parametrize("path", RECIPES, ids=ids(RECIPES))
def test_recipe_parses_with_llamafactory(path, recipe_model_dirs, tmp_path):
    from llamafactory.hparams import get_train_args

    config = load(path)
    assert config.get("stage") in ("tpo", "dpo"), f"{path.name}: stage {config.get('stage')!r}"
    assert config["stage"] == path.stem[-3:], f"{path.name} has stage {config['stage']}"

    tiny = on_tiny_model(config, recipe_model_dirs)
    tiny["output_dir"] = str(tmp_path / "out")  # nothing is written, but keep the repository clean regardless
    model_args, data_args, training_args, finetuning_args, _ = get_train_args(tiny)

    assert finetuning_args.stage == config["stage"]
    assert finetuning_args.finetuning_type == config.get("finetuning_type", "lora")
    assert training_args.learning_rate == pytest.approx(float(config["learning_rate"]))
    assert finetuning_args.pref_beta == pytest.approx(float(config.get("pref_beta", 0.1)))
    assert finetuning_args.freeze_vision_tower == config.get("freeze_vision_tower", True)
    assert finetuning_args.freeze_multi_modal_projector == config.get("freeze_multi_modal_projector", True)
    assert data_args.dataset == dataset_names(config["dataset"])
    if config["stage"] == "tpo":
        for key in TPO_KEYS:
            assert getattr(finetuning_args, key) == config.get(key, tpo_defaults()[key]), key


@pytest.mark.parametrize("path", TPO_RECIPES, ids=ids(TPO_RECIPES))
def test_tpo_recipe_writes_out_every_tpo_key(path):
    config = load(path)
    # Every key that shapes the objective is written out; keys that only log or permit are left to defaults.
    missing = [key for key in TPO_KEYS if key not in config and key not in NON_OBJECTIVE_TPO_KEYS]
    assert not missing, f"{path.name} leaves {missing} implicit; write every tpo_* key of the objective out"


@pytest.mark.parametrize("path", RECIPES, ids=ids(RECIPES))
def test_recipe_datasets_exist(path):
    config = load(path)
    assert config.get("dataset_dir") == "data_info", f"{path.name}: dataset_dir must be data_info"
    info = json.loads((DATA_INFO / "dataset_info.json").read_text())
    names = dataset_names(config.get("dataset")) + dataset_names(config.get("eval_dataset"))
    assert names, f"{path.name} names no dataset"
    for name in names:
        assert name in info, f"{path.name}: dataset {name!r} is not in data_info/dataset_info.json"
        assert info[name].get("ranking") is True, f"{path.name}: {name!r} is not a preference (ranking) dataset"
        assert "images" in info[name].get("columns", {}), f"{path.name}: {name!r} has no images column"


@pytest.mark.parametrize("path", RECIPES, ids=ids(RECIPES))
def test_recipe_deepspeed_file_exists(path):
    config = load(path)
    if "deepspeed" not in config:
        assert config.get("finetuning_type") != "full", f"{path.name}: full fine-tuning recipe without DeepSpeed"
        return
    ds_file = ROOT / config["deepspeed"]
    assert ds_file.is_file(), f"{path.name}: {config['deepspeed']} does not exist"
    ds_config = json.loads(ds_file.read_text())
    assert ds_config["zero_optimization"]["stage"] in (0, 1, 2, 3)


@pytest.mark.parametrize("name, stage", [("ds_z2_config.json", 2), ("ds_z3_config.json", 3)])
def test_deepspeed_configs_leave_precision_and_batch_to_the_trainer(name, stage):
    ds_config = json.loads((RECIPES_DIR / "deepspeed" / name).read_text())
    assert ds_config["zero_optimization"]["stage"] == stage
    assert ds_config["bf16"]["enabled"] == "auto" and ds_config["fp16"]["enabled"] == "auto"
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        assert ds_config[key] == "auto", key


@pytest.mark.parametrize("path", TPO_RECIPES, ids=ids(TPO_RECIPES))
def test_tpo_and_dpo_recipes_differ_only_where_they_must(path):
    dpo_path = counterpart(path)
    assert dpo_path.is_file(), f"{path.name} has no DPO baseline {dpo_path.name}"
    tpo, dpo = load(path), load(dpo_path)
    assert tpo["stage"] == "tpo" and dpo["stage"] == "dpo"
    assert not [key for key in dpo if key.startswith("tpo_")], f"{dpo_path.name} has tpo_* keys"
    assert tpo["output_dir"] != dpo["output_dir"], "TPO and DPO would write to the same output_dir"
    assert shared_keys(tpo) == shared_keys(dpo)


@pytest.mark.parametrize("path", DPO_RECIPES, ids=ids(DPO_RECIPES))
def test_dpo_recipe_has_a_tpo_counterpart(path):
    assert counterpart(path).is_file(), f"{path.name} has no TPO counterpart {counterpart(path).name}"


@pytest.mark.e2e
@pytest.mark.parametrize("path", RECIPES, ids=ids(RECIPES))
def test_recipe_trains_one_step_on_cpu(path, recipe_model_dirs, dataset_dir, tmp_path):
    """Every key of the recipe is kept (lr, scheduler, freezing, LoRA, tpo_*, preprocessing and loader workers,
    bf16) except: the tiny model of the recipe's family (Qwen2.5-VL and Qwen3-VL their own), no DeepSpeed, local
    pairs of photo-sized images tokenised afresh, one step of batch 1, a short cutoff, a log entry at that step,
    and outputs in tmp_path. It runs without thread limits in the environment, as a user runs it."""
    config = load(path)
    output_dir = tmp_path / "out"
    tiny = on_tiny_model(config, recipe_model_dirs)
    tiny.update(
        dataset="photo_pairs",
        dataset_dir=str(dataset_dir),
        overwrite_cache=True,
        max_steps=1,
        cutoff_len=512,
        per_device_train_batch_size=1,
        logging_steps=1,
        output_dir=str(output_dir),
        report_to="none",
    )
    recipe = write_yaml(tmp_path / path.name, tiny)
    result = run_cli(["train", str(recipe)], cwd=tmp_path, timeout=300)
    output = result.stdout + result.stderr

    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 1
    (entry,) = [entry for entry in log_history(output_dir) if "loss" in entry]
    assert entry["learning_rate"] <= float(config["learning_rate"])
    if config["stage"] == "tpo":
        for key in TPO_METRICS:
            assert key in entry, key
        assert 0.5 < entry["tpo/weight_chosen"] < 1.5 and 0.5 < entry["tpo/weight_rejected"] < 1.5
    else:
        assert not [key for key in entry if key.startswith("tpo/")]

    # What LLaMA-Factory froze follows the recipe (0.9.5 freezes the projector unless told otherwise).
    assert (VISION_FROZEN_LOG in output) == config.get("freeze_vision_tower", True)
    assert (PROJECTOR_FROZEN_LOG in output) == config.get("freeze_multi_modal_projector", True)
    weights = "adapter_model.safetensors" if config.get("finetuning_type", "lora") == "lora" else "model.safetensors"
    assert (output_dir / weights).is_file(), weights
