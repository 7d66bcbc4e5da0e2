"""What TPO trains is usable by the rest of LLaMA-Factory: the LoRA adapter merges with
``llamafactory-cli export``; adapter, merged model and a full fine-tune load in ``ChatModel`` and answer
a question about an image."""

import pytest

from conftest import run_cli, train_config, write_yaml


pytestmark = pytest.mark.e2e


def ask_about_image(image_path: str, **model) -> str:
    from llamafactory.chat import ChatModel

    chat_model = ChatModel({**model, "template": "qwen2_vl", "max_new_tokens": 6, "do_sample": False})
    (response,) = chat_model.chat([{"role": "user", "content": "<image>What is in the picture?"}], images=[image_path])
    return response.response_text


def test_lora_adapter_merges_and_answers(model_dirs, dataset_dir, tmp_path):
    base = str(model_dirs["qwen2_vl"])
    adapter_dir, merged_dir = tmp_path / "adapter", tmp_path / "merged"
    config = train_config(model_dirs["qwen2_vl"], "qwen2_vl", dataset_dir, adapter_dir, learning_rate=5e-2)
    run_cli(["train", str(write_yaml(tmp_path / "tpo.yaml", config))], cwd=tmp_path)

    export = {
        "model_name_or_path": base,
        "adapter_name_or_path": str(adapter_dir),
        "template": "qwen2_vl",
        "finetuning_type": "lora",
        "export_dir": str(merged_dir),
        "export_device": "cpu",
    }
    run_cli(["export", str(write_yaml(tmp_path / "export.yaml", export))], cwd=tmp_path)
    assert (merged_dir / "model.safetensors").is_file() and (merged_dir / "processor_config.json").is_file()

    image = str(dataset_dir / "img" / "0.png")
    with_adapter = ask_about_image(image, model_name_or_path=base, adapter_name_or_path=str(adapter_dir))
    merged = ask_about_image(image, model_name_or_path=str(merged_dir))
    untrained = ask_about_image(image, model_name_or_path=base)
    assert isinstance(merged, str) and merged == with_adapter  # greedy answers agree: the merge is faithful
    assert merged != untrained  # and the adapter did change the model


def test_full_fine_tune_answers(model_dirs, dataset_dir, tmp_path):
    output_dir = tmp_path / "full"
    config = train_config(model_dirs["qwen2_vl"], "qwen2_vl", dataset_dir, output_dir, finetuning_type="full")
    config.pop("lora_target")
    run_cli(["train", str(write_yaml(tmp_path / "tpo.yaml", config))], cwd=tmp_path)
    assert isinstance(ask_about_image(str(dataset_dir / "img" / "1.png"), model_name_or_path=str(output_dir)), str)
