"""Evaluation of a trained model directory on the world's test set: captions, CHAIR, prior hallucination, POPE.

Captions are greedy (``generate`` with ``do_sample=False``), batched with left padding. The POPE-style probe
("Is there a ball in the image?") is read from one forward pass: the answer is "yes" when the next-token logit
of ``Yes`` exceeds that of ``No`` (the two answers the SFT data teaches; comparing only these two makes
the probe a forced choice, so a model that would start with another token still gets a yes/no answer).

The prompt is built exactly as LLaMA-Factory's ``qwen2_vl`` template builds it for training (default system
message, image placeholder before the question), so the model is asked as it was taught.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

from .world import CAPTION_PROMPT, PARTNER, PROBE_PROMPT, TRIGGER, TRIGGER_ONLY, mentioned_objects


SYSTEM = "You are a helpful assistant."
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def chat_prompt(question: str) -> str:
    """The ``qwen2_vl`` template's text of a one-image user turn, up to the start of the answer."""
    return (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{IMAGE}{question}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def load(model_dir: Path) -> tuple[Qwen2VLForConditionalGeneration, AutoProcessor]:
    model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    processor.tokenizer.padding_side = "left"
    return model, processor


@torch.no_grad()
def generate_captions(model, processor, images: list[Image.Image], batch_size: int, max_new_tokens: int = 20):
    """Greedy captions of ``images``, decoded without special tokens."""
    captions = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        inputs = processor(
            text=[chat_prompt(CAPTION_PROMPT)] * len(batch), images=batch, return_tensors="pt", padding=True
        )
        output = model.generate(
            **inputs,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=processor.tokenizer.eos_token_id,
            pad_token_id=processor.tokenizer.pad_token_id,
        )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        captions += processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return [text.strip() for text in captions]


@torch.no_grad()
def probe_answers(model, processor, images: list[Image.Image], objects: list[str], batch_size: int) -> list[bool]:
    """For each (image, object): does the model answer "Yes" rather than "No" to "Is there a {object}...?"."""
    yes_id, no_id = processor.tokenizer.convert_tokens_to_ids(["Yes", "No"])
    answers = []
    for start in range(0, len(images), batch_size):
        texts = [chat_prompt(PROBE_PROMPT.format(obj=name)) for name in objects[start : start + batch_size]]
        inputs = processor(text=texts, images=images[start : start + batch_size], return_tensors="pt", padding=True)
        logits = model(**inputs).logits[:, -1]
        answers += (logits[:, yes_id] > logits[:, no_id]).tolist()
    return answers


def evaluate_model(model_dir: Path, world_dir: Path, batch_size: int = 64) -> dict:
    """Every metric of one model on one world's test set; captions and probe answers are kept for inspection."""
    rows = json.loads((world_dir / "test.json").read_text())
    images = [Image.open(world_dir / row["image"]).convert("RGB") for row in rows]
    model, processor = load(model_dir)
    captions = generate_captions(model, processor, images, batch_size)
    probe_images = [image for image in images for _ in range(2)]
    probes = [probe for row in rows for probe in row["probes"]]
    answers = probe_answers(model, processor, probe_images, [name for name, _ in probes], batch_size)
    metrics = {
        **caption_metrics(rows, captions),
        **pope_metrics([truth for _, truth in probes], answers),
        "pope_partner_yes_on_trigger_only": _mean(
            answer
            for (name, _), answer, row in zip(probes, answers, [r for r in rows for _ in range(2)], strict=True)
            if row["kind"] == TRIGGER_ONLY and name == PARTNER
        ),
    }
    details = [
        {
            "image": row["image"],
            "objects": row["objects"],
            "caption": text,
            "probes": row["probes"],
            "answers": answers[2 * index : 2 * index + 2],
        }
        for index, (row, text) in enumerate(zip(rows, captions, strict=True))
    ]
    return {"metrics": metrics, "details": details}


def caption_metrics(rows: list[dict], captions: list[str]) -> dict:
    """Object recall, CHAIR_i / CHAIR_s, the prior-object hallucination and recall rates, objects per caption.

    - ``recall``: share of the objects in the images that the captions name (over all test images);
    - ``chair_i``: share of named objects that are not in the image; ``chair_s``: share of captions naming one;
    - ``prior_hallucination``: share of trigger-without-partner images whose caption names the partner;
    - ``partner_recall``: share of images with the partner whose caption names it (``..._alone``: without
      the trigger, where the prior cannot help);
    - ``objects_per_caption``: mean number of objects named.
    """
    named = [mentioned_objects(text) for text in captions]
    truths = [set(row["objects"]) for row in rows]
    num_named = sum(len(n) for n in named)
    false = [n - t for n, t in zip(named, truths, strict=True)]
    with_partner = [(n, row) for n, row in zip(named, rows, strict=True) if PARTNER in row["objects"]]
    return {
        "recall": sum(len(n & t) for n, t in zip(named, truths, strict=True)) / sum(len(t) for t in truths),
        "chair_i": sum(len(f) for f in false) / max(num_named, 1),
        "chair_s": _mean(bool(f) for f in false),
        "prior_hallucination": _mean(
            PARTNER in n for n, row in zip(named, rows, strict=True) if row["kind"] == TRIGGER_ONLY
        ),
        "partner_recall": _mean(PARTNER in n for n, _ in with_partner),
        "partner_recall_alone": _mean(PARTNER in n for n, row in with_partner if TRIGGER not in row["objects"]),
        "objects_per_caption": num_named / len(captions),
        "well_formed": _mean(text.endswith(".") and bool(n) for text, n in zip(captions, named, strict=True)),
    }


def pope_metrics(truths: list[bool], answers: list[bool]) -> dict:
    """POPE's accuracy, precision, recall, F1 and yes-ratio ("yes" is the positive class)."""
    true_pos = sum(t and a for t, a in zip(truths, answers, strict=True))
    precision = true_pos / max(sum(answers), 1)
    recall = true_pos / max(sum(truths), 1)
    return {
        "pope_accuracy": _mean(t == a for t, a in zip(truths, answers, strict=True)),
        "pope_precision": precision,
        "pope_recall": recall,
        "pope_f1": 2 * precision * recall / max(precision + recall, 1e-12),
        "pope_yes_ratio": _mean(answers),
    }


def _mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else float("nan")
