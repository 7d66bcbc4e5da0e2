"""CHAIR (Rohrbach et al. 2018, *Object Hallucination in Image Captioning*) on COCO, scored as its reference
implementation, ``utils/chair.py`` of github.com/LisaAnne/Hallucination, scores it.

A caption *mentions* a COCO object when one of its words (or two-word names) is the object's name or one of its
synonyms (``chair_synonyms.txt``, the benchmark's list); the mention is *hallucinated* when the object is not among
the image's ground-truth objects: the categories of its COCO instance annotations and the objects its COCO
reference captions mention. CHAIR_s is the share of captions with at least one hallucinated mention, CHAIR_i the
share of hallucinated mentions among all mentions (a word repeated counts each time); recall is the share of the
ground-truth objects that the captions mention (each object once per caption), as VLM papers report it beside
CHAIR (OPERA's, VCD's ``chair.py``).

The reference's rules reproduced here (``CHAIR.caption_to_words``):

* the caption is lower-cased, split into words and each word singularised;
* two consecutive words that form one of the reference's two-word names are read as one (``teddy bear``,
  ``hot dog``, ``traffic light``, ... so a teddy bear is not a bear, a hot dog not a dog); ``baby``/``adult`` +
  animal is the animal (not a person), ``passenger jet``/``train`` the vehicle, ``bow tie`` a tie, ``toilet seat``
  a toilet; in a caption that has both ``toilet`` and ``seat``, ``seat`` (a chair's synonym) is dropped;
* the synonym list is read line by line, split on ``", "``; a word listed on several lines maps to the last.
  Its quirks are kept: ``" motor bike"`` (a leading space in the file) and ``iPhone`` (upper case, captions are
  lower-cased) never match; ``stove top oven`` (three words) is never read as one name.

Where this departs from the reference:

* words: the reference tokenises with NLTK's ``word_tokenize``; here a word is a run of letters and digits, with
  inner hyphens kept (``t-shirt``, as ``word_tokenize`` keeps it), and each other non-space character is a token
  of its own (so ``hot. Dog`` is not a hot dog, as there). ``dog's`` gives ``dog``, ``'``, ``s`` (NLTK: ``dog``,
  ``'s``); no COCO name is affected;
* singularising: the reference uses NLTK's WordNet lemmatiser (in its descendants; ``pattern.en.singularize`` in
  the original), which needs a downloaded corpus. Here, offline: a word of the synonym list is kept as it is
  (``scissors``, ``skis``, ``people``, ``children``, ``oxen``); an irregular plural is looked up in
  :data:`IRREGULAR_PLURALS` (``men``, ``mice``, ``knives``, ``geese``, ``buses``, ``calves``, ...); otherwise
  English's regular rules (:func:`singularize`). Every plural of a synonym-list word that these rules cover is tested;
  words outside the list may be singularised differently from WordNet, which changes no score;
* ground truth: the reference reads ``instances_all2014.json`` and ``captions_all2014.json`` (train + val); here
  ``instances_val2014.json`` and ``captions_val2014.json`` (CHAIR is computed on val2014 images). An image id that
  neither file lists is refused (the reference gives it no ground truth, so every mention counts as hallucinated);
* a second caption for one image id is refused (the reference scores both);
* a division by zero (no captions, no mentions, no ground-truth object) gives 0.0.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .inputs import EvalInputError, Question, field, id_key, read_records


SYNONYMS_FILE = Path(__file__).with_name("chair_synonyms.txt")

TWO_WORD_NAMES = (
    "motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal", "stop light",
    "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball", "baseball bat", "baseball glove",
    "tennis racket", "wine glass", "hot dog", "cell phone", "mobile phone", "teddy bear", "hair drier",
    "potted plant", "bow tie", "laptop computer", "stove top oven", "home plate",
)  # fmt: skip
"""The reference's ``coco_double_words``: read as one name where two consecutive words form one."""

ANIMAL_WORDS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub")
"""``baby X`` and ``adult X`` are the animal X, not a person (``baby`` and ``adult`` are synonyms of person)."""

VEHICLE_WORDS = ("jet", "train")
"""``passenger X`` is the vehicle X, not a person."""

IRREGULAR_PLURALS = {
    "men": "man", "women": "woman", "children": "child", "oxen": "ox", "mice": "mouse", "geese": "goose",
    "teeth": "tooth", "feet": "foot", "knives": "knife", "calves": "calf", "wolves": "wolf", "leaves": "leaf",
    "shelves": "shelf", "halves": "half", "loaves": "loaf", "policemen": "policeman", "gentlemen": "gentleman",
    "servicemen": "serviceman", "firemen": "fireman", "cacti": "cactus", "buses": "bus", "minibuses": "minibus",
    "buffaloes": "buffalo", "tomatoes": "tomato", "potatoes": "potato", "heroes": "hero",
}  # fmt: skip
"""Plurals the regular rules get wrong, among them every irregular plural of a synonym-list word."""

WORD = re.compile(r"[^\W_]+(?:-[^\W_]+)*|[^\w\s]|_")


def read_synonyms(path: Path = SYNONYMS_FILE) -> dict[str, str]:
    """Each name of the synonym list -> its COCO category (the first name of its line), as the reference builds
    ``inverse_synonym_dict``: lines stripped and split on ``", "``, a later line winning. ``#`` lines are comments."""
    object_of = {}
    for line in path.read_text(encoding="utf-8").split("\n"):
        if not line.strip() or line.startswith("#"):
            continue
        names = line.strip().split(", ")
        for name in names:
            object_of[name] = names[0]
    return object_of


def two_word_names() -> dict[str, str]:
    """Two consecutive words -> the name they are read as (the reference's ``double_word_dict``)."""
    names = {name: name for name in TWO_WORD_NAMES}
    for animal in ANIMAL_WORDS:
        names[f"baby {animal}"] = names[f"adult {animal}"] = animal
    for vehicle in VEHICLE_WORDS:
        names[f"passenger {vehicle}"] = vehicle
    names.update({"bow tie": "tie", "toilet seat": "toilet", "wine glas": "wine glass"})
    return names


def singularize(word: str, vocabulary: dict[str, str]) -> str:
    """``word`` in the singular: unchanged if the synonym list has it, else from :data:`IRREGULAR_PLURALS`, else the
    listed word it is a regular plural of (``taxis``, ``collies``, ``ponies``, ``buses``), else by English's regular
    rules (``benches`` -> ``bench``, ``glasses`` -> ``glass``, ``cups`` -> ``cup``; ``glass``, ``tennis`` kept)."""
    if word in vocabulary:
        return word
    if word in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[word]
    for ending, replacement in (("s", ""), ("es", ""), ("ies", "y")):  # a listed word in the plural: taxis, ties
        if word.endswith(ending) and word[: -len(ending)] + replacement in vocabulary:
            return word[: -len(ending)] + replacement
    if len(word) <= 3 or word.endswith(("ss", "us", "is")) or not word.endswith("s"):
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("sses", "shes", "ches", "xes", "zzes")):
        return word[:-2]
    return word[:-1]


def words_of(caption: str, vocabulary: dict[str, str]) -> list[str]:
    """The caption's words, lower-cased and singularised (punctuation marks are words, as NLTK splits them)."""
    return [singularize(word, vocabulary) for word in WORD.findall(caption.lower())]


@dataclass(frozen=True)
class Vocabulary:
    """What CHAIR recognises: each name of the synonym list -> its COCO category, and the two-word names."""

    object_of: dict[str, str]
    two_word_names: dict[str, str]

    @classmethod
    def load(cls, path: Path = SYNONYMS_FILE) -> "Vocabulary":
        return cls(read_synonyms(path), two_word_names())

    def mentions(self, caption: str) -> list[tuple[str, str]]:
        """The caption's mentions of COCO objects in order, as (name as read, COCO category): the reference's
        ``caption_to_words``. A name said twice is two mentions."""
        words, names, position = words_of(caption, self.object_of), [], 0
        while position < len(words):
            pair = " ".join(words[position : position + 2])
            if pair in self.two_word_names:
                names.append(self.two_word_names[pair])
                position += 2
            else:
                names.append(words[position])
                position += 1
        if "toilet" in names and "seat" in names:  # a toilet seat, however far apart, is not a chair
            names = [name for name in names if name != "seat"]
        return [(name, self.object_of[name]) for name in names if name in self.object_of]


def score_caption(mentions: list[tuple[str, str]], ground_truth: set[str]) -> dict[str, list]:
    """One caption's decisions: its mentions, those of objects not in ``ground_truth`` (hallucinated), the
    ground-truth objects it mentions, and the ground truth, as ``mentions.jsonl`` lists them."""
    return {
        "mentioned": [list(mention) for mention in mentions],
        "hallucinated": [list(mention) for mention in mentions if mention[1] not in ground_truth],
        "ground_truth_mentioned": sorted({category for _, category in mentions if category in ground_truth}),
        "ground_truth": sorted(ground_truth),
    }


def chair_metrics(scores: list[dict[str, list]]) -> dict[str, dict[str, float | int]]:
    """metrics.json of CHAIR: ``{"all": {...}}`` with ``n`` (captions), ``chair_s``, ``chair_i``, ``recall``
    (fractions in [0, 1]) and the counts they are made of, from :func:`score_caption` of every caption."""
    hallucinated_captions = sum(bool(score["hallucinated"]) for score in scores)
    mentions = sum(len(score["mentioned"]) for score in scores)
    hallucinated_mentions = sum(len(score["hallucinated"]) for score in scores)
    ground_truth = sum(len(score["ground_truth"]) for score in scores)
    ground_truth_mentioned = sum(len(score["ground_truth_mentioned"]) for score in scores)
    return {
        "all": {
            "n": len(scores),
            "chair_s": hallucinated_captions / len(scores) if scores else 0.0,
            "chair_i": hallucinated_mentions / mentions if mentions else 0.0,
            "recall": ground_truth_mentioned / ground_truth if ground_truth else 0.0,
            "hallucinated_captions": hallucinated_captions,
            "mentions": mentions,
            "hallucinated_mentions": hallucinated_mentions,
            "ground_truth_objects": ground_truth,
            "ground_truth_objects_mentioned": ground_truth_mentioned,
        }
    }


# ---------------------------------------------------------------------------------------------------------------
# Inputs: COCO's annotation files and a caption file.

INSTANCES_FILE, CAPTIONS_FILE = "instances_val2014.json", "captions_val2014.json"

DEFAULT_PROMPT = "Please describe this image in detail."
"""The instruction CHAIR evaluations of LLaVA-style models use (OPERA, VCD, and TPO's paper after them)."""

ID_FIELD, TEXT_FIELD = "image_id", "caption"
"""Keys of a caption line; ``answers.jsonl`` is written with them, so it can be scored again with ``--captions``."""


def read_coco_file(path: Path, keys: tuple[str, ...]) -> dict:
    """A COCO annotation file (a JSON object with ``keys``, each a list), refused with its name otherwise."""
    if not path.is_file():
        raise EvalInputError([f"{path}: no such file (COCO's annotations_trainval2014.zip has it)"])
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise EvalInputError([f"{path}: not valid JSON ({error})"]) from None
    missing = [key for key in keys if not isinstance(content, dict) or not isinstance(content.get(key), list)]
    if missing:
        raise EvalInputError([f"{path}: not a COCO annotation file (no list {', '.join(repr(k) for k in missing)})"])
    return content


@dataclass(frozen=True)
class GroundTruth:
    """COCO val2014's images: the objects in each (by image id as text) and each image's file name."""

    objects: dict[str, set[str]]
    file_names: dict[str, str]


def read_ground_truth(annotation_dir: Path, vocabulary: Vocabulary) -> GroundTruth:
    """Each image's ground-truth objects: the categories of its instance annotations and the objects its reference
    captions mention (the reference's ``get_annotations``), for every image either file lists."""
    instances = read_coco_file(annotation_dir / INSTANCES_FILE, ("images", "annotations", "categories"))
    captions = read_coco_file(annotation_dir / CAPTIONS_FILE, ("images", "annotations"))
    path = annotation_dir / INSTANCES_FILE
    try:
        file_names = {image["id"]: image.get("file_name", "") for image in instances["images"]}
        category_names = {category["id"]: category["name"] for category in instances["categories"]}
        unknown = sorted(set(category_names.values()) - set(vocabulary.object_of))
        if unknown:
            problem = f"categories not in CHAIR's synonym list (not COCO's?): {', '.join(unknown)}"
            raise EvalInputError([f"{path}: {problem}"])
        instance_objects = [(a["image_id"], vocabulary.object_of[category_names[a["category_id"]]])
                            for a in instances["annotations"]]  # fmt: skip
        path = annotation_dir / CAPTIONS_FILE
        file_names.update({image["id"]: image.get("file_name", "") for image in captions["images"]})
        caption_objects = [(a["image_id"], category) for a in captions["annotations"]
                           for _, category in vocabulary.mentions(a["caption"])]  # fmt: skip
    except (KeyError, TypeError, AttributeError) as error:  # an entry without "id", "image_id", ...
        raise EvalInputError([f"{path}: not a COCO annotation file (an entry lacks {error})"]) from None
    objects: dict[str, set[str]] = {id_key(image_id): set() for image_id in file_names}
    for image_id, category in instance_objects + caption_objects:
        objects.setdefault(id_key(image_id), set()).add(category)
    return GroundTruth(objects, {id_key(image_id): name for image_id, name in file_names.items()})


def read_captions(path: Path, ground_truth: GroundTruth) -> dict[str, tuple[int | str, str]]:
    """``(image_id, caption)`` by image id as text, from JSON Lines ``{"image_id", "caption"}`` (or a JSON list),
    checked: an integer or string id that COCO val2014 has, a string caption, one caption per image."""
    captions: dict[str, tuple[int | str, str]] = {}
    first_location: dict[str, str] = {}
    problems: list[str] = []
    for record in read_records(path):
        image_id = field(record, ID_FIELD, problems, (int, str))
        caption = field(record, TEXT_FIELD, problems)
        if image_id is None or caption is None:
            continue
        key = id_key(image_id)
        if key not in ground_truth.objects:
            problems.append(f"{record.location}: image_id {image_id!r} is not an image of {INSTANCES_FILE} "
                            f"or {CAPTIONS_FILE}")  # fmt: skip
        elif key in captions:
            problems.append(f"{record.location}: a second caption for image_id {image_id!r} "
                            f"(first at {first_location[key]})")  # fmt: skip
        else:
            captions[key], first_location[key] = (image_id, caption), record.location
    if problems:
        raise EvalInputError(problems)
    return captions


def caption_requests(image_dir: Path, ground_truth: GroundTruth, prompt: str, count: int | None, seed: int):
    """The images to caption, as questions (id: the COCO image id, text: ``prompt``): the val2014 images found in
    ``image_dir``, ``count`` of them drawn at random with ``seed`` (all if ``count`` is None or larger), by id."""
    import random

    present = sorted(
        (int(key) if key.isdigit() else key, name)
        for key, name in ground_truth.file_names.items()
        if name and (image_dir / name).is_file()
    )
    if not present:
        raise EvalInputError([f"{image_dir}: none of the {len(ground_truth.file_names)} images of the annotations"])
    if count is not None and count < len(present):
        present = sorted(random.Random(seed).sample(present, count))
    return [Question(image_id, name, prompt, "", (), f"image {name}") for image_id, name in present]


def score(captions: dict[str, tuple[int | str, str]], ground_truth: GroundTruth, vocabulary: Vocabulary):
    """metrics.json of CHAIR and the lines of mentions.jsonl (one per caption, in the captions' order)."""
    lines = []
    for key, (image_id, caption) in captions.items():
        decisions = score_caption(vocabulary.mentions(caption), ground_truth.objects[key])
        lines.append({ID_FIELD: image_id, TEXT_FIELD: caption, **decisions})
    return chair_metrics(lines), lines
