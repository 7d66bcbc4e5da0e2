"""Which vision-language families stage tpo is known to train, by LLaMA-Factory 0.9.5 template.

``tests/test_e2e_train.py``, ``tests/test_families.py`` and ``tests/test_recipes.py`` train a tiny model of each
``TRAINED`` family with ``stage: tpo`` and its template (the model built from a config, its real processor).
Other image templates of LLaMA-Factory may well work (TPO corrupts images before the family's own image
processor, so any plugin that returns pixel tensors can be corrupted), but nothing here has shown it: the run
goes ahead with a warning that says so. A template whose multimodal plugin handles no images at all is refused by
``data_checks.check_image_template``.

LLaMA-Factory 0.9.5 has no template for Idefics3 / SmolVLM or LLaVA-OneVision, so neither can be trained through
``llamafactory-cli`` at all, with any stage.
"""

from typing import Optional

from llamafactory.extras import logging


logger = logging.get_logger("llamafactory.train.tpo")


TRAINED = {
    "qwen2_vl": "Qwen2-VL and Qwen2.5-VL (LLaMA-Factory 0.9.5 has no separate qwen2_5_vl template)",
    "qwen3_vl": "Qwen3-VL (dense), thinking models",
    "qwen3_vl_nothink": "Qwen3-VL (dense), instruct models",
    "llava": "LLaVA-1.5",
    "llava_next": "LLaVA-NeXT (Vicuna/Llama-2 chat format; the other llava_next_* templates are untested)",
}
"""Templates with which stage tpo has trained a tiny model of the family in the tests."""

UNTESTED = {
    "intern_vl": "InternVL (transformers port)",
    "gemma3": "Gemma 3",
    "pixtral": "Pixtral",
    "mistral_small": "Mistral 3 (Mistral-Small-3.1)",
    "ministral3": "Ministral 3",
    "glm4v": "GLM-4.1V",
    "glm4_5v": "GLM-4.5V",
    "paligemma": "PaliGemma",
    "paligemma_chat": "PaliGemma (chat)",
}
"""Image templates of LLaMA-Factory 0.9.5 for families a tiny model has not yet been trained with here."""

NO_TEMPLATE = {
    "Idefics3 / SmolVLM": "LLaMA-Factory 0.9.5 has no template (nor multimodal plugin) for it",
    "LLaVA-OneVision": "LLaMA-Factory 0.9.5 has no template (nor multimodal plugin) for it",
}
"""Families transformers builds but LLaMA-Factory 0.9.5 cannot train at all."""


def check_template_family(template_name: Optional[str]) -> None:
    """Warn, naming the template, when stage tpo has not been shown to train its family."""
    if template_name in TRAINED:
        return
    family = UNTESTED.get(template_name or "", "this model family")
    logger.warning_rank0(
        f"Stage tpo has not been tested with template `{template_name}` ({family}); it is tested with "
        f"{', '.join(sorted(TRAINED))}. Check that the logged tpo/score_* values move when the image changes."
    )
