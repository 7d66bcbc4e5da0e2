"""``tpo-plugin eval``: hallucination benchmarks on the model LLaMA-Factory trained, scored as their authors do.

    tpo-plugin eval pope --questions coco_pope_random.json --image-dir val2014 --output-dir OUT \\
        --model_name_or_path Qwen/Qwen2-VL-7B-Instruct --adapter_name_or_path saves/tpo --template qwen2_vl
    tpo-plugin eval amber --queries query_discriminative.json --annotations annotations.json \\
        --image-dir AMBER/image --output-dir OUT --answers responses.json
    tpo-plugin eval chair --annotations coco/annotations --captions captions.jsonl --output-dir OUT
    tpo-plugin eval compare saves/sft/pope saves/dpo/pope saves/tpo/pope --output pope.md

``pope`` and ``amber`` either score an existing answer file (``--answers``) or generate the answers with
LLaMA-Factory's ``ChatModel``; ``chair`` scores captions (``--captions``) or generates them the same way. Every
option they do not know is LLaMA-Factory's and goes to LLaMA-Factory's own parser, as ``llamafactory-cli chat``
takes it. They write ``metrics.json`` and ``metrics.md`` into the output directory (and, when generating,
``answers.jsonl``; for AMBER also ``responses.json``, for CHAIR ``mentions.jsonl``). ``compare`` puts the
metrics of several output directories side by side in one table and one bar chart.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from ..evaluation import amber, chair, pope
from ..evaluation.answers import ANSWERS_FILE, DEFAULT_PROMPT_SUFFIX, generate_answers
from ..evaluation.inputs import EvalInputError, Question, image_problems, match_answers, read_records
from ..evaluation.report import (
    METRICS_FILE,
    METRICS_TABLE_FILE,
    compare_table,
    distinct_labels,
    metrics_table,
    plot_comparison,
    read_metrics,
    write_atomically,
    write_metrics,
)
from . import file_in_the_way


RESPONSES_FILE, MENTIONS_FILE = "responses.json", "mentions.jsonl"


class ModelArgumentsParser(argparse.ArgumentParser):
    """Keeps the options it does not define in ``llamafactory_args`` instead of refusing them.

    The model options are LLaMA-Factory's (a few hundred, different in each LLaMA-Factory version); LLaMA-Factory's
    own parser reads them when the model is loaded, and refuses those it does not know either.
    """

    def parse_known_args(self, args=None, namespace=None):
        namespace, unknown = super().parse_known_args(args, namespace)
        namespace.llamafactory_args = unknown
        return namespace, []


MODEL_ARGUMENTS_HELP = (
    "Without --answers, every other option is LLaMA-Factory's, as `llamafactory-cli chat` takes it: "
    "--model_name_or_path, --adapter_name_or_path, --template, --finetuning_type, --infer_backend "
    "(huggingface, vllm, sglang), --image_max_pixels, --infer_dtype, ... Decoding is greedy "
    "(--temperature 0, --max_new_tokens 128 unless given)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    benchmarks = parser.add_subparsers(dest="benchmark", required=True, parser_class=ModelArgumentsParser)

    pope_parser = benchmarks.add_parser(
        "pope", help="POPE (object existence yes/no questions)", epilog=MODEL_ARGUMENTS_HELP, allow_abbrev=False
    )
    pope_parser.add_argument(
        "--questions",
        type=Path,
        required=True,
        help='POPE question file: JSON lines {"question_id", "image", '
        '"text", "label", optional "category"} (e.g. coco_pope_random.json)',
    )
    add_common_arguments(pope_parser, 'LLaVA answer file: JSON lines {"question_id", "text"}')

    amber_parser = benchmarks.add_parser(
        "amber",
        help="AMBER's discriminative task (existence, attribute, relation)",
        epilog=MODEL_ARGUMENTS_HELP,
        allow_abbrev=False,
    )
    amber_parser.add_argument(
        "--queries", type=Path, required=True, help="AMBER query file (query_discriminative.json or one dimension's)"
    )
    amber_parser.add_argument("--annotations", type=Path, required=True, help="AMBER's annotations.json")
    add_common_arguments(amber_parser, 'AMBER response file: a JSON list of {"id", "response"} (or JSON lines)')

    chair_parser = benchmarks.add_parser(
        "chair",
        help="CHAIR (object hallucination in image descriptions) on COCO val2014",
        epilog=MODEL_ARGUMENTS_HELP.replace("--answers", "--captions").replace(
            "--max_new_tokens 128", "--max_new_tokens 512"
        ),
        allow_abbrev=False,
    )
    add_chair_arguments(chair_parser)

    compare_parser = benchmarks.add_parser(
        "compare", help="several evaluations side by side: one markdown table and a bar chart", allow_abbrev=False
    )
    compare_parser.add_argument(
        "runs", nargs="+", type=Path, help="output directories of `tpo-plugin eval pope|amber|chair`"
    )
    compare_parser.add_argument(
        "--labels", help="comma-separated column names (default: the shortest distinct ends of the paths)"
    )
    compare_parser.add_argument(
        "--output",
        type=Path,
        default=Path("eval_compare.md"),
        help="the markdown table; the bar chart goes next to it as .png (default: %(default)s)",
    )


def add_chair_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--annotations", type=Path, required=True,
        help=f"folder with COCO's {chair.INSTANCES_FILE} and {chair.CAPTIONS_FILE} (the ground-truth objects)",
    )  # fmt: skip
    parser.add_argument("--output-dir", type=Path, required=True, help="where captions, mentions and metrics go")
    parser.add_argument(
        "--captions", type=Path, help='score these captions instead of generating: JSON lines {"image_id", "caption"}'
    )
    parser.add_argument(
        "--images", "--image-dir", dest="image_dir", type=Path, help="COCO val2014 images (to generate captions)"
    )
    parser.add_argument("--prompt", default=chair.DEFAULT_PROMPT, help="the instruction (default: %(default)r)")
    parser.add_argument(
        "--num-images", type=int, default=500,
        help="caption this many images of --images, drawn at random with --seed (default: %(default)s, as CHAIR "
        "evaluations of VLMs do; 0: all)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the draw of --num-images (default: %(default)s)")
    parser.add_argument(
        "--max_new_tokens", type=int, default=512, help="longest caption in tokens (default: %(default)s)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=8,
        help="images per generate call (huggingface engine) or in flight (vLLM, SGLang); default %(default)s",
    )  # fmt: skip
    parser.add_argument(
        "--overwrite", action="store_true", help="discard the captions of an earlier generation instead of resuming it"
    )


def add_common_arguments(parser: argparse.ArgumentParser, answers_help: str) -> None:
    parser.add_argument("--output-dir", type=Path, required=True, help="where answers and metrics are written")
    parser.add_argument("--image-dir", type=Path, help="folder of the images (needed to generate answers)")
    parser.add_argument("--answers", type=Path, help=f"score this answer file instead of generating: {answers_help}")
    parser.add_argument(
        "--prompt-suffix",
        default=DEFAULT_PROMPT_SUFFIX,
        help="appended to each question unless it already ends with it (default: %(default)r)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="questions per generate call (huggingface engine) or in flight at once (vLLM, SGLang batch them)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="discard the answers of an earlier generation instead of resuming it"
    )


def run(args: argparse.Namespace) -> int:
    try:
        if args.benchmark == "compare":
            return run_compare(args)
        if args.benchmark == "chair":
            return run_chair(args)
        return run_benchmark(args)
    except EvalInputError as error:
        layout = " " if len(error.problems) == 1 else "\n"  # one problem: one line
        print(f"tpo-plugin eval {args.benchmark}: the input cannot be evaluated:{layout}{error}", file=sys.stderr)
        return 2


def run_benchmark(args: argparse.Namespace) -> int:
    """Read and check everything, get the answers (scored file or generation), write the metrics."""
    if args.benchmark == "pope":
        benchmark, questions = pope, pope.read_questions(args.questions)
        title = f"POPE: {args.questions.name} (positive class: yes)"
    else:
        benchmark, questions = amber, amber.read_questions(args.queries, args.annotations)
        title = f"AMBER discriminative: {args.queries.name} (positive class: No)"

    problems = image_problems(questions, args.image_dir) if args.image_dir else []
    blocking = file_in_the_way(args.output_dir)
    if blocking is not None:
        problems.append(f"--output-dir {args.output_dir}: {blocking} is a file, not a folder")
    if args.answers and args.llamafactory_args:
        problems.append(f"model arguments given with --answers, which needs none: {' '.join(args.llamafactory_args)}")
    if not args.answers and not (args.image_dir and args.llamafactory_args):
        problems.append("give --answers FILE, or --image-dir and the model arguments (--model_name_or_path ...)")
    if args.batch_size < 1:
        problems.append(f"--batch-size must be at least 1, got {args.batch_size}")
    if problems:
        raise EvalInputError(problems)

    if args.answers:
        answers = match_answers(questions, read_records(args.answers), benchmark.ID_FIELD, benchmark.TEXT_FIELD)
    else:
        answers = generate_answers(
            questions, args.output_dir, args.image_dir, benchmark.ID_FIELD, benchmark.TEXT_FIELD,
            suffix=args.prompt_suffix, user_llamafactory_args=args.llamafactory_args, batch_size=args.batch_size,
            overwrite=args.overwrite,
        )  # fmt: skip

    metrics = benchmark.score(questions, answers)
    write_metrics(metrics, args.output_dir, title)
    if benchmark is amber:
        write_amber_responses(questions, answers, args.output_dir / RESPONSES_FILE)
    written = ([] if args.answers else [ANSWERS_FILE]) + [METRICS_FILE, METRICS_TABLE_FILE]
    written += [RESPONSES_FILE] if benchmark is amber else []
    print(f"{title}\n\n{metrics_table(metrics)}\n[eval] wrote {', '.join(written)} in {args.output_dir}")
    return 0


def run_chair(args: argparse.Namespace) -> int:
    """Check the arguments, read the ground truth, get the captions (scored file or generation), score them."""
    problems = []
    blocking = file_in_the_way(args.output_dir)
    if blocking is not None:
        problems.append(f"--output-dir {args.output_dir}: {blocking} is a file, not a folder")
    if args.captions and (args.llamafactory_args or args.image_dir):
        given = " ".join(args.llamafactory_args + (["--images", str(args.image_dir)] if args.image_dir else []))
        problems.append(f"--captions needs no images or model arguments, got: {given}")
    if not args.captions and not (args.image_dir and args.llamafactory_args):
        problems.append("give --captions FILE, or --images and the model arguments (--model_name_or_path ...)")
    for option, value, least in (("--batch-size", args.batch_size, 1), ("--num-images", args.num_images, 0),
                                 ("--max_new_tokens", args.max_new_tokens, 1)):  # fmt: skip
        if value < least:
            problems.append(f"{option} must be at least {least}, got {value}")
    if not args.annotations.is_dir():
        problems.append(f"--annotations {args.annotations}: not a folder")
    if problems:
        raise EvalInputError(problems)

    vocabulary = chair.Vocabulary.load()
    ground_truth = chair.read_ground_truth(args.annotations, vocabulary)
    if args.captions:
        captions = chair.read_captions(args.captions, ground_truth)
    else:
        requests = chair.caption_requests(
            args.image_dir, ground_truth, args.prompt, args.num_images or None, args.seed
        )
        problems = image_problems(requests, args.image_dir)
        if problems:
            raise EvalInputError(problems)
        answers = generate_answers(
            requests, args.output_dir, args.image_dir, chair.ID_FIELD, chair.TEXT_FIELD, suffix="",
            user_llamafactory_args=["--max_new_tokens", str(args.max_new_tokens), *args.llamafactory_args],
            batch_size=args.batch_size, overwrite=args.overwrite,
        )  # fmt: skip
        captions = {request.key: (request.id, answers[request.key]) for request in requests}

    metrics, mentions = chair.score(captions, ground_truth, vocabulary)
    title = f"CHAIR: {len(captions)} captions of COCO val2014"
    args.output_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(
        args.output_dir / MENTIONS_FILE, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in mentions)
    )
    write_metrics(metrics, args.output_dir, title, chair_counts(metrics["all"]))
    written = ([] if args.captions else [ANSWERS_FILE]) + [MENTIONS_FILE, METRICS_FILE, METRICS_TABLE_FILE]
    print(f"{title}\n\n{metrics_table(metrics)}{chair_counts(metrics['all'])}")
    print(f"[eval] wrote {', '.join(written)} in {args.output_dir}")
    return 0


def chair_counts(values: dict[str, float | int]) -> str:
    """The counts behind CHAIR's fractions, as a line under metrics.md's table."""
    return (
        f"\n{values['hallucinated_captions']} of {values['n']} captions hallucinate; "
        f"{values['hallucinated_mentions']} of {values['mentions']} object mentions are hallucinated; "
        f"{values['ground_truth_objects_mentioned']} of {values['ground_truth_objects']} ground-truth objects "
        "are mentioned.\n"
    )


def write_amber_responses(questions: list[Question], answers: dict[str, str], path: Path) -> None:
    """AMBER's response format with each answer reduced to "Yes"/"No": the file AMBER's inference.py scores."""
    responses = [
        {"id": question.id, "response": amber.amber_response(answers[question.key])} for question in questions
    ]
    path.write_text(json.dumps(responses, indent=1) + "\n", encoding="utf-8")


def run_compare(args: argparse.Namespace) -> int:
    if args.llamafactory_args:
        raise EvalInputError([f"unrecognized arguments: {' '.join(args.llamafactory_args)}"])
    labels = args.labels.split(",") if args.labels else distinct_labels(args.runs)
    if len(labels) != len(args.runs) or len(set(labels)) != len(labels):
        raise EvalInputError([f"--labels needs {len(args.runs)} distinct names, got {args.labels!r}"])

    runs, problems = {}, []
    for label, run_dir in zip(labels, args.runs, strict=True):
        try:
            runs[label] = read_metrics(run_dir)
        except EvalInputError as error:  # every run's problem at once
            problems += error.problems
    if problems:
        raise EvalInputError(problems)
    table = compare_table(runs)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(table, encoding="utf-8")
    plot_path = args.output.with_suffix(".png")
    plot_comparison(runs, plot_path)
    print(table)
    print(f"[eval] wrote {args.output} and {plot_path}")
    return 0


# `tpo-plugin sweep --eval SPEC`: evaluating each trained run of a sweep.

EVAL_SPEC_FORMATS = {
    "pope": ["--questions", "--image-dir"],
    "amber": ["--queries", "--annotations", "--image-dir"],
    "chair": ["--annotations", "--images"],
}
EVAL_SPEC_HELP = "pope:QUESTIONS:IMAGE_DIR, amber:QUERIES:ANNOTATIONS:IMAGE_DIR or chair:ANNOTATIONS_DIR:IMAGE_DIR"

# Recipe keys that shape what the model sees at inference as in training (prompt format, image resolution).
SHARED_RECIPE_KEYS = (
    "template", "default_system", "enable_thinking", "image_max_pixels", "image_min_pixels", "trust_remote_code",
)  # fmt: skip


def parse_eval_spec(text: str) -> tuple[str, list[str]]:
    """A name and the ``tpo-plugin eval`` arguments for a sweep's ``--eval`` value, e.g. ``pope:coco_pope_random.json:
    val2014`` -> ``("pope_random", ["pope", "--questions", "coco_pope_random.json", "--image-dir", "val2014"])``.
    The name (``pope``, ``pope_<category>`` for POPE's file names, ``amber``, ``chair``) prefixes the table's
    columns."""
    benchmark, *paths = text.split(":")
    options = EVAL_SPEC_FORMATS.get(benchmark)
    if options is None or len(paths) != len(options) or not all(paths):
        raise ValueError(f"Expected --eval {EVAL_SPEC_HELP}, got {text!r}.")
    category = pope.category_from_file_name(Path(paths[0])) if benchmark == "pope" else None
    name = f"pope_{category}" if category else benchmark
    return name, [benchmark] + [item for option, path in zip(options, paths, strict=True) for item in (option, path)]


def parse_eval_specs(texts: list[str]) -> dict[str, list[str]]:
    """The ``tpo-plugin eval`` arguments of each ``--eval`` value by name; two with one name are refused."""
    evals = dict(parse_eval_spec(text) for text in texts)
    if len(evals) != len(texts):
        raise ValueError(f"Two --eval values evaluate into the same name: {texts}; give each its own question file.")
    return evals


def model_arguments_for_run(config: dict, run_dir: Path) -> list[str]:
    """LLaMA-Factory inference arguments for the model a training run with ``config`` saved in ``run_dir``: the
    base model with the run's adapter for LoRA (LLaMA-Factory's default), the saved model itself otherwise."""
    if config.get("finetuning_type", "lora") == "lora":
        arguments = ["--model_name_or_path", str(config["model_name_or_path"]), "--adapter_name_or_path", str(run_dir)]
    else:
        arguments = ["--model_name_or_path", str(run_dir)]
    for key in SHARED_RECIPE_KEYS:
        if config.get(key) is not None:
            arguments += [f"--{key}", str(config[key])]
    return arguments


def overall_metrics(eval_dir: Path, name: str) -> dict[str, float | int]:
    """The "all" entry of an evaluation's metrics.json, keys prefixed with the --eval name (``pope_random_f1``)."""
    return {f"{name}_{key}": value for key, value in read_metrics(eval_dir)["all"].items() if key != "n"}


def evaluate_trained_run(evals: dict[str, list[str]], config: dict, run_dir: Path) -> dict[str, float | int | str]:
    """``tpo-plugin eval`` (of this Python environment) of the model a sweep's run saved in ``run_dir``, into
    ``run_dir/eval_<name>`` for each of ``evals``; the status and overall metrics of each, for the sweep table."""
    results: dict[str, float | int | str] = {}
    for name, eval_args in evals.items():
        eval_dir = run_dir / f"eval_{name}"
        # --overwrite: answers left in eval_dir by an earlier sweep into the same folder are another model's.
        command = [sys.executable, "-m", "tpo_plugin", "eval", *eval_args, "--output-dir", str(eval_dir)]
        command += ["--overwrite", *model_arguments_for_run(config, run_dir)]
        print(f"[sweep] eval {name}: {' '.join(command)}", flush=True)
        returncode = subprocess.run(command, env=os.environ.copy()).returncode
        results[f"{name}_status"] = "ok" if returncode == 0 else f"failed (exit code {returncode})"
        if returncode == 0:
            results.update(overall_metrics(eval_dir, name))
    return results
