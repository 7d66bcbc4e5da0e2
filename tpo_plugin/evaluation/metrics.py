"""Accuracy, precision, recall and F1 of yes/no predictions, overall and per split, for a chosen positive class.

POPE (LLaVA ``llava/eval/eval_pope.py``) counts "yes" as the positive class; AMBER (``inference.py``) counts
"No". Both compute the same four numbers from the same confusion counts, which is all this module does.

An empty denominator (precision when the positive class is never predicted, recall when no label is
positive, F1 when both are 0) gives 0.0. eval_pope.py raises ``ZeroDivisionError`` there; AMBER's counters
start at 0.001, so it gives 0 too. A model that always answers "yes" thus still gets a report, and AMBER's
precision 0 says that it never said "No".
"""

from collections.abc import Iterable, Sequence

from .inputs import Question


def ratio(numerator: int, denominator: int) -> float:
    """``numerator / denominator``, 0.0 for an empty denominator (see the module docstring)."""
    return numerator / denominator if denominator else 0.0


def binary_metrics(predictions: Sequence[str], labels: Sequence[str], positive: str) -> dict[str, float | int]:
    """``n``, ``accuracy``, ``precision``, ``recall``, ``f1`` of ``predictions`` against ``labels`` (both
    "yes"/"no"), ``positive`` being the positive class; fractions in [0, 1].

    The counts are eval_pope.py's ``TP, FP, TN, FN`` loop; with ``positive="no"`` they are AMBER's
    ``qa_ans_no_score`` (TP), ``qa_ans_no_num`` (TP + FP), ``qa_no_num`` (TP + FN) and ``qa_correct_score``
    (TP + TN).
    """
    pairs = list(zip(predictions, labels, strict=True))
    true_positive = sum(pred == positive and label == positive for pred, label in pairs)
    false_positive = sum(pred == positive and label != positive for pred, label in pairs)
    true_negative = sum(pred != positive and label != positive for pred, label in pairs)
    false_negative = sum(pred != positive and label == positive for pred, label in pairs)
    precision = ratio(true_positive, true_positive + false_positive)
    recall = ratio(true_positive, true_positive + false_negative)
    return {
        "n": len(pairs),
        "accuracy": ratio(true_positive + true_negative, len(pairs)),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
    }


def split_names(questions: Iterable[Question], order: Sequence[str] = ()) -> list[str]:
    """The splits the questions fall in: those of ``order`` that occur, in that order, then the others in order
    of first appearance."""
    seen = list(dict.fromkeys(split for question in questions for split in question.splits))
    return [name for name in order if name in seen] + [name for name in seen if name not in order]


def metrics_by_split(
    questions: Sequence[Question],
    predictions: dict[str, str],
    positive: str,
    order: Sequence[str] = (),
    with_yes_ratio: bool = False,
) -> dict[str, dict[str, float | int]]:
    """``{"all": metrics, split: metrics, ...}`` of ``predictions`` ("yes"/"no" by question key); splits with no
    question are left out. ``with_yes_ratio`` adds POPE's ``yes_ratio``, the share of "yes" predictions."""
    groups = {"all": list(questions)}
    for name in split_names(questions, order):
        groups[name] = [question for question in questions if name in question.splits]

    report = {}
    for name, members in groups.items():
        predicted = [predictions[question.key] for question in members]
        report[name] = binary_metrics(predicted, [question.label for question in members], positive)
        if with_yes_ratio:
            report[name]["yes_ratio"] = ratio(predicted.count("yes"), len(predicted))
    return report
