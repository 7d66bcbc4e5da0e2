"""Greedy answers to several image questions in one ``generate`` call, with the model LLaMA-Factory's Hugging Face
engine loaded.

LLaMA-Factory's ``HuggingfaceEngine`` answers one conversation per ``generate`` call. Here a batch of prompts is
built exactly as its ``_process_args`` builds one (the template's ``mm_plugin.process_messages``, ``encode_oneturn``
with the template's default system, ``mm_plugin.process_token_ids``), the family's processor turns the batch's
images into one set of tensors (``mm_plugin.get_mm_inputs``, as LLaMA-Factory's training collator does), the
prompts are padded on the left and ``model.generate`` runs once. The engine's model, tokenizer, processor,
template and generating arguments are used as loaded, so base models, LoRA adapters, merged and full models are
answered as ``ChatModel.chat`` answers them.

Why the answers equal one-at-a-time answers: left padding keeps every prompt's last token in the last column; the
attention mask hides the padding from attention, and the position ids are computed from it (``cumsum`` of the mask
for Llama-like models; Qwen2-VL's M-RoPE ``get_rope_index`` skips masked tokens). Each answer is cut after its
first stop token, as generation stops there when the prompt is alone; what ``generate`` writes after it (padding)
is dropped. Tested token for token on CPU in float32 (tiny Qwen2-VL and LLaVA, ``tests/test_eval_batched.py``). In
half precision on a GPU, kernels picked by the batch's shape can round differently from a single row's, so an
answer whose two most likely next tokens are nearly tied may come out differently, as between batch sizes of vLLM.
"""

from typing import Any


UNBATCHED_MODEL_TYPES = ("minicpmv", "minicpmo")
"""Model types whose ``generate`` takes other arguments (the tokenizer, unpadded ids), which the engine passes one
conversation at a time: these are answered one question at a time, through ``ChatModel.chat``."""


def generation_config_arguments(generating_args: dict[str, Any], stop_token_ids: list[int], pad_token_id: int) -> dict:
    """The ``GenerationConfig`` arguments LLaMA-Factory's ``_process_args`` derives from the engine's generating
    arguments for a request without overrides: stop and pad tokens set, greedy when the temperature is 0 (then
    without ``temperature`` and ``top_p``), ``max_new_tokens`` winning over ``max_length``."""
    arguments = {**generating_args, "num_return_sequences": 1, "eos_token_id": stop_token_ids}
    arguments["pad_token_id"] = pad_token_id
    if not arguments.get("temperature"):
        arguments["do_sample"] = False
    if not arguments["do_sample"]:
        arguments.pop("temperature", None)
        arguments.pop("top_p", None)
    if arguments.get("max_new_tokens"):
        arguments.pop("max_length", None)
    return arguments


def left_padded(sequences: list[list[int]], pad_token_id: int) -> tuple[list[list[int]], list[list[int]]]:
    """``sequences`` padded on the left to the longest, and their attention masks (0 on padding, 1 elsewhere)."""
    width = max(len(sequence) for sequence in sequences)
    padded = [[pad_token_id] * (width - len(sequence)) + sequence for sequence in sequences]
    masks = [[0] * (width - len(sequence)) + [1] * len(sequence) for sequence in sequences]
    return padded, masks


def cut_after_first_stop(token_ids: list[int], stop_token_ids: set[int]) -> list[int]:
    """``token_ids`` up to and including the first stop token (all of them if there is none)."""
    for position, token_id in enumerate(token_ids):
        if token_id in stop_token_ids:
            return token_ids[: position + 1]
    return token_ids


class BatchedGenerator:
    """Answers prompts about one image each, a batch per ``generate`` call, with the model, tokenizer, processor,
    template and generating arguments of a loaded LLaMA-Factory ``HuggingfaceEngine``."""

    def __init__(self, engine: Any):
        self.model, self.tokenizer, self.processor = engine.model, engine.tokenizer, engine.processor
        self.template = engine.template
        self.stop_token_ids = list(self.template.get_stop_token_ids(self.tokenizer))
        self.generating_args = generation_config_arguments(
            engine.generating_args, self.stop_token_ids, self.tokenizer.pad_token_id
        )
        self.skip_special_tokens = self.generating_args.get("skip_special_tokens", True)

    def prompt_ids(self, text: str, image: str) -> list[int]:
        """The token ids of one user turn holding ``image`` and ``text``, as the engine builds them."""
        from llamafactory.extras.constants import IMAGE_PLACEHOLDER

        content = text if IMAGE_PLACEHOLDER in text else IMAGE_PLACEHOLDER + text
        plugin = self.template.mm_plugin
        messages = plugin.process_messages([{"role": "user", "content": content}], [image], [], [], self.processor)
        paired = messages + [{"role": "assistant", "content": ""}]
        ids, _ = self.template.encode_oneturn(self.tokenizer, paired, None, None)
        ids, _ = plugin.process_token_ids(ids, None, [image], [], [], self.tokenizer, self.processor)
        return ids

    def model_inputs(self, prompts: list[tuple[str, str]]) -> dict[str, Any]:
        """``generate``'s keyword arguments for ``prompts`` ((text, image path) each): left-padded ids, attention
        mask and the processor's image tensors for the whole batch (floating ones in the model's dtype)."""
        import torch

        ids = [self.prompt_ids(text, image) for text, image in prompts]
        images = [image for _, image in prompts]
        count = len(prompts)
        mm_inputs = self.template.mm_plugin.get_mm_inputs(
            images, [], [], [1] * count, [0] * count, [0] * count, ids, self.processor
        )
        padded, masks = left_padded(ids, self.tokenizer.pad_token_id)
        device = self.model.device
        inputs = {
            "input_ids": torch.tensor(padded, device=device),
            "attention_mask": torch.tensor(masks, device=device),
        }
        for key, value in mm_inputs.items():
            if key == "second_per_grid_ts":  # Qwen2.5-VL takes it as a list, as the engine passes it
                inputs[key] = value.tolist() if isinstance(value, torch.Tensor) else list(value)
                continue
            if not isinstance(value, torch.Tensor):
                value = torch.stack(value) if isinstance(value[0], torch.Tensor) else torch.tensor(value)
            inputs[key] = value.to(device, self.model.dtype if torch.is_floating_point(value) else None)
        return inputs

    def generate(self, prompts: list[tuple[str, str]]) -> list[str]:
        """The decoded answer to each of ``prompts`` ((text, image path) each), in order, from one ``generate``."""
        import torch
        from transformers import GenerationConfig

        inputs = self.model_inputs(prompts)
        with torch.inference_mode():
            output = self.model.generate(**inputs, generation_config=GenerationConfig(**self.generating_args))
        prompt_width = inputs["input_ids"].shape[1]
        stops = set(self.stop_token_ids)
        answers = [cut_after_first_stop(row[prompt_width:].tolist(), stops) for row in output]
        return self.tokenizer.batch_decode(
            answers, skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=True
        )
