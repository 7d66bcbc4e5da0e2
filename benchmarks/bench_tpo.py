"""TPO against LLaMA-Factory's own DPO on the same model, data and settings: step time, peak memory, pairs/s.

For each configuration (``--config lora``, ``full`` or ``lora,full``) the harness trains each variant in
its own process through ``llamafactory-cli train``'s entry point (``llamafactory.cli.main``, started by
:mod:`bench_child`), one after another and ``--repeats`` times in that order, so that drift hits every
variant alike:

- ``dpo``: ``stage: dpo``, LLaMA-Factory's own trainer (the baseline);
- ``tpo``: ``stage: tpo``, the plugin's trainer with its defaults;
- ``tpo_detach``: ``stage: tpo`` with ``tpo_detach_reward: true``;
- ``tpo_precompute`` (and ``tpo_detach_precompute``): ``tpo_precompute_ref: true`` with ``tpo_noise_per:
  sample``: the reference's scores of every trained pair computed once before step 1 (the one-off cost is
  the "s before step 1" column), no reference forward in the steps;
- ``tpo_reference_structure``: ``stage: tpo`` computed with the reference code's structure
  (:mod:`reference_structure`: 8 separate forwards, float32 full-vocabulary log-softmax), the same losses;
- opt-in (only through ``--variants``), mDPO's visual-grounding terms (docs/method.md §11): ``tpo_conditional``
  (``tpo_conditional_weight: 1.0``), ``tpo_anchor`` (``tpo_anchor_weight: 1.0``), ``tpo_both_terms`` (both),
  ``mdpo`` (``tpo_reward_on: none`` and both terms) and ``dpo_like`` (``tpo_reward_on: none`` alone).

Every child also counts its forwards per optimizer step (:class:`ForwardCounter`: calls of the language model, their
rows and those with a graph, and the vision tower's calls and images), reported in the JSON as
``forwards_per_step``; with a grounding variant in the run the table shows them, with the ratios to TPO.

It reports per variant the median step time after ``--warmup-steps`` (CUDA-synchronised), the median
wall time per step (batch loading and logging included), pairs/s, and peak memory (CUDA peak allocated
on a GPU, peak RSS of the training process on a CPU), with the ratios to DPO and reference
structure / TPO, as a Markdown table per configuration and as one JSON line starting with
``{"benchmark": "tpo_vs_dpo"``. It also checks that the reference-structure trainer logs the same loss,
gradient norm and metrics as the plugin's trainer in the first two steps.

    python benchmarks/bench_tpo.py --device cpu                      # tiny test model, ~1-2 min on 2 cores
    python benchmarks/bench_tpo.py --device cuda --config lora       # Qwen2-VL-2B shape, 448x448, bf16
    python benchmarks/bench_tpo.py --device cpu --model qwen2-vl-2b-mini --image-size 448 \\
        --answer-tokens 180 --precision bf16                         # the GPU code path, scaled down, on a CPU
    python benchmarks/bench_tpo.py --device cpu --model qwen2-vl-2b-narrow --image-size 448 \\
        --answer-tokens 180 --threads 2 --warmup-steps 1 --measured-steps 3  # the GPU arithmetic / 64, ~8 min
    python benchmarks/bench_tpo.py --device cpu --image-size 448 --loader-workers 1  # collation off the step
    python benchmarks/bench_tpo.py --device cpu --media video --variants dpo,tpo     # video pairs, ~1 min
    python benchmarks/bench_tpo.py --device cpu --threads 1 --warmup-steps 2 --measured-steps 6 --repeats 2 \
        --variants dpo,tpo,tpo_conditional,tpo_anchor,tpo_both_terms,mdpo,dpo_like  # grounding terms, ~5 min

``--media video`` trains on video pairs instead: one video per pair of ``--video-frames`` frames (default 8) at
``--image-size`` pixels, written with PyAV (PNG frames in a QuickTime file, the pair's image shifted a little
each frame) at LLaMA-Factory's default ``video_fps`` of 2 frames a second, so that its frame sampling passes every
frame to the model. Before training, it also times in this process what stage tpo's collator does per video in
the loader's workers (``ImageCorrupter.load_videos``: decode, sample and resize; ``corrupted_frames``: the noise)
over the benchmark's videos, and reports frames/s of each.

Everything is built locally (random weights, a locally trained tokenizer, PIL images): nothing is downloaded.
"""

import argparse
import datetime
import hashlib
import json
import os
import pathlib
import platform
import random
import signal
import statistics
import subprocess
import sys
import time
from importlib import metadata
from typing import Any, Optional

import yaml


BENCH_DIR = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from bench_child import REFERENCE_STRUCTURE, RESULT_ENV, TRAINER_ENV  # noqa: E402

from tpo_plugin.testing.tiny_models import OFFLINE_ENV  # noqa: E402


# variant -> (recipe keys on top of the common ones, trainer swapped in by bench_child)
VARIANTS = {
    "dpo": ({"stage": "dpo"}, ""),
    "tpo": ({"stage": "tpo"}, ""),
    "tpo_detach": ({"stage": "tpo", "tpo_detach_reward": True}, ""),
    "tpo_precompute": ({"stage": "tpo", "tpo_noise_per": "sample", "tpo_precompute_ref": True}, ""),
    "tpo_detach_precompute": (
        {"stage": "tpo", "tpo_noise_per": "sample", "tpo_precompute_ref": True, "tpo_detach_reward": True},
        "",
    ),
    "tpo_reference_structure": ({"stage": "tpo"}, REFERENCE_STRUCTURE),
}
DEFAULT_VARIANTS = tuple(VARIANTS)  # the run without --variants: the grounding variants below are opt-in
# mDPO's visual-grounding terms (docs/method.md §11, issue #39): each should cost what TPO costs, and tpo_reward_on:
# none without the conditional term what DPO costs (no corrupted pass at all).
GROUNDING_VARIANTS = {
    "tpo_conditional": ({"stage": "tpo", "tpo_conditional_weight": 1.0}, ""),
    "tpo_anchor": ({"stage": "tpo", "tpo_anchor_weight": 1.0}, ""),
    "tpo_both_terms": ({"stage": "tpo", "tpo_conditional_weight": 1.0, "tpo_anchor_weight": 1.0}, ""),
    "mdpo": ({"stage": "tpo", "tpo_reward_on": "none", "tpo_conditional_weight": 1.0, "tpo_anchor_weight": 1.0}, ""),
    "dpo_like": ({"stage": "tpo", "tpo_reward_on": "none"}, ""),
}
VARIANTS.update(GROUNDING_VARIANTS)
FORWARDS_FILE = "forwards.json"  # written by the child's ForwardCounter next to bench_child's result.json
CONFIGS = ("lora", "full")
MODELS = ("tiny", "qwen2-vl-2b", "qwen2-vl-2b-narrow", "qwen2-vl-2b-mini")
DEVICE_DEFAULTS = {
    "cpu": {
        "model": "tiny",
        "image_size": 112,
        "answer_tokens": 64,
        "warmup_steps": 3,
        "measured_steps": 8,
        "precision": "fp32",
        "threads": 1,  # on a shared CPU, one thread per run keeps the timings from collapsing under contention
    },
    "cuda": {
        "model": "qwen2-vl-2b",
        "image_size": 448,
        "answer_tokens": 180,
        "warmup_steps": 3,
        "measured_steps": 10,
        "precision": "bf16",
        "threads": 0,
    },
}
# Logged values of the first two steps that the reference-structure trainer must reproduce; not
# rewards/accuracies, a fraction of pairs that rounding can flip while a margin is still near 0, nor
# tpo/weight_term_share, a ratio whose log-probability part is, at step 2, a margin of ~5e-3 left from sums of
# log-probabilities in the hundreds, whose float32 rounding (~1e-5 each) moves the share by several 1e-5
# (measured 4.3e-5 on one CPU, below 1e-5 on another); the margins themselves are checked.
UNCHECKED_LOG_KEYS = ("tpo/weight_term_share",)
CHECKED_LOG_PREFIXES = (
    "loss",
    "grad_norm",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "logps/",
    "logits/",
    "tpo/",
)
PAIR_COLUMNS = {"messages": "conversations", "chosen": "chosen", "rejected": "rejected", "images": "images"}
VIDEO_PAIR_COLUMNS = {"messages": "conversations", "chosen": "chosen", "rejected": "rejected", "videos": "videos"}
# LLaMA-Factory's default `video_fps`: it samples floor(duration x 2) frames of a video. The benchmark's videos are
# written at this rate, so every frame of a file reaches the model (measured and reported, not assumed).
VIDEO_FPS = 2
COLOURS = ["red", "green", "blue", "yellow", "orange", "purple", "pink", "brown", "black"]
FILLER = [
    "The {colour} {obj} is in the middle of the picture.",
    "There is nothing else in the picture.",
    "The background is plain and light.",
    "I can see one {colour} {obj} and nothing else.",
    "The picture is small.",
    "It is a {colour} {obj}.",
]
QUESTIONS = ["What is in the picture?", "Describe the image.", "What colour is it?", "What shape do you see?"]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=sorted(DEVICE_DEFAULTS), default="cpu")
    parser.add_argument("--config", default="lora", help="lora, full, or both comma-separated (default: lora)")
    parser.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help=f"comma-separated variants (default: {','.join(DEFAULT_VARIANTS)}; also {','.join(GROUNDING_VARIANTS)})",
    )
    parser.add_argument("--model", choices=MODELS, help="tiny (CPU default), qwen2-vl-2b (GPU default) or a scaling")
    parser.add_argument("--image-size", type=int, help="square image side in pixels (CPU 112, GPU 448)")
    parser.add_argument(
        "--media", choices=["image", "video"], default="image", help="one image or one video per pair (default image)"
    )
    parser.add_argument("--video-frames", type=int, default=8, help="frames per video with --media video (default 8)")
    parser.add_argument("--answer-tokens", type=int, help="approximate tokens per answer (CPU 64, GPU 180)")
    parser.add_argument("--question-tokens", type=int, default=20, help="approximate tokens per question")
    parser.add_argument("--batch-pairs", type=int, default=4, help="preference pairs per step")
    parser.add_argument("--warmup-steps", type=int, help="steps left out of the medians (default 3)")
    parser.add_argument("--measured-steps", type=int, help="steps measured after warm-up (CPU 8, GPU 10)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds over all variants, alternating them")
    parser.add_argument("--precision", choices=["fp32", "bf16"], help="CPU fp32, GPU bf16")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the runs, 0: torch's default (CPU: 1, GPU: 0)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--loader-workers", type=int, default=0, help="dataloader_num_workers of every variant (default 0)"
    )
    parser.add_argument("--work-dir", default="saves/bench_tpo", help="model, data, runs and logs")
    parser.add_argument("--output", help="also write the results JSON here (rewritten after every run)")
    parser.add_argument("--child-timeout", type=float, default=900, help="seconds one training run may take")
    args = parser.parse_args(argv)
    for key, value in DEVICE_DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    args.configs = [name.strip() for name in args.config.split(",") if name.strip()]
    args.variant_names = [name.strip() for name in args.variants.split(",") if name.strip()]
    for name in args.configs:
        if name not in CONFIGS:
            parser.error(f"--config {name!r}: expected one of {', '.join(CONFIGS)}")
    for name in args.variant_names:
        if name not in VARIANTS:
            parser.error(f"--variants {name!r}: expected some of {', '.join(VARIANTS)}")
    if args.warmup_steps < 0 or args.measured_steps < 1 or args.repeats < 1:
        parser.error("--warmup-steps must be >= 0, --measured-steps and --repeats >= 1")
    if args.video_frames < 1:
        parser.error("--video-frames must be >= 1")
    return args


def build_model(args: argparse.Namespace, work_dir: pathlib.Path) -> pathlib.Path:
    """The model directory: tiny_models' Qwen2-VL, or a Qwen2-VL-2B-shaped one built in a child process."""
    if args.model == "tiny":
        from tpo_plugin.testing.tiny_models import build_tiny_model

        return build_tiny_model("qwen2_vl", work_dir / "model-tiny", seed=0)

    model_dir = work_dir / f"model-{args.model}-{args.precision}"
    dtype = "bfloat16" if args.precision == "bf16" else "float32"
    command = [sys.executable, str(BENCH_DIR / "models.py"), str(model_dir), "--shape", args.model]
    command += ["--device", args.device, "--dtype", dtype]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **OFFLINE_ENV})
    if result.returncode != 0:
        raise RuntimeError(f"Building {args.model} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    log(f"model {args.model}: {result.stdout.strip().splitlines()[-1]}")
    return model_dir


def text_of_tokens(tokenizer: Any, sentences: list[str], tokens: int) -> str:
    """Sentences joined until the text is at least ``tokens`` tokens long."""
    text = ""
    for sentence in sentences:
        text = f"{text} {sentence}".strip()
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) >= tokens:
            break
    return text


def write_video(path: pathlib.Path, image_path: pathlib.Path, frames: int) -> pathlib.Path:
    """A video of ``frames`` PNG frames in a QuickTime file at VIDEO_FPS (lossless, as tests/test_video.py writes
    them): the image, shifted right by a few pixels more in each frame (wrapping round), so the frames differ."""
    import av
    from PIL import Image, ImageChops

    image = Image.open(image_path).convert("RGB")
    container = av.open(str(path), "w", format="mov")
    stream = container.add_stream("png", rate=VIDEO_FPS)
    stream.width, stream.height = image.size
    stream.pix_fmt = "rgb24"
    shift = max(1, image.width // (4 * frames))
    for index in range(frames):
        frame = ImageChops.offset(image, index * shift, 0)
        for packet in stream.encode(av.VideoFrame.from_image(frame)):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


def write_dataset(args: argparse.Namespace, model_dir: pathlib.Path, data_dir: pathlib.Path) -> dict[str, float]:
    """``bench_pairs``: one image (or, with ``--media video``, one video) per pair, a question and two answers of
    about the configured lengths.

    The rejected answer gives the object the wrong colour and adds a dog, as a hallucination would.
    Returns the mean token counts measured with the model's tokenizer.
    """
    from transformers import AutoTokenizer

    from tpo_plugin.testing.tiny_models import make_demo_images

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    num_pairs = args.batch_pairs * (args.warmup_steps + args.measured_steps)
    rng = random.Random(args.seed)
    images = make_demo_images(data_dir / "images", num_pairs, size=args.image_size, seed=args.seed)
    rows, counts = [], {"question": [], "chosen": [], "rejected": []}
    for image in images:
        _, colour, obj = image.stem.split("-")
        wrong = rng.choice([c for c in COLOURS if c != colour])
        filler = [rng.choice(FILLER).format(colour=colour, obj=obj) for _ in range(4 * args.answer_tokens)]
        texts = {
            "question": text_of_tokens(tokenizer, rng.sample(QUESTIONS, len(QUESTIONS)) * 50, args.question_tokens),
            "chosen": text_of_tokens(tokenizer, [f"The image shows a {colour} {obj}.", *filler], args.answer_tokens),
            "rejected": text_of_tokens(
                tokenizer, [f"The image shows a {wrong} {obj} and a dog.", *filler], args.answer_tokens
            ),
        }
        for key, text in texts.items():
            counts[key].append(len(tokenizer(text, add_special_tokens=False)["input_ids"]))
        if args.media == "video":
            (data_dir / "videos").mkdir(parents=True, exist_ok=True)
            video = write_video(data_dir / "videos" / f"{image.stem}.mov", image, args.video_frames)
            visual = {"videos": [str(video.relative_to(data_dir))]}
        else:
            visual = {"images": [str(image.relative_to(data_dir))]}
        rows.append(
            {
                "conversations": [{"from": "human", "value": f"<{args.media}>" + texts["question"]}],
                "chosen": {"from": "gpt", "value": texts["chosen"]},
                "rejected": {"from": "gpt", "value": texts["rejected"]},
                **visual,
            }
        )
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "bench_pairs.json").write_text(json.dumps(rows, indent=1))
    info = {
        "bench_pairs": {
            "file_name": "bench_pairs.json",
            "formatting": "sharegpt",
            "ranking": True,
            "columns": VIDEO_PAIR_COLUMNS if args.media == "video" else PAIR_COLUMNS,
        }
    }
    (data_dir / "dataset_info.json").write_text(json.dumps(info, indent=1))
    return {f"{key}_tokens": statistics.mean(values) for key, values in counts.items()}


def time_video_corruption(args: argparse.Namespace, model_dir: pathlib.Path, data_dir: pathlib.Path) -> dict:
    """What stage tpo's collator does per video in the loader's workers, timed in this process on the benchmark's
    videos: ``ImageCorrupter.load_videos`` (decode, LLaMA-Factory's frame sampling and resizing) and
    ``corrupted_frames`` (the plugin's default diffusion noise at step 500, keyed by the step as in training).

    The processor is LLaMA-Factory's for the recipe's model with its default video settings (``video_fps`` 2,
    ``video_maxlen`` 128, ``video_max_pixels`` 65536). One untimed call first (imports, caches), then each video
    once. Single process, ``--threads`` threads.
    """
    import torch
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments, ModelArguments
    from llamafactory.model import load_tokenizer

    from tpo_plugin.hparams.tpo_args import TPOArguments
    from tpo_plugin.training.batch.corruption import ImageCorrupter

    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer_module = load_tokenizer(ModelArguments(model_name_or_path=str(model_dir)))
    template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], DataArguments(template="qwen2_vl"))
    defaults = TPOArguments()
    corrupter = ImageCorrupter(
        template,
        tokenizer_module["processor"],
        corruption=defaults.tpo_corruption,
        noise_step=defaults.tpo_noise_step,
        seed=args.seed,
        noise_per=defaults.tpo_noise_per,
    )
    rows = json.loads((data_dir / "bench_pairs.json").read_text())
    videos = [str(data_dir / video) for row in rows for video in row["videos"]]
    corrupter.corrupted_frames(corrupter.load_videos(videos[:1])[0], 0)  # warm-up, untimed
    frames_per_video, frame_sizes, decode_seconds, corrupt_seconds = [], set(), 0.0, 0.0
    for index, video in enumerate(videos):
        start = time.perf_counter()
        (frames,) = corrupter.load_videos([video])
        decoded = time.perf_counter()
        corrupter.corrupted_frames(frames, index // args.batch_pairs)  # the step this pair trains at
        decode_seconds += decoded - start
        corrupt_seconds += time.perf_counter() - decoded
        frames_per_video.append(len(frames))
        frame_sizes.update(frame.size for frame in frames)
    frames = sum(frames_per_video)
    return {
        "videos": len(videos),
        "frames_per_video": sorted(set(frames_per_video)),  # the frames that reach the model
        "frame_sizes": sorted(frame_sizes),
        "decode_sample_resize_frames_per_s": frames / decode_seconds,
        "corruption_frames_per_s": frames / corrupt_seconds,
        "both_frames_per_s": frames / (decode_seconds + corrupt_seconds),
        "ms_per_video": 1000 * (decode_seconds + corrupt_seconds) / len(videos),
        "threads": args.threads or torch.get_num_threads(),
        "video_fps": getattr(tokenizer_module["processor"], "video_fps", None),  # LLaMA-Factory's sampling rate
    }


def recipe(args: argparse.Namespace, config: str, variant: str, model_dir, data_dir, output_dir) -> dict[str, Any]:
    """The ``llamafactory-cli train`` recipe of one run; the variants differ only in the keys of VARIANTS."""
    keys = {
        "model_name_or_path": str(model_dir),
        "do_train": True,
        "finetuning_type": config,
        "dataset": "bench_pairs",
        "dataset_dir": str(data_dir),
        "template": "qwen2_vl",
        "cutoff_len": 4096,
        "output_dir": str(output_dir),
        "overwrite_output_dir": True,
        "per_device_train_batch_size": args.batch_pairs,
        "gradient_accumulation_steps": 1,
        "max_steps": args.warmup_steps + args.measured_steps,
        "learning_rate": 1.0e-5,
        "lr_scheduler_type": "constant",
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "pref_beta": 0.1,
        "seed": args.seed,
        "dataloader_num_workers": args.loader_workers,
        "bf16": args.precision == "bf16",
        **VARIANTS[variant][0],
    }
    if config == "lora":
        keys["lora_target"] = "all"
    if args.device == "cpu":
        keys["use_cpu"] = True  # else transformers refuses bf16 without a GPU
    return keys


def run_variant(args, config: str, variant: str, repeat: int, model_dir, data_dir, work_dir) -> dict[str, Any]:
    """Train one variant in its own process; return what its StepTimer measured, or the error."""
    name = f"{config}-{variant}-r{repeat}"
    run_dir = work_dir / "runs" / name
    run_dir.mkdir(parents=True, exist_ok=True)
    recipe_path, result_path, log_path = run_dir / "recipe.yaml", run_dir / "result.json", run_dir / "train.log"
    recipe_path.write_text(yaml.safe_dump(recipe(args, config, variant, model_dir, data_dir, run_dir / "out")))
    result_path.unlink(missing_ok=True)
    result_path.with_name(FORWARDS_FILE).unlink(missing_ok=True)
    boot = f"import sys; sys.path.insert(0, {str(BENCH_DIR)!r}); import bench_tpo; bench_tpo.child_main()"
    env = {
        **os.environ,
        **OFFLINE_ENV,
        "HF_DATASETS_CACHE": str(work_dir / "hf_datasets_cache"),
        RESULT_ENV: str(result_path),
        TRAINER_ENV: VARIANTS[variant][1],
    }
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    start = time.perf_counter()
    with open(log_path, "w") as log_file:
        try:
            process = subprocess.run(
                [sys.executable, "-c", boot, "train", str(recipe_path)],
                cwd=run_dir,
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                timeout=args.child_timeout,
            )
            error = None if process.returncode == 0 else f"exit code {process.returncode}"
        except subprocess.TimeoutExpired:
            error = f"timed out after {args.child_timeout:.0f} s"
    seconds = time.perf_counter() - start
    if error is None and not result_path.is_file():
        error = "no result written"
    if error is not None:
        tail = log_path.read_text(errors="replace")[-3000:]
        log(f"{name}: FAILED ({error}); log {log_path}:\n{tail}")
        return {"error": error, "log": str(log_path), "process_seconds": seconds}

    result = json.loads(result_path.read_text())
    result["process_seconds"] = seconds
    forwards_path = result_path.with_name(FORWARDS_FILE)
    result["forwards"] = json.loads(forwards_path.read_text()) if forwards_path.is_file() else None
    if VARIANTS[variant][1] == REFERENCE_STRUCTURE and result["trainer"] != "ReferenceStructureTPOTrainer":
        return {"error": f"trained with {result['trainer']}, not the reference structure", "log": str(log_path)}
    steps = result["step_seconds"][args.warmup_steps :]
    log(f"{name}: {statistics.median(steps):.4f} s/step over {len(steps)} steps ({seconds:.0f} s in all)")
    return result


def summarise(args, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One variant's numbers over its repeats: medians over all measured steps, peaks over all runs."""
    failed = [run for run in runs if "error" in run]
    if failed:
        return {"error": "; ".join(run["error"] for run in failed), "logs": [run.get("log") for run in failed]}
    steps = [seconds for run in runs for seconds in run["step_seconds"][args.warmup_steps :]]
    walls = [seconds for run in runs for seconds in run["wall_seconds"][args.warmup_steps :]]
    cuda = "peak_allocated_bytes" in runs[0]
    summary = {
        "s_per_step": statistics.median(steps),
        "wall_s_per_step": statistics.median(walls),
        "s_before_first_step": statistics.median(run["seconds_before_first_step"] for run in runs),
        "pairs_per_s": runs[0]["batch_pairs"] / statistics.median(steps),
        "peak_memory_bytes": max(run["peak_allocated_bytes" if cuda else "peak_rss_bytes"] for run in runs),
        "peak_memory_kind": "cuda_max_allocated" if cuda else "peak_rss",
        "training_rss_growth_bytes": max(run["peak_rss_bytes"] - run["rss_at_train_begin_bytes"] for run in runs),
        "measured_steps": len(steps),
        "s_per_step_per_repeat": [statistics.median(run["step_seconds"][args.warmup_steps :]) for run in runs],
        "trainer": runs[0]["trainer"],
        "first_steps_logs": runs[0]["logs"][:2],
    }
    summary["forwards_per_step"] = forwards_per_step(args, runs)
    if not cuda and all(run["peak_rss_since_train_begin"] for run in runs):
        summary["peak_memory_kind"] = "peak_rss_during_training"  # else: over the whole process
    if cuda:
        summary["peak_reserved_bytes"] = max(run["peak_reserved_bytes"] for run in runs)
        summary["device"] = runs[0]["device"]
    return summary


def forwards_per_step(args, runs: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The counts of :class:`ForwardCounter` over the measured steps of all runs: each count's value if every step
    had the same, else its ``[min, max]``."""
    steps = [step for run in runs if run.get("forwards") for step in run["forwards"][args.warmup_steps :]]
    if not steps:
        return None
    counts = {}
    for key in steps[0]:
        values = sorted({step[key] for step in steps})
        counts[key] = values[0] if len(values) == 1 else [values[0], values[-1]]
    return counts


def ratio(numerator: Optional[dict], denominator: Optional[dict]) -> Optional[dict[str, float]]:
    if not numerator or not denominator or "error" in numerator or "error" in denominator:
        return None
    return {
        "time": numerator["s_per_step"] / denominator["s_per_step"],
        "wall_time": numerator["wall_s_per_step"] / denominator["wall_s_per_step"],
        "memory": numerator["peak_memory_bytes"] / denominator["peak_memory_bytes"],
    }


def reference_structure_check(tpo: Optional[dict], reference: Optional[dict]) -> Optional[dict[str, Any]]:
    """Largest difference of the first logged steps between the plugin's TPO trainer and the reference structure.

    Step 1 checks the forward passes and, through ``grad_norm``, the backward (gradients through the policy's
    token weights included); step 2 then starts from the updated weights, where the rewards are no longer 0.
    A difference is relative to ``max(1, |value|)``: summed log-probabilities are in the hundreds. In fp32
    the two trainers agree to float rounding (< 1e-5); in bf16 a forward over n rows rounds differently
    from one over 4n rows, so expect differences around 1e-3 there.
    """
    if not tpo or not reference or "error" in tpo or "error" in reference:
        return None
    differences = {}
    for first, second in zip(tpo["first_steps_logs"], reference["first_steps_logs"], strict=False):
        checked = (key for key in first if key.startswith(CHECKED_LOG_PREFIXES) and key not in UNCHECKED_LOG_KEYS)
        for key in sorted(key for key in checked if key in second):
            scale = max(1.0, abs(first[key]), abs(second[key]))
            differences[f"step{first['step']}/{key}"] = abs(first[key] - second[key]) / scale
    if not differences:
        return None
    return {"max_rel_diff": max(differences.values()), "rel_diff": differences}


def configuration_result(args, runs: dict[str, list[dict]]) -> dict[str, Any]:
    variants = {name: summarise(args, variant_runs) for name, variant_runs in runs.items() if variant_runs}
    dpo, tpo = variants.get("dpo"), variants.get("tpo")
    ratios = {f"{name}/dpo": ratio(summary, dpo) for name, summary in variants.items() if name != "dpo"}
    ratios["tpo_reference_structure/tpo"] = ratio(variants.get("tpo_reference_structure"), tpo)
    for name in GROUNDING_VARIANTS:
        if name in variants:
            ratios[f"{name}/tpo"] = ratio(variants[name], tpo)
    check = reference_structure_check(tpo, variants.get("tpo_reference_structure"))
    return {"variants": variants, "ratios": ratios, "reference_structure_check": check}


def gib(value: float) -> str:
    return f"{value / 2**30:.2f} GiB"


def markdown_table(config: str, result: dict[str, Any], header: str) -> str:
    variants = result["variants"]
    cuda = any("peak_reserved_bytes" in summary for summary in variants.values())
    memory = "peak allocated (reserved)" if cuda else "peak RSS (growth in training)"
    # With a grounding variant in the run: ratios to TPO and the counted forwards per step as well.
    grounding = any(name in GROUNDING_VARIANTS for name in variants)
    extra_columns = (
        " × DPO wall | × TPO time | × TPO wall | × TPO memory | LM forwards/step (rows; with graph) | "
        "vision tower calls/step (images) |"
        if grounding
        else ""
    )
    lines = [
        f"#### {config}: {header}",
        "",
        f"| variant | s/step (median) | wall s/step | s before step 1 | pairs/s | {memory} | × DPO time | "
        f"× DPO memory |{extra_columns}",
        "|---|---|---|---|---|---|---|---|" + "---|" * extra_columns.count("|"),
    ]
    for name, summary in variants.items():
        if "error" in summary:
            lines.append(f"| {name} | failed: {summary['error']} | | | | | | |" + " |" * extra_columns.count("|"))
            continue
        same = {"time": 1.0, "wall_time": 1.0, "memory": 1.0}
        to_dpo = result["ratios"].get(f"{name}/dpo") or (same if name == "dpo" else None)
        times = f"{to_dpo['time']:.2f}×" if to_dpo else "–"
        memories = f"{to_dpo['memory']:.2f}×" if to_dpo else "–"
        extra = summary["peak_reserved_bytes"] if cuda else summary["training_rss_growth_bytes"]
        memory_cell = f"{gib(summary['peak_memory_bytes'])} ({'' if cuda else '+'}{gib(extra)})"
        row = (
            f"| {name} | {summary['s_per_step']:.4f} | {summary['wall_s_per_step']:.4f} | "
            f"{summary['s_before_first_step']:.2f} | {summary['pairs_per_s']:.2f} | {memory_cell} | {times} | "
            f"{memories} |"
        )
        if grounding:
            to_tpo = result["ratios"].get(f"{name}/tpo") or (same if name == "tpo" else None)
            cells = [f"{to_dpo['wall_time']:.2f}×" if to_dpo else "–"]
            cells += [f"{to_tpo[key]:.2f}×" if to_tpo else "–" for key in ("time", "wall_time", "memory")]
            cells += forwards_cells(summary.get("forwards_per_step"))
            row += "".join(f" {cell} |" for cell in cells)
        lines.append(row)
    versus = result["ratios"].get("tpo_reference_structure/tpo")
    if versus:
        lines += [
            "",
            f"Reference structure / TPO: {versus['time']:.2f}× step time, {versus['memory']:.2f}× peak memory.",
        ]
    check = result["reference_structure_check"]
    if check:
        lines.append(
            f"Reference structure vs TPO, loss, grad norm and metrics of steps 1-2: largest relative difference "
            f"{check['max_rel_diff']:.1e} over {len(check['rel_diff'])} values."
        )
    return "\n".join(lines)


def forwards_cells(counts: Optional[dict[str, Any]]) -> list[str]:
    """The two "forwards per step" cells of the table: language model calls (rows; calls, rows with a graph) and
    vision tower calls (images encoded)."""
    if not counts:
        return ["not counted", "not counted"]

    def show(value) -> str:
        return f"{value[0]}–{value[1]}" if isinstance(value, list) else str(value)

    language = (
        f"{show(counts['lm_calls'])} ({show(counts['lm_rows'])} rows; {show(counts['lm_calls_with_graph'])} with "
        f"graph, {show(counts['lm_rows_with_graph'])} rows)"
    )
    return [language, f"{show(counts['vision_calls'])} ({show(counts['vision_images'])} images)"]


def device_name(device: str, results: dict[str, Any]) -> str:
    if device == "cuda":
        for config in results.values():
            for summary in config["variants"].values():
                if summary.get("device"):
                    return summary["device"]
        return "cuda (no run finished)"
    model = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical CPUs"


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("torch", "transformers", "llamafactory", "tpo-plugin", "trl", "peft", "accelerate"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def plugin_source_digest() -> str:
    """SHA-256 over the imported tpo_plugin's Python sources: names what exactly was measured."""
    import tpo_plugin

    package = pathlib.Path(tpo_plugin.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


class ForwardCounter:
    """Counts, in a benchmark child, the forward calls of every step (``on_step_begin`` to ``on_step_end``).

    Forward pre-hooks on the language model (the ``language_model`` module of the policy's multimodal model, and of
    a separate reference model if there is one) and on its vision tower (``visual``) record per call: the rows
    (``inputs_embeds``' first dimension), whether autograd records a graph, and the images (rows of ``grid_thw``)
    the vision tower encodes. The policy's and the reference's passes both count: with LoRA the reference is the
    policy with its adapter disabled, the same modules. A hook is a few Python operations per call, in every
    variant alike.
    """

    def __init__(self) -> None:
        self.hooked: set[int] = set()
        self.current: Optional[dict[str, int]] = None  # None outside a step (the precomputed reference pass)
        self.steps: list[dict[str, int]] = []

    def attach(self, *models: Any) -> None:
        from tpo_plugin.training.batch.image_features import image_feature_owner

        for model in models:
            owner = image_feature_owner(model) if model is not None else None
            if owner is None or id(owner) in self.hooked:
                continue
            self.hooked.add(id(owner))
            owner.language_model.register_forward_pre_hook(self._language_model_call, with_kwargs=True)
            visual = getattr(owner, "visual", None)
            if visual is not None:
                visual.register_forward_pre_hook(self._vision_call, with_kwargs=True)

    def _language_model_call(self, module, args, kwargs) -> None:
        import torch

        if self.current is None:
            return
        tensor = kwargs.get("inputs_embeds")
        if tensor is None:
            tensor = kwargs.get("input_ids", args[0] if args else None)
        rows = int(tensor.shape[0]) if tensor is not None else 0
        self.current["lm_calls"] += 1
        self.current["lm_rows"] += rows
        if torch.is_grad_enabled():
            self.current["lm_calls_with_graph"] += 1
            self.current["lm_rows_with_graph"] += rows

    def _vision_call(self, module, args, kwargs) -> None:
        if self.current is None:
            return
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        self.current["vision_calls"] += 1
        self.current["vision_images"] += int(grid.shape[0]) if grid is not None else 0

    # TrainerCallback's hooks that matter here (the counter is added with Trainer.add_callback)
    def on_step_begin(self, args, state, control, **kwargs):
        keys = ("lm_calls", "lm_rows", "lm_calls_with_graph", "lm_rows_with_graph", "vision_calls", "vision_images")
        self.current = dict.fromkeys(keys, 0)

    def on_step_end(self, args, state, control, **kwargs):
        if self.current is not None:
            self.steps.append(self.current)
        self.current = None


def child_main() -> None:
    """A benchmark child (``run_variant``'s ``boot``): bench_child's timer and trainer choice, plus a
    :class:`ForwardCounter` whose counts are written next to bench_child's result before its ``os._exit``."""
    import bench_child
    from transformers import TrainerCallback

    bench_child.install(os.environ[RESULT_ENV], os.environ.get(TRAINER_ENV, ""))
    from llamafactory.train.dpo.trainer import CustomDPOTrainer

    counter = ForwardCounter()
    callback = type("ForwardCounterCallback", (TrainerCallback,), {})()
    callback.on_step_begin, callback.on_step_end = counter.on_step_begin, counter.on_step_end
    forwards_path = pathlib.Path(os.environ[RESULT_ENV]).with_name(FORWARDS_FILE)
    trainer_init, timer_train_end = CustomDPOTrainer.__init__, bench_child.StepTimer.on_train_end

    def trainer_init_counting(self, *args, **kwargs):
        trainer_init(self, *args, **kwargs)
        counter.attach(self.model, getattr(self, "ref_model", None))
        if callback not in self.callback_handler.callbacks:
            self.add_callback(callback)

    def train_end_writing_counts(self, *args, **kwargs):  # StepTimer ends the process: write the counts first
        forwards_path.write_text(json.dumps(counter.steps))
        return timer_train_end(self, *args, **kwargs)

    CustomDPOTrainer.__init__ = trainer_init_counting
    bench_child.StepTimer.on_train_end = train_end_writing_counts
    from llamafactory.cli import main as cli_main

    cli_main()


class Stopped(Exception):
    """SIGTERM arrived (a time limit): subprocess.run kills the running child as this passes through it."""


def stop_on_sigterm(signum, frame):
    raise Stopped


def log(message: str) -> None:
    print(f"[bench_tpo] {message}", file=sys.stderr, flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            log("--device cuda, but torch sees no CUDA device")
            return 2
    work_dir = pathlib.Path(args.work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    started, load_at_start = time.perf_counter(), os.getloadavg()
    model_dir = build_model(args, work_dir)
    data_dir = work_dir / ("data-video" if args.media == "video" else "data")
    data_stats = write_dataset(args, model_dir, data_dir)
    log(f"data: {json.dumps({key: round(value, 1) for key, value in data_stats.items()})}")
    video_corruption = None
    if args.media == "video":
        video_corruption = time_video_corruption(args, model_dir, data_dir)
        log(f"video corruption in the loader, one process: {json.dumps(video_corruption)}")

    settings = {
        "model": args.model,
        "image_size": args.image_size,
        **data_stats,
        "batch_pairs": args.batch_pairs,
        "warmup_steps": args.warmup_steps,
        "measured_steps": args.measured_steps,
        "repeats": args.repeats,
        "precision": args.precision,
        "threads": args.threads or os.environ.get("OMP_NUM_THREADS", "torch default"),
        "seed": args.seed,
        "loader_workers": args.loader_workers,
    }
    if args.media == "video":
        settings.update(media="video", video_frames=args.video_frames, video_file_fps=VIDEO_FPS)
        settings["frames_to_model_per_pair"] = video_corruption["frames_per_video"]
    report = {
        "benchmark": "tpo_vs_dpo",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": None,
        "versions": versions(),
        "tpo_plugin_sha256": plugin_source_digest(),
        "command": " ".join(["python", "benchmarks/bench_tpo.py", *(sys.argv[1:] if argv is None else argv)]),
        "settings": settings,
        "configurations": {},
    }
    if video_corruption is not None:
        report["video_corruption"] = video_corruption
    signal.signal(signal.SIGTERM, stop_on_sigterm)  # `timeout`: report what finished, end the running child
    try:
        for config in args.configs:
            runs: dict[str, list[dict]] = {name: [] for name in args.variant_names}
            for repeat in range(args.repeats):
                for variant in args.variant_names:  # alternating, so drift hits every variant alike
                    runs[variant].append(run_variant(args, config, variant, repeat, model_dir, data_dir, work_dir))
                    report["configurations"][config] = configuration_result(args, runs)
                    report["device"] = device_name(args.device, report["configurations"])
                    if args.output:
                        pathlib.Path(args.output).write_text(json.dumps(report, indent=1))
    except Stopped:
        log("stopped by SIGTERM: reporting the runs that finished")
        report["stopped_early"] = True

    report["total_seconds"] = time.perf_counter() - started
    report["load_average"] = {"start": load_at_start, "end": os.getloadavg()}
    media = f"{args.image_size}×{args.image_size} images"
    if video_corruption is not None:
        to_model = "/".join(str(count) for count in video_corruption["frames_per_video"])
        media = (
            f"one {args.video_frames}-frame {args.image_size}×{args.image_size} video per pair at {VIDEO_FPS} fps "
            f"({to_model} frames reach the model)"
        )
    header = (
        f"{args.model} Qwen2-VL, {args.batch_pairs} pairs/step, {media}, "
        f"answers ~{data_stats['chosen_tokens']:.0f} tokens, {args.precision}, median of "
        f"{args.measured_steps * args.repeats} steps after {args.warmup_steps} warm-up, {report['device']}"
    )
    print("\n\n".join(markdown_table(config, result, header) for config, result in report["configurations"].items()))
    if video_corruption is not None:
        print(
            f"\nCorrupting in the loader, one process, {video_corruption['threads']} thread(s), "
            f"{video_corruption['videos']} videos of {to_model} frames: decode + sample + resize "
            f"{video_corruption['decode_sample_resize_frames_per_s']:.0f} frames/s, corruption alone "
            f"{video_corruption['corruption_frames_per_s']:.0f} frames/s, both "
            f"{video_corruption['both_frames_per_s']:.0f} frames/s "
            f"({video_corruption['ms_per_video']:.1f} ms a video)."
        )
    print(json.dumps(report))
    if args.output:
        pathlib.Path(args.output).write_text(json.dumps(report, indent=1))
    failed = any("error" in s for c in report["configurations"].values() for s in c["variants"].values())
    return 1 if failed or report.get("stopped_early") else 0


if __name__ == "__main__":
    sys.exit(main())
