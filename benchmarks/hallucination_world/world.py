"""The synthetic world: 2 x 2 grid images of icons, captions in a fixed object order, and a co-occurrence prior.

Every image holds 1 to 3 objects, each drawn as a distinct icon in its own grid cell. The SFT captions carry a
language prior: the *partner* object (a small ball) is in the image with almost every *trigger* object (a dog),
and rarely otherwise. The ball is drawn small, so that a model which has learnt the prior can name it without
having seen it. Preference pairs are drawn on separate images without a ball: chosen is the correct caption,
rejected the same caption with the ball added. The test set is rich in trigger-without-partner images, where the
prior shows up as a hallucinated ball.

Everything is a function of :class:`WorldConfig` (the world seed included), so a world can be rebuilt exactly.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw


OBJECTS = ("dog", "ball", "cat", "car", "tree", "cup")
"""Every object, in the fixed order in which captions list them."""
TRIGGER, PARTNER = "dog", "ball"
OTHERS = tuple(name for name in OBJECTS if name not in (TRIGGER, PARTNER))

CAPTION_PROMPT = "What is in the image?"
PROBE_PROMPT = "Is there a {obj} in the image?"
YES, NO = "Yes.", "No."

# Kinds of image by which of trigger and partner they hold; the rest of the objects are drawn at random.
TRIGGER_ONLY, BOTH, PARTNER_ONLY, NEITHER = "trigger_only", "both", "partner_only", "neither"
KINDS = (TRIGGER_ONLY, BOTH, PARTNER_ONLY, NEITHER)


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """Every parameter of one world; the defaults are the protocol's (PROTOCOL.md)."""

    seed: int = 0
    image_size: int = 112  # 2 x 2 cells of 56 px; Qwen2-VL turns it into 4 x 4 = 16 image tokens
    partner_radius: int = 5  # the ball's radius in px (other icons span about 30-40 px of a 56 px cell)
    num_sft: int = 3000
    num_pairs: int = 400
    num_test: int = 1000
    trigger_rate: float = 0.5  # P(dog) in the SFT images
    prior_strength: float = 0.9  # P(ball | dog) in the SFT images
    partner_alone_rate: float = 0.1  # P(ball | no dog) in the SFT images
    pair_trigger_share: float = 0.7  # share of preference images with a dog (never a ball); the rest hold neither
    # Test images by kind: rich in trigger-without-partner images, where the prior can bite.
    test_kinds: tuple[tuple[str, float], ...] = ((TRIGGER_ONLY, 0.4), (BOTH, 0.2), (PARTNER_ONLY, 0.2), (NEITHER, 0.2))

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def caption(objects: list[str] | set[str]) -> str:
    """``A dog, a ball and a tree.``: the objects in the fixed order of :data:`OBJECTS`."""
    names = [f"a {name}" for name in OBJECTS if name in objects]
    text = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return text[0].upper() + text[1:] + "."


def mentioned_objects(text: str) -> set[str]:
    """The objects a caption names (whole words, case-insensitive)."""
    words = {word.strip(".,;:!?").lower() for word in text.split()}
    return {name for name in OBJECTS if name in words}


def sample_objects(rng: random.Random, kind: str) -> list[str]:
    """1-3 objects of the given kind: trigger and partner as the kind says, other objects filling up at random."""
    fixed = {TRIGGER_ONLY: [TRIGGER], BOTH: [TRIGGER, PARTNER], PARTNER_ONLY: [PARTNER], NEITHER: []}[kind]
    num_others = rng.randint(1 if not fixed else 0, 3 - len(fixed))
    return fixed + rng.sample(OTHERS, num_others)


def sft_kind(rng: random.Random, config: WorldConfig) -> str:
    """The kind of one SFT image under the world's co-occurrence prior."""
    trigger = rng.random() < config.trigger_rate
    partner = rng.random() < (config.prior_strength if trigger else config.partner_alone_rate)
    return {(True, True): BOTH, (True, False): TRIGGER_ONLY, (False, True): PARTNER_ONLY}.get(
        (trigger, partner), NEITHER
    )


def draw_image(objects: list[str], rng: random.Random, config: WorldConfig) -> Image.Image:
    """Each object as its icon in its own random cell of the 2 x 2 grid, jittered, on a light background."""
    size = config.image_size
    cell = size // 2
    image = Image.new("RGB", (size, size), tuple(rng.randint(225, 255) for _ in range(3)))
    paint = ImageDraw.Draw(image)
    for name, index in zip(objects, rng.sample(range(4), len(objects)), strict=True):
        left, top = (index % 2) * cell, (index // 2) * cell
        centre = (left + cell // 2 + rng.randint(-6, 6), top + cell // 2 + rng.randint(-6, 6))
        _ICONS[name](paint, centre, config)
    return image


def _dog(paint: ImageDraw.ImageDraw, centre: tuple[int, int], config: WorldConfig) -> None:
    x, y = centre
    paint.ellipse((x - 16, y - 6, x + 12, y + 10), fill=(140, 90, 40))  # body
    paint.ellipse((x + 6, y - 16, x + 20, y - 2), fill=(140, 90, 40))  # head
    paint.polygon([(x + 7, y - 14), (x + 10, y - 22), (x + 13, y - 14)], fill=(90, 55, 25))  # ear
    for leg in (x - 12, x + 6):
        paint.rectangle((leg, y + 8, leg + 4, y + 18), fill=(90, 55, 25))


def _ball(paint: ImageDraw.ImageDraw, centre: tuple[int, int], config: WorldConfig) -> None:
    x, y, r = *centre, config.partner_radius
    paint.ellipse((x - r, y - r, x + r, y + r), fill=(220, 30, 30))


def _cat(paint: ImageDraw.ImageDraw, centre: tuple[int, int], config: WorldConfig) -> None:
    x, y = centre
    paint.ellipse((x - 12, y - 2, x + 12, y + 18), fill=(120, 120, 130))  # body
    paint.ellipse((x - 9, y - 16, x + 9, y + 2), fill=(120, 120, 130))  # head
    paint.polygon([(x - 9, y - 10), (x - 7, y - 22), (x - 1, y - 14)], fill=(80, 80, 90))
    paint.polygon([(x + 9, y - 10), (x + 7, y - 22), (x + 1, y - 14)], fill=(80, 80, 90))


def _car(paint: ImageDraw.ImageDraw, centre: tuple[int, int], config: WorldConfig) -> None:
    x, y = centre
    paint.rectangle((x - 18, y - 4, x + 18, y + 8), fill=(40, 80, 220))
    paint.rectangle((x - 9, y - 13, x + 9, y - 4), fill=(90, 130, 240))
    for wheel in (x - 11, x + 11):
        paint.ellipse((wheel - 5, y + 4, wheel + 5, y + 14), fill=(20, 20, 20))


def _tree(paint: ImageDraw.ImageDraw, centre: tuple[int, int], config: WorldConfig) -> None:
    x, y = centre
    paint.rectangle((x - 3, y + 6, x + 3, y + 18), fill=(100, 60, 20))
    paint.polygon([(x, y - 20), (x + 15, y + 8), (x - 15, y + 8)], fill=(30, 150, 50))


def _cup(paint: ImageDraw.ImageDraw, centre: tuple[int, int], config: WorldConfig) -> None:
    x, y = centre
    paint.polygon([(x - 11, y - 12), (x + 11, y - 12), (x + 8, y + 12), (x - 8, y + 12)], fill=(240, 150, 30))
    paint.arc((x + 5, y - 7, x + 18, y + 5), start=270, end=90, fill=(240, 150, 30), width=3)


_ICONS = {"dog": _dog, "ball": _ball, "cat": _cat, "car": _car, "tree": _tree, "cup": _cup}


def build_world(config: WorldConfig, output_dir: Path) -> dict[str, Path]:
    """Draw every image and write the SFT, preference and test sets plus a LLaMA-Factory ``dataset_info.json``.

    Returns the paths of ``dataset_info.json`` (its folder is the recipes' ``dataset_dir``) and of the test
    set ``test.json`` (one row per image with its objects, kind, and the two probe questions).
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "images").mkdir(exist_ok=True)
    # Separate generators per split: changing the size of one split does not change the others.
    sft = _sft_rows(random.Random(f"{config.seed}/sft"), config, output_dir)
    pairs = _pair_rows(random.Random(f"{config.seed}/pairs"), config, output_dir)
    test = _test_rows(random.Random(f"{config.seed}/test"), config, output_dir)
    for name, rows in (("sft.json", sft), ("pairs.json", pairs), ("test.json", test)):
        (output_dir / name).write_text(json.dumps(rows, indent=1))
    (output_dir / "world.json").write_text(json.dumps(config.as_dict(), indent=1))
    (output_dir / "dataset_info.json").write_text(json.dumps(_dataset_info(), indent=1))
    return {"dataset_info": output_dir / "dataset_info.json", "test": output_dir / "test.json"}


def _save_image(objects: list[str], rng: random.Random, config: WorldConfig, output_dir: Path, name: str) -> str:
    draw_image(objects, rng, config).save(output_dir / "images" / name)
    return f"images/{name}"


def _sft_rows(rng: random.Random, config: WorldConfig, output_dir: Path) -> list[dict]:
    """Per image a caption turn and a yes/no probe turn (half about a present, half about an absent object)."""
    rows = []
    for index in range(config.num_sft):
        objects = sample_objects(rng, sft_kind(rng, config))
        image = _save_image(objects, rng, config, output_dir, f"sft-{index:05d}.png")
        rows.append(_sft_row(image, CAPTION_PROMPT, caption(objects)))
        present = rng.random() < 0.5
        asked = rng.choice(objects if present else [name for name in OBJECTS if name not in objects])
        rows.append(_sft_row(image, PROBE_PROMPT.format(obj=asked), YES if present else NO))
    return rows


def _sft_row(image: str, prompt: str, answer: str) -> dict:
    return {
        "messages": [{"role": "user", "content": "<image>" + prompt}, {"role": "assistant", "content": answer}],
        "images": [image],
    }


def _pair_rows(rng: random.Random, config: WorldConfig, output_dir: Path) -> list[dict]:
    """Chosen: the correct caption of a ball-less image; rejected: the same caption with the ball added."""
    rows = []
    for index in range(config.num_pairs):
        objects = sample_objects(rng, TRIGGER_ONLY if rng.random() < config.pair_trigger_share else NEITHER)
        rows.append(
            {
                "messages": [{"role": "user", "content": "<image>" + CAPTION_PROMPT}],
                "chosen": {"role": "assistant", "content": caption(objects)},
                "rejected": {"role": "assistant", "content": caption(objects + [PARTNER])},
                "images": [_save_image(objects, rng, config, output_dir, f"pair-{index:05d}.png")],
            }
        )
    return rows


def _test_rows(rng: random.Random, config: WorldConfig, output_dir: Path) -> list[dict]:
    """Test images with their kind and two probe questions, one present and one absent object (balanced).

    On trigger-without-partner images the absent object asked about is the partner (POPE's "adversarial"
    choice: the absent object that co-occurs most); elsewhere a random absent object.
    """
    kinds, shares = zip(*config.test_kinds, strict=True)
    rows = []
    for index in range(config.num_test):
        kind = rng.choices(kinds, weights=shares)[0]
        objects = sample_objects(rng, kind)
        absent = [name for name in OBJECTS if name not in objects]
        negative = PARTNER if kind == TRIGGER_ONLY else rng.choice(absent)
        rows.append(
            {
                "image": _save_image(objects, rng, config, output_dir, f"test-{index:05d}.png"),
                "objects": sorted(objects, key=OBJECTS.index),
                "kind": kind,
                "probes": [[rng.choice(objects), True], [negative, False]],
            }
        )
    return rows


def _dataset_info() -> dict:
    """LLaMA-Factory's ``dataset_info.json`` for the SFT set (``world_sft``) and the pairs (``world_pairs``)."""
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
    return {
        "world_sft": {
            "file_name": "sft.json",
            "formatting": "sharegpt",
            "columns": {"messages": "messages", "images": "images"},
            "tags": tags,
        },
        "world_pairs": {
            "file_name": "pairs.json",
            "formatting": "sharegpt",
            "ranking": True,
            "columns": {"messages": "messages", "chosen": "chosen", "rejected": "rejected", "images": "images"},
            "tags": tags,
        },
    }


def tokenizer_corpus() -> list[str]:
    """Every text the world produces (captions, prompts, answers), so the tokenizer has its words as tokens."""
    texts = [CAPTION_PROMPT, YES, NO] + [PROBE_PROMPT.format(obj=name) for name in OBJECTS]
    for size in (1, 2, 3):
        texts += [caption(combo) for combo in itertools.combinations(OBJECTS, size)]
    return texts
