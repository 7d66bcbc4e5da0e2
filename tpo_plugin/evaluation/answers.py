"""Answering a benchmark's questions with LLaMA-Factory's own inference stack, resumably.

The model is the one ``llamafactory-cli chat`` loads from the same arguments: :class:`llamafactory.chat.ChatModel`
parses them with LLaMA-Factory's parser (``get_infer_args``: model, data, fine-tuning and generating
arguments), so base models, LoRA adapters (``--adapter_name_or_path``), merged and fully fine-tuned models,
every template and ``--infer_backend huggingface | vllm | sglang`` work as they do there.

Decoding is greedy with at most 128 new tokens, as LLaVA's ``llava/eval/model_vqa_loader.py`` runs POPE
(``--temperature 0``, ``max_new_tokens=128``); these arguments come before the user's, so an explicit
``--temperature`` or ``--max_new_tokens`` overrides them.

Batching: with ``--infer_backend huggingface`` (LLaMA-Factory's default), ``batch_size`` questions are answered
by one ``generate`` call on the engine's loaded model (:mod:`.batched_generation`: left padding, the family's
processor, the template's prompt); greedy answers are those of one-at-a-time generation. With vLLM and SGLang,
``ChatModel.chat`` answers one conversation per call, so up to ``batch_size`` calls are made at once from as many
threads, and the engine batches them.

Resuming: each answer is appended to ``answers.jsonl`` as soon as it arrives; ``generation.json`` records a
digest of the prompts and the LLaMA-Factory arguments. A rerun into the same output directory asks only the
questions not yet answered, and refuses, before loading the model, to mix answers to other prompts or from
other model arguments with new ones.
"""

import hashlib
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from tqdm import tqdm

from .batched_generation import UNBATCHED_MODEL_TYPES, BatchedGenerator
from .inputs import EvalInputError, Question, match_answers, read_records
from .report import write_atomically


DEFAULT_PROMPT_SUFFIX = " Answer the question using a single word or phrase."
"""Appended to each question: LLaVA-1.5's instruction for short answers (its POPE question file carries it)."""

BENCHMARK_DECODING = ["--do_sample", "false", "--temperature", "0", "--max_new_tokens", "128"]
"""LLaMA-Factory arguments put before the user's (later ones win): greedy, as LLaVA's model_vqa_loader.py."""

ANSWERS_FILE, GENERATION_FILE = "answers.jsonl", "generation.json"

Answerer = Callable[[Question], str]
"""Answers one question; an answerer with an ``answer_batch`` method (list of questions -> list of answers) is
asked batches instead."""


def prompt_for(question: Question, suffix: str) -> str:
    """The question followed by ``suffix``, unless it already ends with it (LLaVA's ``llava_pope_test.jsonl``
    has it built in, after a newline)."""
    if question.text.rstrip().endswith(suffix.strip()):
        return question.text
    return question.text + suffix


def generation_record(questions: list[Question], suffix: str, llamafactory_args: list[str]) -> dict:
    """What determines the answers: a digest of every (id, image, prompt), and the model arguments."""
    prompts = [[question.id, question.image, prompt_for(question, suffix)] for question in questions]
    digest = hashlib.sha256(json.dumps(prompts, ensure_ascii=False).encode("utf-8")).hexdigest()
    return {"prompts_sha256": digest, "prompt_suffix": suffix, "llamafactory_args": llamafactory_args}


def answers_to_resume(
    output_dir: Path, record: dict, questions: list[Question], id_field: str, text_field: str
) -> dict[str, str]:
    """The answers an earlier, interrupted generation into ``output_dir`` wrote for the same prompts and model
    arguments, by question key; refused (:class:`EvalInputError`) if they were for others."""
    answers_path, record_path = output_dir / ANSWERS_FILE, output_dir / GENERATION_FILE
    if not answers_path.exists():
        return {}
    start_over = "pass --overwrite to discard them, or choose another --output-dir"
    if not record_path.exists():
        problem = f"{answers_path} exists but {GENERATION_FILE} (what it answers) does not; {start_over}"
        raise EvalInputError([problem + ", or score the file with --answers"])
    # Empty, cut off or edited: what the answers answer is unknown, so they cannot be resumed.
    unknown = f"so what {answers_path} answers is unknown; {start_over}"
    try:
        previous = json.loads(record_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise EvalInputError([f"{record_path}: not valid JSON ({error}), {unknown}"]) from None
    if not isinstance(previous, dict):
        raise EvalInputError([f"{record_path}: not a JSON object, {unknown}"])
    if previous.get("prompts_sha256") != record["prompts_sha256"]:
        changed = "the question file, --prompt-suffix or the image names changed since they were written"
        raise EvalInputError([f"{answers_path} holds answers to other prompts ({changed}); {start_over}"])
    if previous.get("llamafactory_args") != record["llamafactory_args"]:
        before, now = (" ".join(args) for args in (previous.get("llamafactory_args", []), record["llamafactory_args"]))
        raise EvalInputError(
            [f"{answers_path} was written with other model arguments ({before}, now {now}); {start_over}"]
        )
    drop_incomplete_last_line(answers_path)
    if not answers_path.read_text(encoding="utf-8").strip():
        return {}
    return match_answers(questions, read_records(answers_path), id_field, text_field, complete=False)


def drop_incomplete_last_line(path: Path) -> None:
    """Cut a last line without newline: the process died while writing it (every answer is written with its
    newline in one call)."""
    content = path.read_bytes()
    if content and not content.endswith(b"\n"):
        path.write_bytes(content[: content.rfind(b"\n") + 1])


def write_answers(
    questions: list[Question],
    answer: Answerer,
    answers_path: Path,
    id_field: str,
    text_field: str,
    requests_in_flight: int,
    total: int,
) -> None:
    """Ask ``answer`` each question, up to ``requests_in_flight`` at once, and append ``{id_field, text_field}``
    to ``answers_path`` as each answer arrives (so in completion order), with a progress bar over ``total``."""
    pool = ThreadPoolExecutor(max_workers=requests_in_flight)
    try:
        with (
            answers_path.open("a", encoding="utf-8") as file,
            tqdm(total=total, initial=total - len(questions), unit="question", desc="answering") as progress,
        ):
            futures = {pool.submit(answer, question): question for question in questions}
            for future in as_completed(futures):
                file.write(json.dumps({id_field: futures[future].id, text_field: future.result()}, ensure_ascii=False))
                file.write("\n")
                file.flush()
                progress.update()
    finally:
        # On an error or Ctrl-C, questions not yet sent are dropped; those in flight finish, unrecorded.
        pool.shutdown(wait=True, cancel_futures=True)


def write_answers_in_batches(
    questions: list[Question],
    answer_batch: Callable[[list[Question]], list[str]],
    answers_path: Path,
    id_field: str,
    text_field: str,
    batch_size: int,
    total: int,
) -> None:
    """Ask ``answer_batch`` the questions ``batch_size`` at a time, in order, and append each batch's answers
    ``{id_field, text_field}`` to ``answers_path`` as it arrives, with a progress bar over ``total``."""
    with (
        answers_path.open("a", encoding="utf-8") as file,
        tqdm(total=total, initial=total - len(questions), unit="question", desc="answering") as progress,
    ):
        for start in range(0, len(questions), batch_size):
            batch = questions[start : start + batch_size]
            lines = [
                json.dumps({id_field: question.id, text_field: text}, ensure_ascii=False) + "\n"
                for question, text in zip(batch, answer_batch(batch), strict=True)
            ]
            file.write("".join(lines))  # whole lines only: a crash leaves at most a cut last line, dropped on resume
            file.flush()
            progress.update(len(batch))


class LlamaFactoryAnswerer:
    """Answers a question about its image with :class:`llamafactory.chat.ChatModel`, loaded from LLaMA-Factory
    command-line arguments (``["--model_name_or_path", ..., "--template", ...]``)."""

    def __init__(self, llamafactory_args: list[str], image_dir: Path, suffix: str):
        # Deferred: importing LLaMA-Factory takes seconds, and scoring an answer file needs none of it.
        from llamafactory.chat import ChatModel
        from llamafactory.extras.constants import EngineName

        self.chat_model = ChatModel(llamafactory_args)  # a list is parsed as a command line, by HfArgumentParser
        engine = self.chat_model.engine
        self.batches_requests = engine.name != EngineName.HF  # vLLM, SGLang: concurrent requests are batched
        if engine.name == EngineName.HF and engine.model.config.model_type not in UNBATCHED_MODEL_TYPES:
            self.batched_generator = BatchedGenerator(engine)
            self.answer_batch = self._answer_batch  # generate_answers then sends batches, not single questions
        self.image_dir, self.suffix = image_dir, suffix

    def __call__(self, question: Question) -> str:
        message = {"role": "user", "content": prompt_for(question, self.suffix)}
        responses = self.chat_model.chat([message], images=[str(self.image_dir / question.image)])
        return responses[0].response_text.strip()  # stripped, as model_vqa_loader.py does

    def _answer_batch(self, questions: list[Question]) -> list[str]:
        """The answers to ``questions``, in order, from one ``generate`` call of the Hugging Face engine's model."""
        prompts = [(prompt_for(question, self.suffix), str(self.image_dir / question.image)) for question in questions]
        return [text.strip() for text in self.batched_generator.generate(prompts)]


def generate_answers(
    questions: list[Question],
    output_dir: Path,
    image_dir: Path,
    id_field: str,
    text_field: str,
    suffix: str,
    user_llamafactory_args: list[str],
    batch_size: int,
    overwrite: bool = False,
    load_answerer: Callable[[list[str], Path, str], Answerer] = LlamaFactoryAnswerer,
) -> dict[str, str]:
    """Every question's answer by question key, generated into ``output_dir/answers.jsonl``, resuming the answers
    already there. Input problems are raised before the model is loaded."""
    llamafactory_args = BENCHMARK_DECODING + user_llamafactory_args
    record = generation_record(questions, suffix, llamafactory_args)
    output_dir.mkdir(parents=True, exist_ok=True)
    if overwrite:
        (output_dir / ANSWERS_FILE).unlink(missing_ok=True)
    done = answers_to_resume(output_dir, record, questions, id_field, text_field)
    pending = [question for question in questions if question.key not in done]
    if done:
        print(f"[eval] resuming: {len(done)} of {len(questions)} questions already answered in {output_dir}")
    if pending:
        write_atomically(output_dir / GENERATION_FILE, json.dumps(record, indent=2) + "\n")
        answer = load_answerer(llamafactory_args, image_dir, suffix)
        answers_path = output_dir / ANSWERS_FILE
        if hasattr(answer, "answer_batch"):
            write_answers_in_batches(
                pending, answer.answer_batch, answers_path, id_field, text_field, batch_size, len(questions)
            )
        else:
            in_flight = batch_size if getattr(answer, "batches_requests", True) else 1  # a plain function: batch_size
            write_answers(pending, answer, answers_path, id_field, text_field, in_flight, len(questions))
    return match_answers(questions, read_records(output_dir / ANSWERS_FILE), id_field, text_field)
