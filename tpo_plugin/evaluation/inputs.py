"""Reading and checking a benchmark's files before anything is generated or scored.

POPE and AMBER's discriminative task are both yes/no questions about images. Each benchmark's reader turns
its files into :class:`Question` objects; everything that can be wrong with the input (a malformed JSON
line, a missing field, a bad label, a duplicate id, a missing or undecodable image, an answer to no question,
a question without an answer) is collected into one :class:`EvalInputError` that names the file and the line (JSON
Lines) or list item (JSON) of every problem, so that a user fixes all of them in one go and no model is
loaded for input that cannot be scored.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


# Enough to see the pattern of a systematic mistake without flooding the terminal.
MAX_REPORTED_PROBLEMS = 20

LABELS = ("yes", "no")


class EvalInputError(ValueError):
    """Every problem found in a benchmark's input, one per line (the first ``MAX_REPORTED_PROBLEMS``)."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        lines = problems[:MAX_REPORTED_PROBLEMS]
        if len(problems) > MAX_REPORTED_PROBLEMS:
            lines.append(f"... and {len(problems) - MAX_REPORTED_PROBLEMS} more")
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class Record:
    """One JSON object of an input file and where it is: ``"FILE line N"`` (1-based) or ``"FILE item N"`` (0-based)."""

    location: str
    value: dict[str, Any]


@dataclass(frozen=True)
class Question:
    """One yes/no question about an image."""

    id: int | str  # as the file writes it; answers are written back with it unchanged
    image: str  # as the file writes it, relative to --image-dir
    text: str  # the question as the file writes it, without any prompt suffix
    label: str  # "yes" or "no"
    splits: tuple[str, ...]  # the groups it is scored in besides "all" (POPE category, AMBER dimensions)
    where: str  # e.g. 'pope.jsonl line 3 (question_id 7)', for error messages

    @property
    def key(self) -> str:
        return id_key(self.id)


def id_key(value: int | str) -> str:
    """The key that matches an answer's id to a question's: the id as text, so ``7`` and ``"7"`` match (answer
    files written by other tools do not always keep the question file's type)."""
    return str(value)


def read_records(path: Path) -> list[Record]:
    """The objects of a JSON Lines file (blank lines skipped), or of a JSON file holding one list of objects.

    POPE's question files and LLaVA's answer files are JSON Lines; AMBER's query, annotation and response
    files are JSON lists. A file whose first character (after white space) is ``[`` is read as a JSON list.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark, as some editors write, is not JSON
    except FileNotFoundError:
        raise EvalInputError([f"{path}: no such file"]) from None
    except (OSError, UnicodeDecodeError) as error:
        raise EvalInputError([f"{path}: cannot be read ({error})"]) from None

    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as error:
            raise EvalInputError([f"{path.name}: not valid JSON ({error})"]) from None
        located = [(f"{path.name} item {index}", item) for index, item in enumerate(items)]
    else:
        located, problems = [], []
        # Split on "\n" only: str.splitlines() also splits inside strings holding U+2028 and the like, valid JSON.
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                located.append((f"{path.name} line {number}", json.loads(line)))
            except json.JSONDecodeError as error:
                problems.append(f"{path.name} line {number}: not valid JSON ({error})")
        if problems:
            raise EvalInputError(problems)

    not_objects = [f"{location}: not a JSON object" for location, item in located if not isinstance(item, dict)]
    if not_objects:
        raise EvalInputError(not_objects)
    if not located:
        raise EvalInputError([f"{path.name}: holds no entries"])
    return [Record(location, item) for location, item in located]


def field(record: Record, name: str, problems: list[str], kind: type | tuple[type, ...] = str) -> Any:
    """``record[name]`` if present and of ``kind`` (booleans never count as integers); else ``None``, with the
    problem appended to ``problems``."""
    value = record.value.get(name)
    if value is None:
        problems.append(f'{record.location}: field "{name}" is missing')
        return None
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) or not isinstance(value, kinds):
        wanted = " or ".join({int: "an integer", str: "a string"}.get(k, k.__name__) for k in kinds)
        problems.append(f'{record.location}: field "{name}" must be {wanted}, got {value!r}')
        return None
    return value


def label_problem(record: Record, name: str, value: Any) -> str | None:
    """The reference scripts treat every label but "no" (POPE) or "yes" (AMBER) as the other class, so a typo
    would silently flip a question; anything but lower-case "yes"/"no" is refused instead."""
    if value in LABELS:
        return None
    return f'{record.location}: field "{name}" must be "yes" or "no", got {value!r}'


def duplicate_problems(questions: list[Question], id_field: str) -> list[str]:
    """One problem per question whose id an earlier question already has."""
    first_seen: dict[str, Question] = {}
    problems = []
    for question in questions:
        first = first_seen.setdefault(question.key, question)
        if first is not question:
            problems.append(f"{question.where}: {id_field} {question.id!r} appears again (first at {first.where})")
    return problems


def image_problems(questions: list[Question], image_dir: Path) -> list[str]:
    """One problem per distinct image that is not a file in ``image_dir`` or that PIL cannot decode, named with
    the first question that asks about it (AMBER asks about ten questions per image)."""
    from PIL import Image  # deferred: scoring an answer file without --image-dir needs no PIL

    problems, checked = [], set()
    for question in questions:
        if question.image in checked:
            continue
        checked.add(question.image)
        path = image_dir / question.image
        if not path.is_file():
            problems.append(f'{question.where}: image "{question.image}" not found in {image_dir}')
            continue
        try:
            with Image.open(path) as image:
                image.load()  # decodes every byte: a truncated JPEG fails here, not only in the middle of generation
        except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, ... for bad data
            problems.append(f'{question.where}: image "{question.image}" in {image_dir} cannot be decoded ({error})')
    return problems


def match_answers(
    questions: list[Question], records: list[Record], id_field: str, text_field: str, complete: bool = True
) -> dict[str, str]:
    """Each question's answer text by question key, from answer records ``{id_field, text_field, ...}`` in any
    order. Refused: an answer without id or text, an id that is no question's, two answers to one question
    and, when ``complete``, a question without an answer."""
    question_keys = {question.key for question in questions}
    answers: dict[str, str] = {}
    first_location: dict[str, str] = {}
    problems: list[str] = []
    for record in records:
        answer_id = field(record, id_field, problems, (int, str))
        text = field(record, text_field, problems)
        if answer_id is None or text is None:
            continue
        key = id_key(answer_id)
        if key not in question_keys:
            problems.append(f"{record.location}: {id_field} {answer_id!r} is not the id of any question")
        elif key in answers:
            problems.append(
                f"{record.location}: a second answer to {id_field} {answer_id!r} (first at {first_location[key]})"
            )
        else:
            answers[key], first_location[key] = text, record.location
    if complete:
        problems += [
            f"{question.where}: no answer to this question" for question in questions if question.key not in answers
        ]
    if problems:
        raise EvalInputError(problems)
    return answers
