"""QLoRA: ``stage: tpo`` trains a LoRA adapter on a model that bitsandbytes quantized to 4 or 8 bits, on CPU.

(Freeze fine-tuning is trained in ``test_families.py``.)
"""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from tpo_plugin.training.batch.keys import PAIR_IMAGES_KEY

from conftest import run_cli, train_config, train_logs, write_yaml


LOGGED_TPO_METRICS = ("tpo/score_chosen", "tpo/score_rejected", "tpo/weight_chosen", "tpo/weight_rejected")


def bitsandbytes_problem(bits: int) -> str | None:
    """Why bitsandbytes cannot run ``bits``-bit layers here, or None if it can."""
    try:
        import bitsandbytes
    except ImportError:
        return "bitsandbytes is not installed (pip install -e '.[qlora]')"
    if bits == 4:
        layer = bitsandbytes.nn.Linear4bit(64, 64)
    else:
        layer = bitsandbytes.nn.Linear8bitLt(64, 64, has_fp16_weights=False)
    try:
        layer.to("cpu")(torch.randn(2, 64))
    except Exception as error:  # a missing or broken CPU backend fails in many ways
        return f"bitsandbytes {bitsandbytes.__version__} cannot run {bits}-bit layers on this CPU: {error!r}"
    return None


def unquantized_chosen_logps(model_dir, dataset_dir, tmp_path) -> float:
    """``logps/chosen`` of the first step for the unquantized model: the first two pairs' mean summed log p.

    At the first step the LoRA adapter is zero, so the policy is the base model.
    """
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    from tpo_plugin.training.batch.collator import corrupter_and_collator

    config = train_config(model_dir, "qwen2_vl", dataset_dir, tmp_path / "unquantized")
    model_args, data_args, training_args, finetuning_args, _ = get_train_args(config)
    tokenizer_module = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
    dataset = get_dataset(template, model_args, data_args, training_args, stage="rm", **tokenizer_module)
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    _, collator = corrupter_and_collator(template, model, tokenizer_module, data_args, finetuning_args, 0)
    batch = collator([dict(dataset["train_dataset"][index]) for index in range(2)])
    batch.pop(PAIR_IMAGES_KEY)
    labels = batch.pop("labels")[:2, 1:]  # the chosen rows; position t predicts token t + 1
    with torch.no_grad():
        log_probs = model(**batch).logits[:2, :-1].float().log_softmax(dim=-1)
    mask = labels != -100
    token_logps = log_probs.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return float((token_logps * mask).sum(dim=-1).mean())


@pytest.mark.e2e
@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_trains_tpo_on_a_quantized_model(bits, model_dirs, dataset_dir, tmp_path):
    problem = bitsandbytes_problem(bits)
    if problem:
        pytest.skip(problem)

    output_dir = tmp_path / "out"
    config = train_config(
        model_dirs["qwen2_vl"], "qwen2_vl", dataset_dir, output_dir, quantization_bit=bits, disable_shuffling=True
    )
    result = run_cli(["train", str(write_yaml(tmp_path / "tpo.yaml", config))], cwd=tmp_path)

    assert f"Quantizing model to {bits} bit with bitsandbytes." in result.stdout + result.stderr
    logs = train_logs(output_dir)
    assert len(logs) == 2
    for entry in logs:
        for key in ("loss", "grad_norm", "rewards/margins", "logps/chosen") + LOGGED_TPO_METRICS:
            assert torch.isfinite(torch.tensor(entry[key])), (key, entry)
    # The first step scored the two first pairs with the quantized weights: close to, not equal to, full precision.
    unquantized = unquantized_chosen_logps(model_dirs["qwen2_vl"], dataset_dir, tmp_path)
    assert logs[0]["logps/chosen"] == pytest.approx(unquantized, rel=0.05)
    assert abs(logs[0]["logps/chosen"] - unquantized) > 1e-3
    adapter = load_file(output_dir / "adapter_model.safetensors")
    assert any(value.abs().sum() > 0 for key, value in adapter.items() if "lora_B" in key)  # the adapter trained
