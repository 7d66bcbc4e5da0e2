"""Per-token view: the visual scores ``s`` and weights ``c`` that TPO assigns to the tokens of a few pairs.

For each pair the model scores the chosen and the rejected caption on the clean image and on the image
corrupted exactly as training corrupts it (the plugin's ``corrupt_image`` with its default diffusion noise at
step 500, evaluation key), and the plugin's own functions turn the two passes into ``s`` and ``log c``.
This answers, without trusting any summary number: does the hallucinated ball in a rejected caption get a
large weight, and do the object tokens of a chosen caption have high visual scores?
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from tpo_plugin.method.noise import corrupt_image  # noqa: E402
from tpo_plugin.method.objective import IGNORE_INDEX, target_token_scores, token_visual_scores_and_log_weights  # noqa: E402
from tpo_plugin.training.batch.keys import EVAL_STEP_KEY  # noqa: E402

from .evaluate import chat_prompt, load  # noqa: E402
from .world import CAPTION_PROMPT, OBJECTS, PARTNER, TRIGGER, mentioned_objects  # noqa: E402


DEFAULTS = {"corruption": "diffusion", "noise_step": 500, "offset": 0.5, "score_kind": "logit"}


@torch.no_grad()
def pair_token_scores(model, processor, image: Image.Image, chosen: str, rejected: str, seed: int) -> dict:
    """Tokens, visual scores and weights of the chosen and the rejected caption of one pair."""
    noisy = corrupt_image(image, DEFAULTS["corruption"], DEFAULTS["noise_step"], seed, EVAL_STEP_KEY)
    prompt = chat_prompt(CAPTION_PROMPT)
    texts = [prompt + answer + "<|im_end|>\n" for answer in (chosen, rejected)]  # as the template ends an answer
    processor.tokenizer.padding_side = "right"
    passes = []
    for picture in (image, noisy):
        inputs = processor(text=texts, images=[picture, picture], return_tensors="pt", padding=True)
        labels = _response_labels(inputs, processor, prompt, image)
        passes.append(target_token_scores(model(**inputs).logits, labels))
    score, log_weight = token_visual_scores_and_log_weights(
        passes[0], passes[1], torch.ones(2, dtype=torch.bool), DEFAULTS["score_kind"], "both", DEFAULTS["offset"]
    )
    processor.tokenizer.padding_side = "left"
    result = {}
    for row, side in enumerate(("chosen", "rejected")):
        mask = passes[0].mask[row]
        ids = labels[row, 1:][mask]
        result[side] = {
            "tokens": [_readable(token) for token in processor.tokenizer.convert_ids_to_tokens(ids.tolist())],
            "score": score[row][mask].tolist(),
            "weight": log_weight[row][mask].exp().tolist(),
        }
    return result


def _readable(token: str) -> str:
    """A byte-level BPE token as text: ``Ġ`` is a leading space, ``Ċ`` a newline."""
    return token.replace("Ġ", " ").replace("Ċ", "\\n")


def _response_labels(inputs: dict, processor, prompt: str, image: Image.Image) -> torch.Tensor:
    """Labels as LLaMA-Factory sets them: the answer and its end token; prompt and padding ignored."""
    prompt_length = len(processor(text=[prompt], images=[image])["input_ids"][0])
    labels = inputs["input_ids"].clone()
    labels[:, :prompt_length] = IGNORE_INDEX
    labels[inputs["attention_mask"] == 0] = IGNORE_INDEX
    return labels


def token_view(model_dir: Path, world_dir: Path, num_pairs: int, seed: int) -> list[dict]:
    """Scores and weights for the first ``num_pairs`` preference pairs whose image holds the trigger."""
    model, processor = load(model_dir)
    pairs = [
        row
        for row in json.loads((world_dir / "pairs.json").read_text())
        if TRIGGER in mentioned_objects(row["chosen"]["content"])
    ]
    views = []
    for row in pairs[:num_pairs]:
        image = Image.open(world_dir / row["images"][0]).convert("RGB")
        scores = pair_token_scores(model, processor, image, row["chosen"]["content"], row["rejected"]["content"], seed)
        views.append({"image": row["images"][0], **scores})
    return views


def token_view_stats(views: list[dict]) -> dict:
    """Mean s and c by token class over all viewed pairs: the partner (ball) in rejected captions, the other
    object tokens, and the remaining tokens (articles, punctuation, end token), per side."""
    sums: dict[str, list[float]] = {}
    for view in views:
        for side in ("chosen", "rejected"):
            data = view[side]
            for token, score, weight in zip(data["tokens"], data["score"], data["weight"], strict=True):
                word = token.strip()
                kind = "partner" if word == PARTNER else "object" if word in OBJECTS else "other"
                sums.setdefault(f"{side}/{kind}/s", []).append(score)
                sums.setdefault(f"{side}/{kind}/c", []).append(weight)
    return {key: sum(values) / len(values) for key, values in sorted(sums.items())}


def plot_token_view(views: list[dict], title: str, path: Path) -> None:
    """One panel per pair and side: bars of the visual score per token, the weight written above each bar."""
    fig, axes = plt.subplots(len(views), 2, figsize=(12, 2.4 * len(views)), squeeze=False)
    for row, view in enumerate(views):
        for column, side in enumerate(("chosen", "rejected")):
            axis, data = axes[row][column], view[side]
            tokens = [token.strip() or "␣" for token in data["tokens"]]
            positions = range(len(tokens))
            bars = axis.bar(positions, data["score"], color="tab:green" if side == "chosen" else "tab:red")
            for bar, weight in zip(bars, data["weight"], strict=True):
                axis.annotate(
                    f"{weight:.2f}",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
            axis.set_xticks(list(positions), tokens, rotation=60, fontsize=8)
            axis.axhline(0, color="black", linewidth=0.5)
            axis.set_ylabel("visual score s")
            axis.set_title(f"{side}: {view['image']}", fontsize=9)
    fig.suptitle(f"{title} — bars: visual score s; numbers: TPO weight c", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def token_view_markdown(views: list[dict]) -> str:
    """The same numbers as a table per caption: token, s, c."""
    lines = []
    for view in views:
        for side in ("chosen", "rejected"):
            data = view[side]
            lines.append(f"**{side}** ({view['image']})\n")
            lines.append("| token | " + " | ".join(t.strip().replace("|", "\\|") for t in data["tokens"]) + " |")
            lines.append("|---|" + "---|" * len(data["tokens"]))
            lines.append("| s | " + " | ".join(f"{v:+.2f}" for v in data["score"]) + " |")
            lines.append("| c | " + " | ".join(f"{v:.2f}" for v in data["weight"]) + " |\n")
    return "\n".join(lines)
