"""AMBER's discriminative task (Wang et al. 2023, *An LLM-free Multi-dimensional Benchmark for MLLMs Hallucination
Evaluation*), scored as its ``inference.py`` (github.com/junyangwang0410/AMBER) scores it.

Inputs, as AMBER ships them: queries (``data/query/query_discriminative.json``: a JSON list of
``{"id", "image", "query"}``) and annotations (``data/annotations.json``: a JSON list read by inference.py as
``ground_truth[id - 1]``, each with ``"type"`` and ``"truth"``). Answers: AMBER's response format, a JSON list
of ``{"id", "response"}`` (or the same objects one per line, as ``answers.jsonl`` is written).

inference.py's rules reproduced here:

* "No" is the positive class: precision = share of the "No" answers whose truth is "no"
  (``qa_ans_no_score / qa_ans_no_num``), recall = share of the "no" truths answered "No"
  (``qa_no_score / qa_no_num``), accuracy = share of correct answers (``qa_correct_score / qa_correct_num``);
* dimensions by annotation ``type``: ``discriminative-hallucination`` is existence;
  ``discriminative-attribute-state`` / ``-number`` / ``-action`` are state / number / action, and together
  attribute (their counts summed); every other type (AMBER's ``discriminative-relation`` and ``relation``) is
  relation. "all" is every query.

Where this differs from inference.py:

* inference.py compares each response with the exact strings "Yes" and "No", so "yes", "No." or a sentence
  is neither and counts as a wrong answer. Here each answer is first reduced to "Yes"/"No" with POPE's rule
  (:func:`.pope.reduce_answer`), so a free-form answer is scored by what it says; ``responses.json`` holds the
  reduced answers, on which inference.py gives these numbers;
* inference.py prints percentages rounded to 0.1 and computes F1 from the rounded precision and recall with
  1e-4 added to the denominator (1e-3 for existence); its counters start at 0.001 (``data/metrics.txt``), which
  shifts every fraction by about 0.001 / n and makes an empty count give 0 instead of dividing by zero.
  metrics.json keeps the exact fractions of the counts and the plain harmonic mean (an empty count gives 0.0,
  :mod:`.metrics`), so its F1 can differ from the printed one by about 0.1 point;
* an annotation is looked up by its ``"id"`` where it has one (AMBER's file has, equal to position + 1), by
  position + 1 otherwise, so an annotation file holding only some entries still works;
* a truth other than "yes"/"no" (inference.py counts it as "no") and generative queries (scored by inference.py
  with spaCy and NLTK, not here) are refused.
"""

from pathlib import Path

from .inputs import EvalInputError, Question, Record, duplicate_problems, field, label_problem, read_records
from .metrics import metrics_by_split
from .pope import reduce_answer


ID_FIELD, TEXT_FIELD = "id", "response"
"""Keys of AMBER's response format; ``answers.jsonl`` is written with them."""

POSITIVE = "no"
"""inference.py: precision and recall are those of the "No" answers."""

DIMENSIONS_BY_TYPE = {
    "discriminative-hallucination": ("existence",),
    "discriminative-attribute-state": ("attribute", "state"),
    "discriminative-attribute-number": ("attribute", "number"),
    "discriminative-attribute-action": ("attribute", "action"),
}
RELATION = ("relation",)  # inference.py's ``else`` branch (``asso_*`` counters)
DIMENSION_ORDER = ("existence", "attribute", "state", "number", "action", "relation")


def dimensions_of(annotation_type: str) -> tuple[str, ...]:
    """The dimensions a query of this annotation ``type`` is scored in, besides "all" (inference.py's if/elif
    chain on ``ground_truth[id - 1]['type']``)."""
    return DIMENSIONS_BY_TYPE.get(annotation_type, RELATION)


def annotations_by_id(path: Path) -> dict[int, Record]:
    """AMBER's annotations by query id: an entry's ``"id"``, or its position + 1 (inference.py's ``id - 1``)."""
    by_id: dict[int, Record] = {}
    problems = []
    for position, record in enumerate(read_records(path)):
        annotation_id = record.value.get("id", position + 1)
        if isinstance(annotation_id, bool) or not isinstance(annotation_id, int):
            problems.append(f'{record.location}: field "id" must be an integer, got {annotation_id!r}')
        elif annotation_id in by_id:
            problems.append(
                f"{record.location}: id {annotation_id} appears again (first at {by_id[annotation_id].location})"
            )
        else:
            by_id[annotation_id] = record
    if problems:
        raise EvalInputError(problems)
    return by_id


def read_questions(queries_path: Path, annotations_path: Path) -> list[Question]:
    """AMBER's discriminative queries with their truth and dimensions, checked: each query an object with an
    integer ``id`` (unique) that has an annotation, string ``image`` and ``query``; each annotation used with a
    string ``type`` other than "generative" and ``truth`` "yes"/"no"."""
    annotations = annotations_by_id(annotations_path)
    questions, problems = [], []
    for record in read_records(queries_path):
        found = len(problems)
        query_id = field(record, "id", problems, int)
        image, text = field(record, "image", problems), field(record, "query", problems)
        if query_id is None:
            continue
        annotation = annotations.get(query_id)
        if annotation is None:
            problems.append(f"{record.location}: query id {query_id} has no annotation in {annotations_path.name}")
            continue
        annotation_type = field(annotation, "type", problems)
        truth = field(annotation, "truth", problems)
        if annotation_type == "generative":
            problems.append(
                f"{record.location}: query id {query_id} belongs to AMBER's generative task, which is not scored here "
                "(use query_discriminative.json)"
            )
        if truth is not None and (problem := label_problem(annotation, "truth", truth)):
            problems.append(problem)
        if len(problems) == found:
            where = f"{record.location} (id {query_id})"
            questions.append(Question(query_id, image, text, truth, dimensions_of(annotation_type), where))
    problems += duplicate_problems(questions, "id")
    if problems:
        raise EvalInputError(problems)
    return questions


def amber_response(answer: str) -> str:
    """The answer as AMBER's response format expects it: "Yes" or "No", by POPE's rule."""
    return reduce_answer(answer).capitalize()


def score(questions: list[Question], answers: dict[str, str]) -> dict[str, dict[str, float | int]]:
    """metrics.json of AMBER: ``{"all": {...}, "existence": {...}, "attribute": {...}, "state": {...}, ...}`` (the
    dimensions that have queries), each with ``n``, ``accuracy``, ``precision``, ``recall``, ``f1`` ("No"
    positive), from each query's answer text."""
    predictions = {question.key: reduce_answer(answers[question.key]) for question in questions}
    return metrics_by_split(questions, predictions, POSITIVE, DIMENSION_ORDER)
