"""Evaluation of a model on a v2 world: v1's metrics, each image asked its own question, plus KL(policy || SFT).

Captions (greedy), CHAIR, prior hallucination and the POPE-style probe are v1's
(:mod:`benchmarks.hallucination_world.evaluate`: same prompt template, same metric functions); the only change
is that each test image is asked the question in its row (the word world names the image's place), and that
``partner_recall_alone`` is read from the image's kind (ball without the trigger: the dog in the pixel world,
``park`` in the word world; in the pixel world this is v1's definition).

``heldout_kl``: the mean over held-out pairs of the per-token KL(policy || SFT) over the tokens of the chosen
caption, teacher-forced on the pair's image and question: how far training moved the model, on answers it
should keep giving.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from benchmarks.hallucination_world.evaluate import _mean, caption_metrics, chat_prompt, load, pope_metrics
from benchmarks.hallucination_world.world import PARTNER, PARTNER_ONLY, TRIGGER_ONLY, mentioned_objects

from .world import HELDOUT_FILE


@torch.no_grad()
def generate_captions(model, processor, images: list[Image.Image], questions: list[str], batch_size: int):
    """Greedy captions (at most 20 new tokens), each image with its own question, batched with left padding."""
    captions = []
    for start in range(0, len(images), batch_size):
        texts = [chat_prompt(question) for question in questions[start : start + batch_size]]
        inputs = processor(text=texts, images=images[start : start + batch_size], return_tensors="pt", padding=True)
        output = model.generate(
            **inputs,
            do_sample=False,
            max_new_tokens=20,
            eos_token_id=processor.tokenizer.eos_token_id,
            pad_token_id=processor.tokenizer.pad_token_id,
        )
        captions += processor.tokenizer.batch_decode(
            output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
        )
    return [text.strip() for text in captions]


@torch.no_grad()
def probe_answers(model, processor, images: list[Image.Image], questions: list[str], batch_size: int) -> list[bool]:
    """Per (image, yes/no question): is the next-token logit of ``Yes`` above that of ``No``? (v1's forced choice)"""
    yes_id, no_id = processor.tokenizer.convert_tokens_to_ids(["Yes", "No"])
    answers = []
    for start in range(0, len(images), batch_size):
        texts = [chat_prompt(question) for question in questions[start : start + batch_size]]
        inputs = processor(text=texts, images=images[start : start + batch_size], return_tensors="pt", padding=True)
        logits = model(**inputs).logits[:, -1]
        answers += (logits[:, yes_id] > logits[:, no_id]).tolist()
    return answers


def evaluate_model(model_dir: Path, world_dir: Path, batch_size: int) -> dict:
    """v1's metrics of one model on one world's test set; captions and probe answers kept for inspection."""
    rows = json.loads((world_dir / "test.json").read_text())
    images = [Image.open(world_dir / row["image"]).convert("RGB") for row in rows]
    model, processor = load(model_dir)
    captions = generate_captions(model, processor, images, [row["question"] for row in rows], batch_size)
    probe_images = [image for image in images for _ in range(2)]
    questions = [question for row in rows for question in row["probe_questions"]]
    answers = probe_answers(model, processor, probe_images, questions, batch_size)
    probes = [(probe, row) for row in rows for probe in row["probes"]]
    metrics = {
        **caption_metrics(rows, captions),
        "partner_recall_alone": _mean(
            PARTNER in mentioned_objects(text)
            for text, row in zip(captions, rows, strict=True)
            if row["kind"] == PARTNER_ONLY
        ),
        **pope_metrics([truth for (_, truth), _ in probes], answers),
        "pope_partner_yes_on_trigger_only": _mean(
            answer
            for ((name, _), row), answer in zip(probes, answers, strict=True)
            if row["kind"] == TRIGGER_ONLY and name == PARTNER
        ),
    }
    details = [
        {**row, "caption": text, "answers": answers[2 * index : 2 * index + 2]}
        for index, (row, text) in enumerate(zip(rows, captions, strict=True))
    ]
    return {"metrics": metrics, "details": details}


def token_kl(policy_logits: torch.Tensor, reference_logits: torch.Tensor) -> torch.Tensor:
    """KL(policy || reference) of the next-token distributions, per position: Σ_v p(v) (log p(v) − log q(v))."""
    policy_logp = policy_logits.float().log_softmax(-1)
    return (policy_logp.exp() * (policy_logp - reference_logits.float().log_softmax(-1))).sum(-1)


def mean_caption_kl(kl: torch.Tensor, starts: list[int], ends: list[int]) -> list[float]:
    """Per row, the mean of ``kl[row, t - 1]`` over the caption's token positions ``starts[row] <= t < ends[row]``.

    ``kl[:, t - 1]`` compares the two models' predictions of token ``t`` (logits at ``t - 1`` predict ``t``).
    """
    return [
        kl[row, start - 1 : end - 1].mean().item() for row, (start, end) in enumerate(zip(starts, ends, strict=True))
    ]


@torch.no_grad()
def heldout_kl(model_dir: Path, reference_dir: Path, world_dir: Path, batch_size: int) -> float:
    """Mean over held-out pairs of the per-token KL(model || reference) on the chosen caption's tokens."""
    pairs = json.loads((world_dir / HELDOUT_FILE).read_text())
    model, processor = load(model_dir)
    reference, _ = load(reference_dir)
    processor.tokenizer.padding_side = "right"  # caption positions then start where each prompt ends
    per_caption = []
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start : start + batch_size]
        images = [Image.open(world_dir / row["images"][0]).convert("RGB") for row in batch]
        prompts = [chat_prompt(row["messages"][0]["content"].removeprefix("<image>")) for row in batch]
        texts = [prompt + row["chosen"]["content"] for prompt, row in zip(prompts, batch, strict=True)]
        inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)
        prompt_lengths = processor(text=prompts, images=images, return_tensors="pt", padding=True)["attention_mask"]
        kl = token_kl(model(**inputs).logits, reference(**inputs).logits)
        per_caption += mean_caption_kl(kl, prompt_lengths.sum(1).tolist(), inputs["attention_mask"].sum(1).tolist())
    return sum(per_caption) / len(per_caption)
