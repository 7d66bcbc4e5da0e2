"""Regenerate the `tpo_demo` preference set shipped in this folder (images + tpo_demo.json).

    python data_info/make_tpo_demo.py

Each 64x64 image shows one or two coloured objects (a ball, a box or a kite). The question asks what is in
the picture; the chosen answer names exactly what is drawn; the rejected answer adds an object that is not
in the image (a dog, a cat, a car, ...), the kind of hallucination TPO is meant to reduce. Deterministic.
"""

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw


HERE = Path(__file__).resolve().parent
NUM_PAIRS = 40
SIZE = 64
COLOURS = {"red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 119, 180), "yellow": (230, 200, 30)}
OBJECTS = ("ball", "box", "kite")
ABSENT_OBJECTS = ("dog", "cat", "car", "tree", "cup", "bird")
QUESTIONS = ("What is in the picture?", "Describe the image.", "What objects do you see?")


def draw_object(paint: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int], fill) -> None:
    left, top, right, bottom = box
    if kind == "ball":
        paint.ellipse(box, fill=fill)
    elif kind == "box":
        paint.rectangle(box, fill=fill)
    else:
        paint.polygon(
            [
                ((left + right) // 2, top),
                (right, (top + bottom) // 2),
                ((left + right) // 2, bottom),
                (left, (top + bottom) // 2),
            ],
            fill=fill,
        )


def phrase(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def main() -> None:
    rng = random.Random(0)
    (HERE / "tpo_demo").mkdir(exist_ok=True)
    rows = []
    slots = [(6, 18, 30, 42), (34, 18, 58, 42)]
    for index in range(NUM_PAIRS):
        count = 1 + index % 2
        objects = [(rng.choice(list(COLOURS)), rng.choice(OBJECTS)) for _ in range(count)]
        image = Image.new("RGB", (SIZE, SIZE), (245, 245, 240))
        paint = ImageDraw.Draw(image)
        for (colour, kind), box in zip(objects, slots if count == 2 else [(18, 18, 46, 46)], strict=False):
            draw_object(paint, kind, box, COLOURS[colour])
        name = f"tpo_demo/{index:02d}.png"
        image.save(HERE / name, optimize=True)

        present = [f"a {colour} {kind}" for colour, kind in objects]
        absent = f"a {rng.choice(ABSENT_OBJECTS)}"
        rows.append(
            {
                "conversations": [{"from": "human", "value": "<image>" + QUESTIONS[index % len(QUESTIONS)]}],
                "chosen": {"from": "gpt", "value": f"The picture shows {phrase(present)}."},
                "rejected": {"from": "gpt", "value": f"The picture shows {phrase(present + [absent])}."},
                "images": [name],
            }
        )

    (HERE / "tpo_demo.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
