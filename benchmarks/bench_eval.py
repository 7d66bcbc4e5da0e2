"""Questions per second of ``tpo-plugin eval``'s generation with LLaMA-Factory's Hugging Face engine, by batch size.

One ``LlamaFactoryAnswerer`` (the model ``llamafactory-cli chat`` loads from the same arguments) answers the same N
POPE-style questions (``Is there a <object> in the image?`` + LLaVA's short-answer suffix, greedy, ``max_new_tokens``
as given) in batches of each size, after one warm-up batch; the answers of every batch size are compared with
those of batch 1. Models, built locally (nothing is downloaded):

* ``tiny``: the tests' tiny Qwen2-VL (:func:`tpo_plugin.testing.tiny_models.build_tiny_model`), 56x56 images;
* a shape of ``benchmarks/models.py`` (``qwen2-vl-2b-narrow``, the CPU proxy of Qwen2-VL-2B's cost balance; or
  ``qwen2-vl-2b`` on a GPU), 448x448 images.

    python benchmarks/bench_eval.py --model tiny --questions 48 --batch-sizes 1 8 16 32
    python benchmarks/bench_eval.py --model qwen2-vl-2b-narrow --questions 16 --max-new-tokens 32
    python benchmarks/bench_eval.py --model qwen2-vl-2b --device cuda --questions 256   # on a GPU

The target (issue #38): batch 16 at least 3x the questions/s of batch 1 on the tiny model on a CPU. Results:
RESULTS.md, "Evaluation: batched generation".
"""

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw


def draw_images(image_dir: Path, count: int, size: int, seed: int = 0) -> list[str]:
    """``count`` square images of random coloured shapes, as PNG files; their names."""
    rng = random.Random(seed)
    image_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for index in range(count):
        image = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
        paint = ImageDraw.Draw(image)
        for _ in range(4):
            x, y = rng.randrange(size * 3 // 4), rng.randrange(size * 3 // 4)
            paint.ellipse((x, y, x + size // 4, y + size // 4), fill=rng.randrange(1 << 24))
        names.append(f"{index}.png")
        image.save(image_dir / names[-1])
    return names


def build_model(name: str, root: Path, device: str) -> Path:
    """The model directory: the tests' tiny Qwen2-VL, or a shape of benchmarks/models.py."""
    if name == "tiny":
        from tpo_plugin.testing.tiny_models import build_tiny_model

        return build_tiny_model("qwen2_vl", root / "tiny")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from models import build_qwen2_vl

    return build_qwen2_vl(name, root / name, device=device, dtype="float32" if device == "cpu" else "bfloat16")


def cpu_name() -> str:
    """The CPU's model name (Linux), else the machine type."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def measure(answerer, questions: list, batch_size: int) -> tuple[float, list[str]]:
    """Seconds to answer every question in batches of ``batch_size`` (after a warm-up batch), and the answers."""
    answerer.answer_batch(questions[:batch_size])
    start = time.perf_counter()
    answers = []
    for first in range(0, len(questions), batch_size):
        answers += answerer.answer_batch(questions[first : first + batch_size])
    return time.perf_counter() - start, answers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny, or a shape of benchmarks/models.py")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the engine puts the model where torch can)")
    parser.add_argument("--questions", type=int, default=48)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16, 32])
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--image-size", type=int, help="square image side (default: 56 tiny, 448 otherwise)")
    parser.add_argument("--work-dir", type=Path, help="where models and images go (default: a temporary folder)")
    args = parser.parse_args(argv)

    from tpo_plugin.evaluation.answers import BENCHMARK_DECODING, DEFAULT_PROMPT_SUFFIX, LlamaFactoryAnswerer
    from tpo_plugin.evaluation.inputs import Question

    with tempfile.TemporaryDirectory() as temporary:
        root = args.work_dir or Path(temporary)
        model_dir = build_model(args.model, root / "models", args.device)
        size = args.image_size or (56 if args.model == "tiny" else 448)
        images = draw_images(root / "images", 8, size)
        rng = random.Random(1)
        questions = [
            Question(index, images[index % len(images)], f"Is there a {rng.choice(['dog', 'ball', 'car'])} here?",
                     "yes", (), "")
            for index in range(args.questions)
        ]  # fmt: skip
        model_args = ["--model_name_or_path", str(model_dir), "--template", "qwen2_vl"]
        model_args += ["--max_new_tokens", str(args.max_new_tokens)]
        answerer = LlamaFactoryAnswerer(BENCHMARK_DECODING + model_args, root / "images", DEFAULT_PROMPT_SUFFIX)

        rows, baseline = [], None
        for batch_size in args.batch_sizes:
            seconds, answers = measure(answerer, questions, batch_size)
            baseline = baseline or (seconds, answers)
            row = {
                "model": args.model, "device": args.device, "batch_size": batch_size, "questions": len(questions),
                "max_new_tokens": args.max_new_tokens, "seconds": round(seconds, 2),
                "questions_per_s": round(len(questions) / seconds, 3),
                "speedup_vs_first": round(baseline[0] / seconds, 2), "same_answers_as_first": answers == baseline[1],
            }  # fmt: skip
            print(json.dumps(row), flush=True)
            rows.append(row)

    print(f"\n{args.model} on {args.device} ({cpu_name()}, {os.cpu_count()} logical CPUs), {len(questions)} "
          f"questions, max_new_tokens {args.max_new_tokens}\n")  # fmt: skip
    print("| batch size | s | questions/s | × batch " + str(args.batch_sizes[0]) + " | same answers |")
    print("|---:|---:|---:|---:|---|")
    for row in rows:
        print(f"| {row['batch_size']} | {row['seconds']} | {row['questions_per_s']} | {row['speedup_vs_first']}× | "
              f"{'yes' if row['same_answers_as_first'] else 'NO'} |")  # fmt: skip
    return 0 if all(row["same_answers_as_first"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
