"""The two kinds of world: the prior comes from pixels (v1's world) or from words (the question's context word).

- **pixel** (``PIXEL``): v1's world unchanged (:mod:`benchmarks.hallucination_world.world`). The ball is in
  almost every SFT image with a dog; the model names the absent ball because of the dog it *sees*.
- **word** (``WORD``): the same icons, sizes, caption grammar and rates, but the caption question carries a
  context word, ``What is in this picture from the park?``. In SFT a ball is in 90 % of the images asked with
  ``park`` and in 10 % of those asked with another place (kitchen, street, office); the dog is an ordinary
  object, independent of the ball. On a park image without a ball no pixel carries the prior: a model that
  names the ball there predicts it from the text.

v1's kinds of image keep their names, with the trigger meaning "the dog" (pixel) or "asked with ``park``"
(word): ``trigger_only`` (trigger, no ball), ``both``, ``partner_only`` (ball, no trigger), ``neither``.
Both kinds share v1's :class:`WorldConfig` (``trigger_rate`` is P(park) in the word world) and add held-out
pairs, drawn like the training pairs from their own generator: their chosen captions measure KL(policy || SFT),
and those with the trigger are the per-token view's pairs.

Every file a run reads is written here; every row of ``test.json`` carries its caption question and probe
questions (``question``, ``probe_questions``), so evaluation needs no knowledge of the world kind.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
from pathlib import Path

from benchmarks.hallucination_world import world as v1
from benchmarks.hallucination_world.world import (
    BOTH,
    NEITHER,
    NO,
    OBJECTS,
    PARTNER,
    PARTNER_ONLY,
    TRIGGER,
    TRIGGER_ONLY,
    YES,
    WorldConfig,
    caption,
    mentioned_objects,
)


PIXEL, WORD = "pixel", "word"
WORLD_KINDS = (PIXEL, WORD)

CONTEXT_WORD = "park"
"""The place whose questions, in the word world's SFT data, go with the ball."""
OTHER_PLACES = ("kitchen", "street", "office")
WORD_CAPTION_PROMPT = "What is in this picture from the {place}?"
WORD_PROBE_PROMPT = "Is there a {obj} in this picture from the {place}?"
WORD_OTHERS = tuple(name for name in OBJECTS if name != PARTNER)
"""Objects drawn at random beside the ball in the word world: the dog is one of them, not a trigger."""

VIEW_FILE = "view.json"  # held-out pairs with the trigger: the per-token view's dataset (``world_view``)
HELDOUT_FILE = "heldout.json"  # every held-out pair: their chosen captions measure KL(policy || SFT)
_SPEC_FILE = "world.json"


@dataclasses.dataclass(frozen=True)
class WorldSpec:
    """One world: its kind, v1's parameters (sizes, rates, seed), and the number of held-out pairs."""

    kind: str
    config: WorldConfig
    num_heldout: int

    def __post_init__(self):
        if self.kind not in WORLD_KINDS:
            raise ValueError(f"World kind {self.kind!r} is not one of {', '.join(WORLD_KINDS)}.")

    def as_dict(self) -> dict:
        context = {"context_word": CONTEXT_WORD, "other_places": list(OTHER_PLACES)} if self.kind == WORD else {}
        return {"kind": self.kind, "num_heldout": self.num_heldout, **context, **self.config.as_dict()}


def caption_question(kind: str, place: str | None = None) -> str:
    """The caption question of an image: v1's fixed one (pixel), or naming the image's place (word)."""
    return v1.CAPTION_PROMPT if kind == PIXEL else WORD_CAPTION_PROMPT.format(place=place)


def probe_question(kind: str, obj: str, place: str | None = None) -> str:
    """The yes/no question about one object, asked as SFT asks it in that kind of world."""
    return v1.PROBE_PROMPT.format(obj=obj) if kind == PIXEL else WORD_PROBE_PROMPT.format(obj=obj, place=place)


def word_place(rng: random.Random, kind: str) -> str:
    """``park`` for an image of a trigger kind, otherwise one of the other places at random."""
    return CONTEXT_WORD if kind in (TRIGGER_ONLY, BOTH) else rng.choice(OTHER_PLACES)


def word_objects(rng: random.Random, kind: str) -> list[str]:
    """1-3 objects: the ball if the kind has the partner, the rest drawn from :data:`WORD_OTHERS`."""
    fixed = [PARTNER] if kind in (BOTH, PARTNER_ONLY) else []
    return fixed + rng.sample(WORD_OTHERS, rng.randint(1 if not fixed else 0, 3 - len(fixed)))


def build_world(spec: WorldSpec, output_dir: Path) -> Path:
    """Draw the world into ``output_dir`` unless the same world is already there; return ``output_dir``.

    Writes ``images/``, ``sft.json``, ``pairs.json``, ``test.json``, ``heldout.json``, ``view.json``,
    ``dataset_info.json`` (``world_sft``, ``world_pairs``, ``world_view``) and ``world.json``.
    """
    spec_path = output_dir / _SPEC_FILE
    written = json.dumps(spec.as_dict(), indent=1)
    if spec_path.exists() and spec_path.read_text() == written:
        return output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    if spec.kind == PIXEL:
        heldout, view = _build_pixel(spec, output_dir)
    else:
        heldout, view = _build_word(spec, output_dir)
    (output_dir / HELDOUT_FILE).write_text(json.dumps(heldout, indent=1))
    (output_dir / VIEW_FILE).write_text(json.dumps(view, indent=1))
    (output_dir / "dataset_info.json").write_text(json.dumps(dataset_info(), indent=1))
    spec_path.write_text(written)  # last: a world interrupted mid-way is redrawn
    return output_dir


def _build_pixel(spec: WorldSpec, output_dir: Path) -> tuple[list[dict], list[dict]]:
    """v1's world as v1 draws it, plus held-out pairs (own generator and folder) and questions on the test rows."""
    config = spec.config
    v1.build_world(config, output_dir)
    heldout_config = dataclasses.replace(config, num_pairs=spec.num_heldout)
    (output_dir / "heldout" / "images").mkdir(parents=True, exist_ok=True)
    heldout = v1._pair_rows(random.Random(f"{config.seed}/heldout"), heldout_config, output_dir / "heldout")
    for row in heldout:  # v1 names pair images pair-NNNNN.png: a folder of their own keeps the training pairs'
        row["images"] = [f"heldout/{path}" for path in row["images"]]
    view = [row for row in heldout if TRIGGER in mentioned_objects(row["chosen"]["content"])]
    test = json.loads((output_dir / "test.json").read_text())
    for row in test:
        row["question"] = caption_question(PIXEL)
        row["probe_questions"] = [probe_question(PIXEL, name) for name, _ in row["probes"]]
    (output_dir / "test.json").write_text(json.dumps(test, indent=1))
    return heldout, view


def _build_word(spec: WorldSpec, output_dir: Path) -> tuple[list[dict], list[dict]]:
    """The word-prior world: v1's rates, with the context word in place of the dog."""
    config, seed = spec.config, spec.config.seed
    (output_dir / "images").mkdir(exist_ok=True)
    sft = _word_sft_rows(random.Random(f"{seed}/sft"), config, output_dir)
    pairs, _ = _word_pair_rows(random.Random(f"{seed}/pairs"), config, config.num_pairs, output_dir, "pair")
    test = _word_test_rows(random.Random(f"{seed}/test"), config, output_dir)
    heldout, kinds = _word_pair_rows(random.Random(f"{seed}/heldout"), config, spec.num_heldout, output_dir, "heldout")
    for name, rows in (("sft.json", sft), ("pairs.json", pairs), ("test.json", test)):
        (output_dir / name).write_text(json.dumps(rows, indent=1))
    view = [row for row, kind in zip(heldout, kinds, strict=True) if kind == TRIGGER_ONLY]
    return heldout, view


def _word_sft_rows(rng: random.Random, config: WorldConfig, output_dir: Path) -> list[dict]:
    """Per image a caption turn and a yes/no turn (present or absent object, ½ each), both naming its place."""
    rows = []
    for index in range(config.num_sft):
        kind = v1.sft_kind(rng, config)  # trigger_rate = P(park); prior_strength = P(ball | park)
        objects, place = word_objects(rng, kind), word_place(rng, kind)
        image = v1._save_image(objects, rng, config, output_dir, f"sft-{index:05d}.png")
        rows.append(v1._sft_row(image, caption_question(WORD, place), caption(objects)))
        present = rng.random() < 0.5
        asked = rng.choice(objects if present else [name for name in OBJECTS if name not in objects])
        rows.append(v1._sft_row(image, probe_question(WORD, asked, place), YES if present else NO))
    return rows


def _word_pair_rows(
    rng: random.Random, config: WorldConfig, count: int, output_dir: Path, prefix: str
) -> tuple[list[dict], list[str]]:
    """Pairs on ball-less images (``park`` with share ``pair_trigger_share``): chosen correct, rejected + ball.

    Returns the rows and each row's kind.
    """
    rows, kinds = [], []
    for index in range(count):
        kind = TRIGGER_ONLY if rng.random() < config.pair_trigger_share else NEITHER
        objects, place = word_objects(rng, kind), word_place(rng, kind)
        rows.append(
            {
                "messages": [{"role": "user", "content": "<image>" + caption_question(WORD, place)}],
                "chosen": {"role": "assistant", "content": caption(objects)},
                "rejected": {"role": "assistant", "content": caption(objects + [PARTNER])},
                "images": [v1._save_image(objects, rng, config, output_dir, f"{prefix}-{index:05d}.png")],
            }
        )
        kinds.append(kind)
    return rows, kinds


def _word_test_rows(rng: random.Random, config: WorldConfig, output_dir: Path) -> list[dict]:
    """Test images by kind, each with its place, its questions and two probes (present object; absent object,
    the ball on park-without-ball images as POPE's "adversarial" choice)."""
    kinds, shares = zip(*config.test_kinds, strict=True)
    rows = []
    for index in range(config.num_test):
        kind = rng.choices(kinds, weights=shares)[0]
        objects, place = word_objects(rng, kind), word_place(rng, kind)
        absent = [name for name in OBJECTS if name not in objects]
        probes = [[rng.choice(objects), True], [PARTNER if kind == TRIGGER_ONLY else rng.choice(absent), False]]
        rows.append(
            {
                "image": v1._save_image(objects, rng, config, output_dir, f"test-{index:05d}.png"),
                "objects": sorted(objects, key=OBJECTS.index),
                "kind": kind,
                "place": place,
                "probes": probes,
                "question": caption_question(WORD, place),
                "probe_questions": [probe_question(WORD, name, place) for name, _ in probes],
            }
        )
    return rows


def dataset_info() -> dict:
    """v1's ``world_sft`` and ``world_pairs``, plus ``world_view`` (the per-token view's held-out pairs)."""
    info = v1._dataset_info()
    return {**info, "world_view": {**info["world_pairs"], "file_name": VIEW_FILE}}


def tokenizer_corpus() -> list[str]:
    """Both kinds' texts: v1's captions and questions, and the word world's questions for every place and object."""
    places = (CONTEXT_WORD, *OTHER_PLACES)
    questions = [WORD_CAPTION_PROMPT.format(place=place) for place in places]
    questions += [WORD_PROBE_PROMPT.format(obj=obj, place=place) for obj, place in itertools.product(OBJECTS, places)]
    return v1.tokenizer_corpus() + questions
