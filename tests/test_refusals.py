"""Data and options TPO cannot use are refused through LLaMA-Factory's ``run_exp`` with a message that
names the problem, before the model is loaded and before anything that looks like a finished run."""

import json
import shutil
from io import BytesIO

import pytest

from conftest import PAIR_COLUMNS, draw, preference_rows, run_cli, train_config, write_yaml


pytestmark = pytest.mark.e2e


def run_exp_error(config) -> str:
    from llamafactory.train.tuner import run_exp

    with pytest.raises(ValueError) as error:
        run_exp(args=config)
    return str(error.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"template": "qwen"}, "Template `qwen` has no multimodal plugin for images, but stage tpo needs one"),
        ({"dataset": "tiny_sft"}, "Dataset `tiny_sft` (sft.json) is not a ranking (preference) dataset"),
        ({"dataset": "text_pairs"}, "No training pair has an image"),
        ({"tpo_noise_step": 1000}, "`tpo_noise_step` must be an integer in 0..999, got 1000"),
        ({"tpo_reward_on": "all"}, "`tpo_reward_on` must be one of both, chosen, rejected, none; got 'all'"),
        ({"pref_loss": "orpo"}, "`pref_loss: orpo` is not supported by stage tpo"),
        ({"stage": "dpo", "tpo_corruption": "blank"}, "`tpo_corruption: blank` is only used by `stage: tpo`"),
    ],
)
def test_refused_before_training(overrides, message, model_dirs, dataset_dir, tmp_path):
    output_dir = tmp_path / "out"
    config = train_config(model_dirs["qwen2_vl"], "qwen2_vl", dataset_dir, output_dir, **overrides)
    assert message in run_exp_error(config)
    assert not (output_dir / "trainer_state.json").exists()
    assert not any(output_dir.glob("*.safetensors")) if output_dir.exists() else True


@pytest.fixture(scope="module")
def hostile_dataset_dir(tmp_path_factory):
    """Datasets a careless or hostile source produces: a truncated JPEG (PIL's verify() accepts it), an <image>
    placeholder in an answer, and a JSON file nested deeper than Python's reader recurses."""
    root = tmp_path_factory.mktemp("hostile")
    (root / "img").mkdir()
    rows = preference_rows(root / "img", 2)
    jpeg = BytesIO()
    draw("red", "ball", (320, 240)).save(jpeg, "JPEG")
    (root / "img" / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    files = {
        "truncated": [rows[0], {**rows[1], "images": ["img/truncated.jpg"]}],
        "image_in_answer": [{**rows[0], "rejected": {"from": "gpt", "value": "<image>A red ball and a dog."}}],
    }
    for name, samples in files.items():
        (root / f"{name}.json").write_text(json.dumps(samples))
    (root / "nested.json").write_text("[" * 100_000 + "]" * 100_000)
    info = {
        name: {"file_name": f"{name}.json", "formatting": "sharegpt", "ranking": True, "columns": PAIR_COLUMNS}
        for name in (*files, "nested")
    }
    (root / "dataset_info.json").write_text(json.dumps(info))
    return root


@pytest.mark.parametrize(
    "dataset, message",
    [
        ("truncated", "dataset `truncated`, sample 1: image `"),
        ("truncated", "truncated.jpg` cannot be decoded (image file is truncated"),
        ("image_in_answer", "dataset `image_in_answer`, sample 0: field `rejected` holds an <image> placeholder"),
        ("nested", "nested.json`: is nested too deeply to read as samples"),
    ],
)
def test_hostile_data_is_named_before_the_model_loads(dataset, message, model_dirs, hostile_dataset_dir, tmp_path):
    config = train_config(model_dirs["qwen2_vl"], "qwen2_vl", hostile_dataset_dir, tmp_path / "out", dataset=dataset)
    assert message in run_exp_error(config)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"streaming": True, "max_steps": 2}, "`streaming: true` is not supported by stage tpo"),
        ({"packing": True}, "`packing: true` is not supported by stage tpo"),
    ],
)
def test_streaming_and_packing_are_refused(overrides, message, model_dirs, dataset_dir, tmp_path):
    config = train_config(model_dirs["qwen2_vl"], "qwen2_vl", dataset_dir, tmp_path / "out", **overrides)
    assert message in run_exp_error(config)


def other_vocabulary(model_dir, target):
    """A copy of the model whose tokenizer gives two tokens each other's ids."""
    shutil.copytree(model_dir, target)
    tokenizer = json.loads((target / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = list(vocab)[300:302]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (target / "tokenizer.json").write_text(json.dumps(tokenizer))
    return target


@pytest.mark.parametrize(
    "reference, message",
    [
        ("llava", "it is a `llava` model, the policy a `qwen2_vl` model"),
        ("other_vocabulary", "its vocabulary differs ("),
    ],
)
def test_a_reference_model_that_reads_ids_otherwise_is_refused(reference, message, model_dirs, dataset_dir, tmp_path):
    ref_model = (
        model_dirs["llava"] if reference == "llava" else other_vocabulary(model_dirs["qwen2_vl"], tmp_path / "ref")
    )
    config = train_config(
        model_dirs["qwen2_vl"],
        "qwen2_vl",
        dataset_dir,
        tmp_path / "out",
        finetuning_type="full",
        ref_model=str(ref_model),
    )
    config.pop("lora_target")
    error = run_exp_error(config)
    assert f"`ref_model: {ref_model}` cannot be the reference of" in error and message in error


def test_cli_reports_invalid_value_of_override(model_dirs, dataset_dir, tmp_path):
    config = train_config(model_dirs["qwen2_vl"], "qwen2_vl", dataset_dir, tmp_path / "out")
    recipe = write_yaml(tmp_path / "tpo.yaml", config)
    result = run_cli(["train", str(recipe), "tpo_score=prob"], cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert "`tpo_score` must be one of logit, logprob; got 'prob'" in result.stderr


@pytest.mark.parametrize(
    "in_yaml, override, message",
    [
        ({"tpo_reward_offset": float("inf")}, [], "`tpo_reward_offset` must be a finite number >= 0, got inf"),
        ({"pref_beta": float("nan")}, [], "`pref_beta` must be a number > 0, got nan"),
        ({}, ["pref_beta=-0.5"], "`pref_beta` must be a number > 0, got -0.5"),
        ({}, ["dpo_label_smoothing=0.9"], "`dpo_label_smoothing` must be a number in [0, 0.5) (0: off), got 0.9"),
    ],
)
def test_cli_refuses_objective_keys_outside_their_range(in_yaml, override, message, model_dirs, dataset_dir, tmp_path):
    # Outside these ranges LLaMA-Factory trains the objective backwards or not at all, with metrics that look fine.
    output_dir = tmp_path / "out"
    config = train_config(model_dirs["qwen2_vl"], "qwen2_vl", dataset_dir, output_dir, **in_yaml)
    result = run_cli(["train", str(write_yaml(tmp_path / "tpo.yaml", config)), *override], cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Loading weights" not in result.stdout + result.stderr and not output_dir.exists()


def test_cli_argv_rejects_unknown_choice(model_dirs, dataset_dir, tmp_path):
    result = run_cli(
        ["train", "--stage", "tpo", "--tpo_corruption", "gaussian", "--model_name_or_path", str(model_dirs["llava"])],
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode != 0
    assert "--tpo_corruption" in result.stderr and "'diffusion', 'blank'" in result.stderr


def test_bad_samples_are_named_before_the_model_loads(model_dirs, dataset_dir, tmp_path):
    config = train_config(model_dirs["qwen2_vl"], "qwen2_vl", dataset_dir, tmp_path / "out", dataset="broken_pairs")
    message = run_exp_error(config)
    assert "The preference data has 4 problem(s)" in message
    assert "dataset `broken_pairs`, sample 0: image `img/missing.png` does not exist" in message
    assert "dataset `broken_pairs`, sample 1: image `" in message and "broken.png` cannot be decoded" in message
    assert "dataset `broken_pairs`, sample 2: has 2 <image> placeholder(s) but 1 image(s)" in message
    assert "dataset `broken_pairs`, sample 3: field `rejected` is empty" in message
    assert "sample 4" not in message
