"""What a TPO checkpoint must be: never written with non-finite weights, and reloaded with the weights it holds.

Both are overrides of transformers' ``Trainer`` that have nothing to do with TPO's loss, kept out of the trainer
as a mix-in (:class:`CheckpointGuards`) that it inherits before LLaMA-Factory's DPO trainer.
"""

import os
from typing import Any

import torch
from peft import PeftModel

from .stopping import any_rank


NUMERICS_ADVICE = "Lower `learning_rate` or check the bf16/fp16 settings, then resume with `resume_from_checkpoint`."
FULL_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def has_full_weights(checkpoint: str) -> bool:
    return any(os.path.isfile(os.path.join(checkpoint, name)) for name in FULL_WEIGHT_FILES)


class CheckpointGuards:
    """Trainer mix-in: refuse to save non-finite weights, and reload full weights through ``from_pretrained``."""

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        # transformers 5.6's Trainer reloads full weights with a plain load_state_dict, without the key mapping
        # from_pretrained applies (e.g. Qwen2-VL saves `model.layers.*` for `model.language_model.layers.*`):
        # every key is missed and the resumed run silently restarts from the initial weights. Reload through
        # from_pretrained instead; adapters (PEFT), DeepSpeed and FSDP checkpoints take the usual path.
        unwrapped = self.accelerator.unwrap_model(model if model is not None else self.model)
        if isinstance(unwrapped, PeftModel) or not has_full_weights(resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)

        reloaded = type(unwrapped).from_pretrained(resume_from_checkpoint, dtype=unwrapped.dtype, device_map="cpu")
        unwrapped.load_state_dict(reloaded.state_dict(), strict=True)

    def _save_checkpoint(self, model, trial):
        # An update can turn weights non-finite while its own loss was finite: never save such weights.
        trainable = [param for param in self.model.parameters() if param.requires_grad]
        if any_rank(self.accelerator, torch.stack([~torch.isfinite(param).all() for param in trainable]).any()):
            raise FloatingPointError(
                f"Stage tpo stopped at step {self.state.global_step}: the update made weights non-finite (nan/inf), "
                f"so checkpoint-{self.state.global_step} was not written; checkpoints already saved in "
                f"{self.args.output_dir} are intact. {NUMERICS_ADVICE}"
            )
        return super()._save_checkpoint(model, trial)
