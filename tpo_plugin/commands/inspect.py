"""``tpo-plugin inspect``: what TPO weights, per token, on your model and data.

    tpo-plugin inspect my_tpo.yaml [key=value ...] --output-dir OUT [--num-pairs 16] [--split train|eval]
    tpo-plugin inspect --history OUTPUT_DIR|TOKEN_LOG [--output-dir OUT]

The recipe is parsed with LLaMA-Factory's parser and checked, loaded and wired by the run builder that training
uses (:func:`tpo_plugin.training.workflow.build_tpo_run`), and the first N pairs go through the trainer's own
passes with the noise of an evaluation step (:mod:`tpo_plugin.training.diagnostics.token_view`).
Writes ``OUT/tokens.jsonl`` and ``OUT/report.html`` and prints the first pairs; ``--history`` renders the
``tpo_tokens.jsonl`` that ``tpo_log_tokens`` wrote during training into ``OUT/history.html`` (or another token
log: a new run into the same ``output_dir`` sets the earlier run's aside as ``tpo_tokens.<time>.jsonl``).
"""

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from . import file_in_the_way


TOKENS_FILE = "tokens.jsonl"
REPORT_FILE = "report.html"
HISTORY_FILE = "history.html"
FRAME_SIZE = 96  # pixels on the longer side of a video frame in the report's strips


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", nargs="?", type=Path, help="a stage: tpo training YAML")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides, as llamafactory-cli takes")
    parser.add_argument("--output-dir", type=Path, help="where tokens.jsonl and report.html go (history: same dir)")
    parser.add_argument("--num-pairs", type=int, default=16, help="inspect the first N pairs (default 16)")
    parser.add_argument("--split", choices=("train", "eval"), default="train", help="which data (default train)")
    parser.add_argument(
        "--history", type=Path, metavar="OUTPUT_DIR", help="render OUTPUT_DIR/tpo_tokens.jsonl (or a token log file)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a previous report in the output dir")


class InspectError(ValueError):
    """Bad input, reported before anything expensive runs."""


def recipe_config(recipe: Path, overrides: list[str], output_dir: Path, split: str) -> dict[str, Any]:
    """The recipe with its overrides merged as LLaMA-Factory's ``read_args`` merges them, checked for inspect."""
    from omegaconf import OmegaConf

    if not recipe.is_file():
        raise InspectError(f"Recipe {recipe} does not exist.")
    bad = [item for item in overrides if "=" not in item]
    if bad:
        raise InspectError(f"Overrides must be KEY=VALUE, got {', '.join(bad)}.")
    config = OmegaConf.to_container(OmegaConf.merge(OmegaConf.load(recipe.absolute()), OmegaConf.from_cli(overrides)))
    if config.get("stage") != "tpo":
        stage = config.get("stage")
        raise InspectError(f"{recipe} has `stage: {stage}`; tpo-plugin inspect needs a `stage: tpo` recipe.")
    if split == "eval" and not (config.get("eval_dataset") or float(config.get("val_size") or 0) > 0):
        raise InspectError(f"--split eval, but {recipe} has no evaluation data (set `eval_dataset` or `val_size`).")
    # Loaded as for training (reference model, adapter kept separate), but nothing is trained or written there;
    # the reference model runs live, so no reference scores are computed or stored.
    config.pop("resume_from_checkpoint", None)
    config.update(
        do_train=True,
        output_dir=str(output_dir),
        overwrite_output_dir=True,
        report_to="none",
        tpo_log_tokens=0,
        tpo_precompute_ref=False,
    )
    return config


def check_output_dir(output_dir: Path, names: tuple[str, ...], overwrite: bool) -> None:
    blocking = file_in_the_way(output_dir)
    if blocking is not None:  # refused here, not by mkdir once the model has run
        raise InspectError(f"--output-dir {output_dir}: {blocking} is a file, not a folder.")
    existing = [name for name in names if (output_dir / name).exists()]
    if existing and not overwrite:
        raise InspectError(f"{output_dir} already holds {', '.join(existing)}; pass --overwrite to replace it.")


def inspect_pairs(config: dict[str, Any], num_pairs: int, split: str) -> tuple[list[dict], list[dict], str, Any]:
    """(token views, the inspected dataset rows, the reference model in words, the run's image corrupter), built as
    ``run_tpo`` builds."""
    from llamafactory.hparams import get_train_args

    from ..training.diagnostics.token_view import pair_token_views, reference_description
    from ..training.workflow import build_tpo_run

    run = build_tpo_run(*get_train_args(config)[:4])
    dataset = run.dataset_module.get("train_dataset" if split == "train" else "eval_dataset")
    if isinstance(dataset, dict):  # eval_on_each_dataset: the datasets one after another
        dataset = [row for part in dataset.values() for row in part]
    if dataset is None or len(dataset) == 0:
        raise InspectError(f"The recipe's {split} split holds no pairs.")
    rows = [dataset[index] for index in range(min(num_pairs, len(dataset)))]

    tokenizer = run.tokenizer_module["tokenizer"]
    views = pair_token_views(run.trainer, rows, tokenizer)
    for index, (view, row) in enumerate(zip(views, rows, strict=True)):
        prompt_ids = [t for t, label in zip(row["chosen_input_ids"], row["chosen_labels"], strict=True) if label < 0]
        view.update(pair=index, image=list(row.get("images") or []), video=list(row.get("videos") or []))
        view["question"] = tokenizer.decode(prompt_ids, skip_special_tokens=True).strip()
    return views, rows, reference_description(run.trainer), run.trainer.data_collator.image_corrupter


def frame_strips(corrupter: Any, videos: list[Any]) -> list[tuple[list[Any], list[Any]]]:
    """Per video, the frames the model sees and their corrupted copies (the noise of an evaluation step)."""
    from ..training.batch.keys import EVAL_STEP_KEY

    return [(frames, corrupter.corrupted_frames(frames, EVAL_STEP_KEY)) for frames in corrupter.load_videos(videos)]


def run(args: argparse.Namespace) -> int:
    try:
        if args.history is not None:
            return run_history(args)
        if args.recipe is None or args.output_dir is None:
            raise InspectError("Give a recipe and --output-dir (or --history OUTPUT_DIR).")
        if args.num_pairs < 1:
            raise InspectError(f"--num-pairs must be at least 1, got {args.num_pairs}.")
        check_output_dir(args.output_dir, (TOKENS_FILE, REPORT_FILE), args.overwrite)
        config = recipe_config(args.recipe, args.overrides, args.output_dir.resolve(), args.split)
        views, _, reference, corrupter = inspect_pairs(config, args.num_pairs, args.split)
    except (InspectError, ValueError) as error:
        print(f"tpo-plugin inspect: {error}", file=sys.stderr)
        return 2

    from .token_report import image_data_uri, report_html, terminal_view

    args.output_dir.mkdir(parents=True, exist_ok=True)
    with open(args.output_dir / TOKENS_FILE, "w", encoding="utf-8") as file:
        for view in views:
            record = {
                "pair": view["pair"],
                "image": view["image"],
                "video": view["video"],
                "question": view["question"],
            }
            file.write(json.dumps({**record, "chosen": view["chosen"], "rejected": view["rejected"]}) + "\n")
    notes = [
        f"Recipe {args.recipe} {' '.join(args.overrides)}, {args.split} split, first {len(views)} pairs; corruption "
        f"{config.get('tpo_corruption', 'diffusion')}, noise of an evaluation step. Reference model: {reference}.",
    ]
    images = {view["pair"]: [image_data_uri(path) for path in view["image"]] for view in views}
    videos = {
        view["pair"]: [
            (
                [image_data_uri(frame, FRAME_SIZE) for frame in clean],
                [image_data_uri(frame, FRAME_SIZE) for frame in noisy],
            )
            for clean, noisy in frame_strips(corrupter, view["video"])
        ]
        for view in views
        if view["video"]
    }
    page = report_html(views, "What TPO weights", notes, images, videos)
    (args.output_dir / REPORT_FILE).write_text(page, encoding="utf-8")
    colour = sys.stdout.isatty() and "NO_COLOR" not in os.environ
    print(terminal_view(views, colour))
    print(f"Reference model: {reference}.\nWrote {args.output_dir / TOKENS_FILE} and {args.output_dir / REPORT_FILE}.")
    return 0


def run_history(args: argparse.Namespace) -> int:
    from ..training.diagnostics.token_view import TOKENS_LOG_FILE
    from .token_report import history_html, read_token_log, records_of_the_current_run

    source = args.history if args.history.is_file() else args.history / TOKENS_LOG_FILE
    if not source.is_file():
        raise InspectError(f"{source} does not exist; train with `tpo_log_tokens: N` (N >= 1) to write it.")
    output_dir = args.output_dir or source.parent
    check_output_dir(output_dir, (HISTORY_FILE,), args.overwrite)
    logged, unreadable = read_token_log(source.read_text(encoding="utf-8", errors="replace"))
    skipped = [f"Line {n} of {source} holds no token record (cut off by a crash?): left out." for n in unreadable]
    if not logged:
        raise InspectError(" ".join(skipped) or f"{source} is empty: no logging step has written to it yet.")
    records = records_of_the_current_run(logged)
    steps = sorted({record["step"] for record in records})
    about = [f"The run that wrote {source}: {len(steps)} logged steps ({steps[0]}..{steps[-1]})."]
    if len(records) < len(logged):
        about.append(f"Left out: {len(logged) - len(records)} records of steps that a resume trained again.")
    earlier = sorted(path.name for path in source.parent.glob("tpo_tokens.*.jsonl"))  # set aside by later runs
    if earlier and source.name == TOKENS_LOG_FILE:
        about.append(f"Earlier runs in {source.parent}, not shown here: {', '.join(earlier)}.")
    output_dir.mkdir(parents=True, exist_ok=True)
    page = history_html(records, f"TPO weights over training: {source}", about + skipped)
    (output_dir / HISTORY_FILE).write_text(page, encoding="utf-8")
    for note in skipped:
        print(f"tpo-plugin inspect: {note}", file=sys.stderr)
    print(f"Wrote {output_dir / HISTORY_FILE}. {' '.join(about)}")
    return 0
