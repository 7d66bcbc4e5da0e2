"""Batched generation with LLaMA-Factory's Hugging Face engine: one ``generate`` call per batch gives the greedy
answers that LLaMA-Factory's own ``ChatModel.chat`` gives one question at a time, on tiny Qwen2-VL and LLaVA models;
an interrupted batched generation resumes with the missing answers only.
"""

import pytest

from tpo_plugin.evaluation import answers as generation
from tpo_plugin.evaluation.batched_generation import cut_after_first_stop, generation_config_arguments, left_padded
from tpo_plugin.evaluation.inputs import Question

from conftest import COLOURS, SHAPES, TEMPLATES, draw


def test_left_padding_puts_every_prompt_end_in_the_last_column():
    padded, masks = left_padded([[5, 6, 7], [8], [9, 10]], pad_token_id=0)
    assert padded == [[5, 6, 7], [0, 0, 8], [0, 9, 10]]
    assert masks == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]


def test_answers_are_cut_after_their_first_stop_token():
    # What generate writes after a finished row (the pad token, here 0) is not part of its answer.
    assert cut_after_first_stop([4, 5, 2, 0, 0], {2, 3}) == [4, 5, 2]
    assert cut_after_first_stop([4, 3, 2, 0], {2, 3}) == [4, 3]
    assert cut_after_first_stop([4, 5, 6], {2}) == [4, 5, 6]  # ran to max_new_tokens


def test_generation_config_is_greedy_as_the_engine_makes_it():
    engine_args = {"do_sample": False, "temperature": 0.0, "top_p": 0.7, "top_k": 50, "max_length": 1024,
                   "max_new_tokens": 128, "skip_special_tokens": True}  # fmt: skip
    arguments = generation_config_arguments(engine_args, [2, 7], pad_token_id=0)
    assert arguments == {"do_sample": False, "top_k": 50, "max_new_tokens": 128, "skip_special_tokens": True,
                         "num_return_sequences": 1, "eos_token_id": [2, 7], "pad_token_id": 0}  # fmt: skip
    sampled = generation_config_arguments({**engine_args, "do_sample": True, "temperature": 0.9}, [2], 0)
    assert sampled["do_sample"] and sampled["temperature"] == 0.9 and sampled["top_p"] == 0.7


def batch_answerer(asked_batches: list, fail_at_batch: int | None = None):
    """An answerer with ``answer_batch`` that records its batches and dies when asked batch ``fail_at_batch``."""

    class Answerer:
        def __call__(self, question):
            raise AssertionError("a batching answerer is asked batches, not single questions")

        def answer_batch(self, questions):
            if fail_at_batch is not None and len(asked_batches) == fail_at_batch:
                raise RuntimeError("power cut")
            asked_batches.append([question.id for question in questions])
            return [f"No ({question.image})" for question in questions]

    return lambda llamafactory_args, image_dir, suffix: Answerer()


def test_batched_generation_resumes_with_the_missing_answers_only(tmp_path):
    questions = [Question(index, f"{index % 3}.jpg", f"Is there a dog? {index}", "no", (), "") for index in range(10)]
    common = dict(
        questions=questions, output_dir=tmp_path, image_dir=tmp_path, id_field="question_id", text_field="text",
        suffix="", user_llamafactory_args=["--template", "x"], batch_size=4,
    )  # fmt: skip
    first = []
    with pytest.raises(RuntimeError, match="power cut"):
        generation.generate_answers(**common, load_answerer=batch_answerer(first, fail_at_batch=2))
    assert first == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert len((tmp_path / "answers.jsonl").read_text().splitlines()) == 8  # each batch written as it came

    second = []
    answers = generation.generate_answers(**common, load_answerer=batch_answerer(second))
    assert second == [[8, 9]]
    assert answers == {str(index): f"No ({index % 3}.jpg)" for index in range(10)}


QUESTION_TEXTS = ("Is there a dog?", "Is there a red ball in the middle of the picture?", "Box?", "What is this?")


@pytest.mark.e2e
@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_batched_answers_equal_one_at_a_time_answers(family, model_dirs, tmp_path):
    """Prompts of different lengths (so padded) and images of different sizes (so, for Qwen2-VL, different numbers
    of image tokens), in batches of 7 and 3 (the last one short): the same greedy answers, token for token, as
    LLaMA-Factory's ``ChatModel.chat`` gives each question alone."""
    for index, (colour, shape) in enumerate(zip(COLOURS, SHAPES * 2, strict=True)):
        draw(colour, shape, size=(40 + 16 * index, 56)).save(tmp_path / f"{index}.png")
    questions = [Question(index, f"{index % 4}.png", QUESTION_TEXTS[index % 4], "yes", (), "") for index in range(7)]
    model = ["--model_name_or_path", str(model_dirs[family]), "--template", TEMPLATES[family]]
    answerer = generation.LlamaFactoryAnswerer(
        generation.BENCHMARK_DECODING + model + ["--max_new_tokens", "24"], tmp_path, generation.DEFAULT_PROMPT_SUFFIX
    )
    one_at_a_time = [answerer(question) for question in questions]  # LLaMA-Factory's own engine, one request each
    assert len(set(one_at_a_time)) > 1  # the answers depend on the prompt: a padding mistake would show

    assert answerer.answer_batch(questions) == one_at_a_time
    in_threes = [text for start in range(0, 7, 3) for text in answerer.answer_batch(questions[start : start + 3])]
    assert in_threes == one_at_a_time
