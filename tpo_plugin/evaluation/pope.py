"""POPE (Li et al. 2023, *Evaluating Object Hallucination in Large Vision-Language Models*), scored as LLaVA's
``llava/eval/eval_pope.py`` (github.com/haotian-liu/LLaVA) scores it.

Questions: POPE's JSON Lines format, one object per line, ``{"question_id", "image", "text", "label"}`` with
label "yes"/"no", optionally ``"category"`` (POPE's random / popular / adversarial, or any name). Answers:
LLaVA's answer-file format, ``{"question_id", "text", ...}`` per line, in any order.

Where this differs from eval_pope.py:

* answers are matched to questions by ``question_id`` (as text, so ``7`` matches ``"7"``); eval_pope.py pairs
  the answers of a category with the labels of ``coco_pope_<category>.json`` by position, so a reordered or
  incomplete answer file is scored against the wrong labels without notice;
* a label other than "yes"/"no" is refused; eval_pope.py counts every label but "no" as "yes";
* eval_pope.py takes the category from each question's ``"category"`` and the labels from separate files;
  here the label is in the question file, and a question without ``"category"`` takes it from a POPE file
  name (:func:`category_from_file_name`) or is counted in ``"all"`` only;
* it reports each category, not all questions together; the ``"all"`` entry here applies the same
  computation to every question;
* division by zero gives 0.0 instead of an exception (:mod:`.metrics`).
"""

from pathlib import Path

from .inputs import EvalInputError, Question, duplicate_problems, field, label_problem, read_records
from .metrics import metrics_by_split


ID_FIELD, TEXT_FIELD = "question_id", "text"
"""Keys of an answer line (LLaVA's answer files); ``answers.jsonl`` is written with them."""

POSITIVE = "yes"
"""eval_pope.py: ``pos = 1`` for label "yes"."""

CATEGORY_ORDER = ("random", "popular", "adversarial")
"""POPE's three negative-sampling settings, reported in this order when present, then any other category."""


def reduce_answer(text: str) -> str:
    """A free-form answer reduced to "yes" or "no" by eval_pope.py's rule: keep the text before the first ``.``,
    drop commas, split on single spaces; "no" if one of the words is exactly ``No``, ``not`` or ``no``, else "yes".

    So "No, there is not." and "There is no dog" are "no", "not sure" is "no", but "NO" and "Nope" are
    "yes" (case and spelling matter), as are "Yes. There is no dog." (only the first sentence counts) and
    an empty answer.
    """
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if "No" in words or "not" in words or "no" in words else "yes"


def category_from_file_name(path: Path) -> str | None:
    """The category of questions without a ``"category"`` field: the part of a POPE file name after ``_pope_``,
    as eval_pope.py names ``coco_pope_random.json`` "random" (also ``aokvqa_pope_…``, ``gqa_pope_…``); ``None``
    for other names."""
    stem = path.name.split(".")[0]
    return stem.split("_pope_", 1)[1] if "_pope_" in stem else None


def read_questions(path: Path) -> list[Question]:
    """The questions of a POPE question file, checked: each line a JSON object with an integer or string
    ``question_id`` (unique), string ``image`` and ``text``, ``label`` "yes"/"no", optional string ``category``
    (not "all", the name of the overall entry)."""
    default_category = category_from_file_name(path)
    questions, problems = [], []
    for record in read_records(path):
        found = len(problems)
        question_id = field(record, "question_id", problems, (int, str))
        image, text, label = (field(record, name, problems) for name in ("image", "text", "label"))
        category = record.value.get("category", default_category)
        if label is not None and (problem := label_problem(record, "label", label)):
            problems.append(problem)
        if category is not None and (not isinstance(category, str) or category == "all"):
            problems.append(f'{record.location}: field "category" must be a string other than "all", got {category!r}')
        if len(problems) == found:
            where = f"{record.location} (question_id {question_id!r})"
            splits = () if category is None else (category,)
            questions.append(Question(question_id, image, text, label, splits, where))
    problems += duplicate_problems(questions, "question_id")
    if problems:
        raise EvalInputError(problems)
    return questions


def score(questions: list[Question], answers: dict[str, str]) -> dict[str, dict[str, float | int]]:
    """metrics.json of POPE: ``{"all": {...}, "<category>": {...}, ...}``, each with ``n``, ``accuracy``,
    ``precision``, ``recall``, ``f1`` and ``yes_ratio`` ("yes" positive), from each question's answer text."""
    predictions = {question.key: reduce_answer(answers[question.key]) for question in questions}
    return metrics_by_split(questions, predictions, POSITIVE, CATEGORY_ORDER, with_yes_ratio=True)
