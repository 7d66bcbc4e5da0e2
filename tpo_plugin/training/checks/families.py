"""Which vision-language families stage tpo is known to train, by LLaMA-Factory 0.9.5 template.

``tests/test_families.py`` trains a tiny model of each ``TRAINED`` family with ``stage: tpo`` and its template
(the model built from a config with its real processor, ``tpo_plugin.testing.tiny_models``), on a pair with two
images. Every other image template of LLaMA-Factory 0.9.5 is in ``UNTESTED`` with the reason: a chat format of a
trained architecture, a family whose checkpoints bring their own modelling code (nothing to build offline from a
transformers config), or one not tried yet. Those may well work (TPO corrupts images before the family's own
image processor, so any plugin that returns pixel tensors can be corrupted), but nothing here has shown it: the
run goes ahead with a warning that says so. A template whose multimodal plugin handles no images at all is refused
by ``checks.data.check_image_template``.

LLaMA-Factory 0.9.5 has no template for Idefics3 / SmolVLM or LLaVA-OneVision, so neither can be trained through
``llamafactory-cli`` at all, with any stage.
"""

from typing import Any, Optional

from llamafactory.extras import logging


logger = logging.get_logger("llamafactory.train.tpo")


TRAINED = {
    "qwen2_vl": "Qwen2-VL and Qwen2.5-VL (LLaMA-Factory 0.9.5 has no separate qwen2_5_vl template)",
    "qwen3_vl": "Qwen3-VL, dense and MoE, thinking models",
    "qwen3_vl_nothink": "Qwen3-VL, instruct models",
    "qwen3_5": "Qwen3.5",
    "llava": "LLaVA-1.5",
    "llava_next": "LLaVA-NeXT (Vicuna/Llama-2 chat format)",
    "llava_next_video": "LLaVA-NeXT-Video (Vicuna chat format)",
    "video_llava": "Video-LLaVA",
    "intern_vl": "InternVL (transformers port)",
    "gemma3": "Gemma 3",
    "paligemma": "PaliGemma",
    "pixtral": "Pixtral",
    "mistral_small": "Mistral 3 (Mistral-Small-3.1 / 3.2)",
    "glm4v": "GLM-4.1V",
    "glm4_5v": "GLM-4.5V",
    "mllama": "Llama 3.2 Vision",
    "llama4": "Llama 4 (bf16 only: its image processor returns bfloat16 pixels)",
}
"""Templates with which stage tpo has trained a tiny model of the family in the tests."""

_CHAT_FORMAT = "another chat format of a trained architecture"
_REMOTE_CODE = (
    "its checkpoints bring their own modelling code: there is no transformers config to build a tiny model from"
)
_NOT_TRIED = "transformers builds it, but no tiny model of it has been trained here yet"

UNTESTED = {
    "qwen3_5_nothink": ("Qwen3.5, instruct", _CHAT_FORMAT + " (qwen3_5)"),
    "qwen3_6": ("Qwen3.6", _CHAT_FORMAT + " (qwen3_5)"),
    "mimo_vl": ("MiMo-VL", _CHAT_FORMAT + " (Qwen2.5-VL)"),
    "llava_next_llama3": ("LLaVA-NeXT, Llama-3", _CHAT_FORMAT + " (llava_next)"),
    "llava_next_mistral": ("LLaVA-NeXT, Mistral", _CHAT_FORMAT + " (llava_next)"),
    "llava_next_qwen": ("LLaVA-NeXT, Qwen", _CHAT_FORMAT + " (llava_next)"),
    "llava_next_yi": ("LLaVA-NeXT, Yi", _CHAT_FORMAT + " (llava_next)"),
    "llava_next_video_mistral": ("LLaVA-NeXT-Video, Mistral", _CHAT_FORMAT + " (llava_next_video)"),
    "llava_next_video_yi": ("LLaVA-NeXT-Video, Yi", _CHAT_FORMAT + " (llava_next_video)"),
    "yi_vl": ("Yi-VL", _CHAT_FORMAT + " (llava)"),
    "granite3_vision": ("Granite 3 Vision", _CHAT_FORMAT + " (llava_next)"),
    "paligemma_chat": ("PaliGemma, chat", _CHAT_FORMAT + " (paligemma)"),
    "ministral3": ("Ministral 3", _CHAT_FORMAT + " (mistral_small)"),
    "intern_s1": ("Intern-S1", _REMOTE_CODE),
    "keye_vl": ("Keye-VL", _REMOTE_CODE),
    "kimi_vl": ("Kimi-VL", _REMOTE_CODE),
    "minicpm_v": ("MiniCPM-V", _REMOTE_CODE),
    "minicpm_v_4_6": ("MiniCPM-V 4.6", _REMOTE_CODE),
    "minicpm_o": ("MiniCPM-o", _REMOTE_CODE),
    "dots_ocr": ("dots.ocr", _REMOTE_CODE),
    "youtu_vl": ("Youtu-VL", _REMOTE_CODE),
    "gemma3n": ("Gemma 3n", "its vision tower needs timm, which neither LLaMA-Factory nor this plugin installs"),
    "gemma4": ("Gemma 4", _NOT_TRIED),
    "gemma4n": ("Gemma 4n", _NOT_TRIED),
    "glm_ocr": ("GLM-OCR", _NOT_TRIED),
    "ernie_vl": ("ERNIE-4.5-VL", _NOT_TRIED),
    "lfm2_vl": ("LFM2-VL", _NOT_TRIED),
    "qwen2_omni": ("Qwen2.5-Omni", _NOT_TRIED),
    "qwen3_omni": ("Qwen3-Omni", _NOT_TRIED),
    "qwen3_omni_nothink": ("Qwen3-Omni, instruct", _NOT_TRIED),
}
"""The other image templates of LLaMA-Factory 0.9.5: family, and why no tiny model of it has trained here."""

NO_TEMPLATE = {
    "Idefics3 / SmolVLM": "LLaMA-Factory 0.9.5 has no template (nor multimodal plugin) for it",
    "LLaVA-OneVision": "LLaMA-Factory 0.9.5 has no template (nor multimodal plugin) for it",
}
"""Families transformers builds but LLaMA-Factory 0.9.5 cannot train at all."""


VIDEO_TRAINED = {
    "qwen2_vl": "Qwen2-VL and Qwen2.5-VL",
    "qwen3_vl": "Qwen3-VL, thinking models",
    "qwen3_vl_nothink": "Qwen3-VL, instruct models",
}
"""Templates with which stage tpo has trained video pairs in the tests (``tests/test_video.py``)."""

VIDEO_FAILS = {
    "video_llava": "LLaMA-Factory 0.9.5 passes `images=` to its video processor, which transformers 5 refuses",
    "llava_next_video": "LLaMA-Factory 0.9.5 passes `images=` to its video processor, which transformers 5 refuses",
}
"""Video templates whose videos LLaMA-Factory cannot turn into model inputs here, with any stage."""


def video_refusal(template_name: Optional[str], template: Any) -> Optional[str]:
    """Why stage tpo refuses video pairs with this template, or ``None`` when it trains them.

    Video pairs are refused with templates not trained with videos here: unlike an untested image family, a video
    family's frame handling differs from one plugin to the next, so a warning would not be enough.
    """
    if template_name in VIDEO_TRAINED:
        return None
    if template.mm_plugin.video_token is None:
        return f"template `{template_name}` takes no videos"
    why = VIDEO_FAILS.get(template_name or "", "stage tpo has not trained video pairs with it yet")
    return (
        f"template `{template_name}` is not one stage tpo trains videos with ({why}); video pairs train with "
        f"{', '.join(VIDEO_TRAINED)}, or with `stage: dpo`"
    )


def check_template_family(template_name: Optional[str]) -> None:
    """Warn, naming the template, when stage tpo has not been shown to train its family."""
    if template_name in TRAINED:
        return
    unknown = ("this model family", "a template newer than LLaMA-Factory 0.9.5's")
    family, reason = UNTESTED.get(template_name or "", unknown)
    logger.warning_rank0(
        f"Stage tpo has not been tested with template `{template_name}` ({family}: {reason}); it is tested with "
        f"{', '.join(sorted(TRAINED))}. Check that the logged tpo/score_* values move when the image changes."
    )
