"""Check the run's data and template before the model is loaded, naming the dataset, sample and field of each problem.

LLaMA-Factory finds some of these problems only while it tokenises (with a traceback that names no
sample) and others not at all: a missing image file surfaces in the middle of training, an empty answer
trains silently. The checks run on the datasets as LLaMA-Factory has aligned them (``_prompt``,
``_response``, ``_images``), so paths are the ones training would open.
"""

import json
import os
import re
from io import BytesIO
from typing import TYPE_CHECKING, Any, Optional

from datasets import Features, Sequence, Value
from llamafactory.extras import logging
from llamafactory.extras.constants import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from PIL import Image

from ...integration.internals import aligned_datasets, dataset_attributes, kept_lengths, video_frame_loader
from ..batch.image_modes import mode_problem
from .families import video_refusal


if TYPE_CHECKING:
    from datasets import Dataset
    from llamafactory.hparams import DataArguments, ModelArguments


logger = logging.get_logger("llamafactory.train.tpo")


MAX_REPORTED_PROBLEMS = 10
# Above this share of pairs with identical answers the data is taken for a mistake (e.g. a column mapped twice):
# such a pair carries no preference, yet TPO's asymmetric token weights (chosen a + s, rejected a + 1 - s) give
# it a positive margin and a non-zero gradient, so most of the training signal would be an artefact.
MAX_IDENTICAL_SHARE = 0.5
MEMORY_ADDRESS = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")  # PIL names the BytesIO it could not read


def decoded_image(image: Any, media_dir: str = "") -> tuple[Optional[Image.Image], Optional[str]]:
    """An image entry decoded, with ``None`` as the problem; or ``None`` and why it cannot be used (it must open,
    decode in full and have a usable mode)."""
    try:
        if isinstance(image, str):
            if os.path.isdir(image) or os.path.isdir(os.path.join(media_dir, image)):
                return None, f"image `{image}` is a directory, not an image file"
            if not os.path.isfile(image):
                where = (
                    ""
                    if os.path.isabs(image)
                    else " (relative paths are looked up in `media_dir`, default `dataset_dir`)"
                )
                return None, f"image `{image}` does not exist{where}"
            source = image
        elif isinstance(image, dict) and image.get("bytes") is not None:
            source = BytesIO(image["bytes"])
        elif isinstance(image, dict) and image.get("path"):
            return decoded_image(image["path"], media_dir)
        elif isinstance(image, Image.Image):
            return image, _named_mode_problem(image, "<image object>")
        else:
            return None, f"image entry of type {type(image).__name__} is neither a path nor image bytes"

        with Image.open(source) as opened:
            opened.verify()
        with Image.open(source) as opened:  # verify() leaves the image unusable; decoding needs a fresh one
            opened.load()  # verify() reads no pixels: a truncated file passes it and fails only in training
            problem = _named_mode_problem(opened, image if isinstance(image, str) else "<bytes>")
            return (None if problem else opened), problem
    except Exception as error:  # PIL raises many kinds; each means the same to the user
        reason = MEMORY_ADDRESS.sub("", str(error))
        return None, f"image `{image if isinstance(image, str) else '<bytes>'}` cannot be decoded ({reason})"


def _named_mode_problem(image: Image.Image, name: str) -> str | None:
    problem = mode_problem(image)
    return f"image `{name}` {problem}" if problem else None


def pair_problems(
    row: dict[str, Any],
    image_placeholder: str = "<image>",
    video_placeholder: str = "<video>",
    video_refusal: Optional[str] = None,
) -> list[str]:
    """Problems of one aligned preference sample's fields (its images and videos are checked as they are decoded).

    ``video_refusal`` says why the run's template trains no video pairs (``None``: it trains them).
    """
    problems = []
    audios, videos = row.get("_audios") or [], row.get("_videos") or []
    if audios:
        problems.append(
            f"has {len(audios)} audio(s) (`{audios[0]}`): stage tpo corrupts images and video frames only, so the "
            "audio would train uncorrupted; remove the audio pairs or train them with `stage: dpo`"
        )
    if videos and video_refusal:
        problems.append(f"has {len(videos)} video(s) (`{videos[0]}`): {video_refusal}")
    responses = row.get("_response") or []
    if len(responses) != 2 or not row.get("_prompt"):
        problems.append("is not a prompt with a chosen and a rejected answer (check its roles and turn order)")
    for side, response in zip(("chosen", "rejected"), responses, strict=False):
        if not str(response.get("content", "")).strip():
            problems.append(f"field `{side}` is empty")

    for placeholder, kind in ((image_placeholder, "images"), (video_placeholder, "videos")):
        for side, response in zip(("chosen", "rejected"), responses, strict=False):
            if placeholder in str(response.get("content", "")):
                problems.append(
                    f"field `{side}` holds an {placeholder} placeholder: {kind} belong in the prompt, the answers "
                    "are text"
                )

    for placeholder, media, kind in (
        (image_placeholder, row.get("_images") or [], "image"),
        (video_placeholder, videos, "video"),
    ):
        placeholders = sum(str(message.get("content", "")).count(placeholder) for message in row.get("_prompt") or [])
        if placeholders != len(media):
            problems.append(f"has {placeholders} {placeholder} placeholder(s) but {len(media)} {kind}(s)")
    return problems


def identical_answers(row: dict[str, Any]) -> bool:
    """Chosen and rejected answers are the same text (empty answers are reported as problems instead)."""
    answers = [str(response.get("content", "")).strip() for response in row.get("_response") or []]
    return len(answers) == 2 and answers[0] == answers[1] != ""


class VisualTokenBudget:
    """Whether a sample's image and video tokens survive LLaMA-Factory's truncation to ``cutoff_len``.

    LLaMA-Factory's ``PairwiseDatasetProcessor._encode_data_example`` (0.9.5) expands the images and videos into
    tokens with ``mm_plugin.process_messages`` (after ``_regularize_images``, so ``image_max_pixels`` counts; a
    video's frames after its frame sampling), then keeps the first ``kept_lengths(...)[0]`` prompt tokens: a cut
    through the image or video tokens crashes only once the model runs. This repeats that encoding, without the
    model. It also decodes videos as the collator will (:meth:`video_problem`).
    """

    def __init__(self, template: Any, tokenizer: Any, processor: Any, cutoff_len: int):
        self.template, self.tokenizer, self.processor, self.cutoff_len = template, tokenizer, processor, cutoff_len
        mm_plugin = template.mm_plugin
        tokens = [mm_plugin.image_token] + ([mm_plugin.video_token] if mm_plugin.video_token else [])
        self.visual_token_ids = {tokenizer.convert_tokens_to_ids(token) for token in tokens}

    def video_problem(self, video: Any) -> str | None:
        """Why ``video`` cannot be used (missing, not a file, undecodable, no frames), or ``None``."""
        if isinstance(video, str):
            if os.path.isdir(video):
                return f"video `{video}` is a directory, not a video file"
            if not os.path.isfile(video):
                where = (
                    ""
                    if os.path.isabs(video)
                    else " (relative paths are looked up in `media_dir`, default `dataset_dir`)"
                )
                return f"video `{video}` does not exist{where}"
        try:
            (frames,) = video_frame_loader(self.template.mm_plugin, self.processor)([video])
        except Exception as error:  # PyAV and PIL raise many kinds; each means the same to the user
            return f"video `{video}` cannot be decoded ({MEMORY_ADDRESS.sub('', str(error))})"
        return None if frames else f"video `{video}` has no frames"

    def problem(self, row: dict[str, Any], images: list[Image.Image], videos: list[Any]) -> str | None:
        """Why the sample's ``images`` (decoded) and ``videos`` would be cut by the truncation, or ``None``."""
        if not images and not videos:
            return None
        prompt_ids, answer_len = self._encode(row, images, videos)
        positions = [index for index, token in enumerate(prompt_ids) if token in self.visual_token_ids]
        needed = positions[-1] + 1 if positions else 0
        kept, _ = kept_lengths(len(prompt_ids), answer_len, self.cutoff_len)
        if kept >= needed:
            return None
        enough = next(
            cutoff
            for cutoff in range(self.cutoff_len + 1, len(prompt_ids) + answer_len + 1)
            if kept_lengths(len(prompt_ids), answer_len, cutoff)[0] >= needed
        )
        counts = [f"{len(media)} {kind}(s)" for kind, media in (("image", images), ("video", videos)) if media]
        kinds = " and ".join(kind for kind, media in (("image", images), ("video", videos)) if media)
        fewer = " or ".join(
            [
                *(["`image_max_pixels`"] if images else []),
                *(["`video_max_pixels` or `video_maxlen`"] if videos else []),
            ]
        )
        return (
            f"needs {len(positions)} {kinds} tokens for its {' and '.join(counts)} in a prompt of {len(prompt_ids)} "
            f"tokens (longest answer {answer_len}), but `cutoff_len: {self.cutoff_len}` keeps only {kept} prompt "
            f"tokens and would cut through the {kinds} tokens; set `cutoff_len: {enough}` or more, or lower {fewer} "
            f"(fewer tokens per {kinds.replace(' and ', ' or ')})"
        )

    def _encode(self, row: dict[str, Any], images: list[Image.Image], videos: list[Any]) -> tuple[list[int], int]:
        """The prompt's token ids with images and videos expanded, and the longer answer's length, as LLaMA-Factory
        encodes."""
        mm_plugin, answer_lens = self.template.mm_plugin, []
        # Only the prompt holds placeholders (pair_problems refuses them in answers), so its expansion, the costly
        # part that runs the image processor, is the same for both answers: done once.
        first = row["_prompt"] + row["_response"][:1]
        prompt = mm_plugin.process_messages(first, images, videos, [], self.processor)[:-1]
        for response in row["_response"][:2]:
            prompt_ids, answer_ids = self.template.encode_oneturn(
                self.tokenizer, prompt + [response], row.get("_system"), row.get("_tools")
            )
            answer_lens.append(len(answer_ids) + bool(self.template.efficient_eos))
        prompt_ids, _ = mm_plugin.process_token_ids(
            prompt_ids, None, images, videos, [], self.tokenizer, self.processor
        )
        return prompt_ids, max(answer_lens)


def pair_findings(
    row: dict[str, Any],
    image_placeholder: str,
    media_dir: str,
    token_budget: Optional[VisualTokenBudget],
    video_placeholder: str = "<video>",
    video_refusal: Optional[str] = None,
) -> dict[str, Any]:
    """What the checks find in one aligned sample: its problems, whether its answers are identical, whether it
    has an image or a video."""
    problems = pair_problems(row, image_placeholder, video_placeholder, video_refusal)
    decoded = [decoded_image(image, media_dir) for image in row.get("_images") or []]
    problems += [problem for _, problem in decoded if problem]
    videos = row.get("_videos") or []
    if token_budget is not None and not problems:
        problems += [problem for video in videos if (problem := token_budget.video_problem(video))]
    if not problems and token_budget is not None:  # encoding needs readable, matching images and videos
        problems = [
            problem for problem in [token_budget.problem(row, [image for image, _ in decoded], videos)] if problem
        ]
    visual = bool(row.get("_images")) or bool(videos)
    return {"problems": problems, "identical": identical_answers(row), "has_visual": visual}


FINDINGS = Features({"problems": Sequence(Value("string")), "identical": Value("bool"), "has_visual": Value("bool")})


def check_preference_data(
    datasets: dict[str, "Dataset"],
    image_placeholder: str = "<image>",
    media_dir: str = "",
    token_budget: Optional[VisualTokenBudget] = None,
    num_workers: Optional[int] = None,
    video_placeholder: str = "<video>",
    video_refusal: Optional[str] = None,
) -> tuple[int, int, list[str]]:
    """Raise one ``ValueError`` listing the problems of all samples; return (pairs, pairs without image or video,
    the samples whose answers are identical).

    ``datasets`` maps each dataset name to its aligned rows. The samples are checked as LLaMA-Factory tokenises
    them, with ``Dataset.map`` on ``num_workers`` processes (``preprocessing_num_workers``) and a progress bar:
    decoding every image and video and expanding it into tokens is as much work as the tokenising itself.
    """
    problems, num_pairs, without_visual, identical = [], 0, 0, []
    for name, dataset in datasets.items():
        findings = dataset.map(
            pair_findings,
            fn_kwargs={
                "image_placeholder": image_placeholder,
                "media_dir": media_dir,
                "token_budget": token_budget,
                "video_placeholder": video_placeholder,
                "video_refusal": video_refusal,
            },
            remove_columns=dataset.column_names,
            features=FINDINGS,
            num_proc=num_workers,
            keep_in_memory=True,  # findings are small, and never reused: nothing goes to the datasets cache
            load_from_cache_file=False,
            new_fingerprint=f"tpo-checks-{dataset._fingerprint}",
            desc=f"Checking the preference pairs of {name}",
        )
        for index, finding in enumerate(findings):
            num_pairs += 1
            without_visual += not finding["has_visual"]
            sample = f"dataset `{name}`, sample {index}"
            if finding["identical"]:
                identical.append(sample)
            problems.extend(f"{sample}: {problem}" for problem in finding["problems"])

    if problems:
        count = len(problems)
        raise ValueError(f"The preference data has {count} problem(s); fix them before training:{_listed(problems)}")
    return num_pairs, without_visual, identical


def _listed(items: list[str]) -> str:
    """The first few items, one a line, and how many more there are."""
    shown = "".join(f"\n  {item}" for item in items[:MAX_REPORTED_PROBLEMS])
    more = len(items) - MAX_REPORTED_PROBLEMS
    return shown + (f"\n  ... and {more} more" if more > 0 else "")


def check_identical_answers(identical: list[str], num_pairs: int, split: str) -> None:
    """Warn about pairs whose answers are the same; refuse when they are more than MAX_IDENTICAL_SHARE."""
    if not identical:
        return
    why = (
        f"{len(identical)} of {num_pairs} {split} pairs have the same chosen and rejected answer. Such a pair "
        "states no preference, but TPO's asymmetric token weights (chosen a + s, rejected a + 1 - s) still give it "
        "a positive margin and a non-zero gradient, so it trains on an artefact of the weights"
    )
    if len(identical) > MAX_IDENTICAL_SHARE * num_pairs:
        raise ValueError(
            f"{why}. More than {MAX_IDENTICAL_SHARE:.0%} such pairs means the data is wrong (e.g. `chosen` and "
            f"`rejected` mapped to the same column in dataset_info.json); fix or remove them:{_listed(identical)}"
        )
    logger.warning_rank0(f"{why}; remove them unless that is intended:{_listed(identical)}")


def dataset_file_problems(data_args: "DataArguments") -> list[str]:
    """Local JSON / JSON-lines dataset files that LLaMA-Factory's loader would fail on, with the reason."""
    problems = []
    for names in (data_args.dataset, data_args.eval_dataset):
        for name, attr in zip(names or [], dataset_attributes(names, data_args.dataset_dir), strict=True):
            if attr.load_from != "file":
                continue
            path = os.path.join(data_args.dataset_dir, attr.dataset_name)
            files = sorted(os.path.join(path, file) for file in os.listdir(path)) if os.path.isdir(path) else [path]
            for file in files:
                problem = json_file_problem(file) if file.endswith((".json", ".jsonl")) else None
                if problem:
                    problems.append(f"dataset `{name}`, file `{file}`: {problem}")
    return problems


def json_file_problem(path: str) -> str | None:
    """Why a JSON (a list of samples, or JSON lines, which LLaMA-Factory also reads) file holds no samples."""
    if not os.path.isfile(path):
        return "does not exist"
    with open(path, encoding="utf-8", errors="replace") as file:
        text = file.read()
    if not text.strip():
        return "is empty"
    try:
        samples = json.loads(text)
    except RecursionError:
        return "is nested too deeply to read as samples (a sample is one object of strings, lists and objects)"
    except json.JSONDecodeError as error:
        samples = _json_lines(text)
        if samples is None:
            ends_early = error.pos >= len(text.rstrip()) or error.msg.startswith("Unterminated")
            cut = " (the file ends early: truncated?)" if ends_early else ""
            return f"is not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}{cut}"
    if isinstance(samples, dict):  # a table of columns: datasets reads that too
        return None
    if not isinstance(samples, list):
        return f"holds a JSON {type(samples).__name__}, not a list of samples"
    if not samples:
        return "is an empty list: it holds no samples"
    not_objects = [index for index, sample in enumerate(samples) if not isinstance(sample, dict)]
    if not_objects:
        first = not_objects[0]
        return (
            f"{len(not_objects)} sample(s) are not JSON objects, the first is sample {first} "
            f"(a {type(samples[first]).__name__})"
        )
    return None


def _json_lines(text: str) -> list[Any] | None:
    """The samples of a JSON-lines text, or ``None`` if a line is not JSON."""
    try:
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except (json.JSONDecodeError, RecursionError):
        return None


def check_data_arguments(data_args: "DataArguments") -> None:
    """Data options stage tpo cannot train with, refused before anything loads; then the datasets' kind."""
    if data_args.streaming:
        raise ValueError(
            "`streaming: true` is not supported by stage tpo: its checks read every pair before training, and "
            "LLaMA-Factory's pairwise data does not stream (stage dpo fails on it with StopIteration). Set "
            "`streaming: false`; `preprocessing_num_workers` and `max_samples` keep large datasets manageable."
        )
    if data_args.packing:  # LLaMA-Factory refuses neat_packing outside SFT itself
        raise ValueError(
            "`packing: true` is not supported by stage tpo: a preference pair is a chosen and a rejected sequence "
            "that must stay apart, and LLaMA-Factory's pairwise data ignores packing silently. Remove `packing`."
        )
    check_ranking_datasets(data_args)


def check_ranking_datasets(data_args: "DataArguments") -> None:
    """TPO trains on preference pairs: every dataset must be marked ``"ranking": true``."""
    for names in (data_args.dataset, data_args.eval_dataset):
        for name, dataset_attr in zip(names or [], dataset_attributes(names, data_args.dataset_dir), strict=True):
            if not dataset_attr.ranking:
                raise ValueError(
                    f"Dataset `{name}` ({dataset_attr}) is not a ranking (preference) dataset, but stage tpo "
                    'trains on chosen/rejected pairs: mark it `"ranking": true` in '
                    f"{data_args.dataset_dir}/dataset_info.json and give it `chosen` and `rejected` columns."
                )


def check_image_template(template: Any, template_name: Optional[str]) -> None:
    """TPO corrupts images, so the template's multimodal plugin must turn images into model inputs."""
    if template.mm_plugin.image_token is None:
        raise ValueError(
            f"Template `{template_name}` has no multimodal plugin for images, but stage tpo needs one; "
            "use the vision-language template of your model (e.g. qwen2_vl, qwen2_5_vl, qwen3_vl, llava, intern_vl)."
        )


def check_pairs(
    template: Any,
    tokenizer_module: dict[str, Any],
    model_args: "ModelArguments",
    data_args: "DataArguments",
    training_args: Any,
) -> None:
    """Refuse unreadable dataset files, bad samples (named) and training data without images or videos; pairs
    without either train as DPO pairs (weight 1)."""
    if getattr(model_args, "use_audio_in_video", False):
        raise ValueError(
            "`use_audio_in_video: true` is not supported by stage tpo: it corrupts video frames, not their audio, "
            "so the audio would train uncorrupted. Remove `use_audio_in_video`."
        )
    file_problems = dataset_file_problems(data_args)
    if file_problems:
        raise ValueError(f"{len(file_problems)} dataset file(s) cannot be read as samples:{_listed(file_problems)}")

    token_budget = VisualTokenBudget(
        template, tokenizer_module["tokenizer"], tokenizer_module["processor"], data_args.cutoff_len
    )
    for split, names in (("training", data_args.dataset), ("evaluation", data_args.eval_dataset)):
        datasets = aligned_datasets(names, model_args, data_args, training_args)
        num_pairs, without_visual, identical = check_preference_data(
            datasets,
            IMAGE_PLACEHOLDER,
            data_args.media_dir,
            token_budget,
            data_args.preprocessing_num_workers,
            VIDEO_PLACEHOLDER,
            video_refusal(data_args.template, template),
        )
        check_identical_answers(identical, num_pairs, split)
        if split == "training" and num_pairs and without_visual == num_pairs:
            raise ValueError(
                "No training pair has an image or a video, but stage tpo weights tokens by how much they depend on "
                "them; check the `images` and `videos` columns of the dataset, or train with `stage: dpo`."
            )
        if without_visual:
            logger.warning_rank0(
                f"{without_visual} of {num_pairs} {split} pairs have no image or video; "
                "they train as plain DPO pairs (weight 1)."
            )
