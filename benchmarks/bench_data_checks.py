"""How long stage tpo's data checks take next to LLaMA-Factory's own tokenising of the same pairs.

Before the model loads, ``run_tpo`` checks every pair (``check_pairs``: files, placeholders, every image
decoded and expanded into its tokens) and then LLaMA-Factory tokenises them (``get_dataset``, which also
opens and processes every image). Both run on ``preprocessing_num_workers`` processes. This builds N pairs of
640x480 JPEG photos-like images and a tiny Qwen2-VL, and times the two in one process, for each worker count:

    python benchmarks/bench_data_checks.py --pairs 1000 --workers 1 2

The target is a check no slower than the tokenising it precedes. Results: RESULTS.md, "Data checks".
"""

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw


def write_pairs(root: Path, count: int, seed: int = 0) -> None:
    """``count`` pairs, each with its own 640x480 JPEG of random shapes, in a dataset_dir layout."""
    rng = random.Random(seed)
    (root / "img").mkdir(parents=True)
    rows = []
    for index in range(count):
        image = Image.new("RGB", (640, 480), tuple(rng.randrange(256) for _ in range(3)))
        paint = ImageDraw.Draw(image)
        for _ in range(12):
            x, y = rng.randrange(600), rng.randrange(440)
            paint.ellipse((x, y, x + rng.randrange(20, 200), y + rng.randrange(20, 200)), fill=rng.randrange(1 << 24))
        image.save(root / "img" / f"{index}.jpg", quality=90)
        rows.append(
            {
                "conversations": [{"from": "human", "value": "<image>What is in the picture?"}],
                "chosen": {"from": "gpt", "value": "Some coloured ellipses."},
                "rejected": {"from": "gpt", "value": "Some coloured ellipses and a dog."},
                "images": [f"img/{index}.jpg"],
            }
        )
    (root / "pairs.json").write_text(json.dumps(rows))
    columns = {"messages": "conversations", "chosen": "chosen", "rejected": "rejected", "images": "images"}
    info = {"photo_pairs": {"file_name": "pairs.json", "formatting": "sharegpt", "ranking": True, "columns": columns}}
    (root / "dataset_info.json").write_text(json.dumps(info))


def time_once(model_dir: Path, dataset_dir: Path, output_dir: Path, workers: int) -> dict[str, float]:
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    from tpo_plugin.training.checks.data import check_pairs
    from tpo_plugin.training.run.forking import single_threaded_torch_in_forked_children

    config = {
        "model_name_or_path": str(model_dir),
        "stage": "tpo",
        "do_train": True,
        "finetuning_type": "lora",
        "dataset": "photo_pairs",
        "dataset_dir": str(dataset_dir),
        "template": "qwen2_vl",
        "cutoff_len": 1024,
        "image_max_pixels": 262144,  # 512x512, as the shipped Qwen-VL recipes
        "preprocessing_num_workers": workers,
        "overwrite_cache": True,  # tokenise every time, as a first run does
        "output_dir": str(output_dir),
        "report_to": "none",
    }
    model_args, data_args, training_args, _, _ = get_train_args(config)
    single_threaded_torch_in_forked_children()
    tokenizer_module = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)

    start = time.perf_counter()
    check_pairs(template, tokenizer_module, model_args, data_args, training_args)
    checked = time.perf_counter()
    get_dataset(template, model_args, data_args, training_args, stage="rm", **tokenizer_module)
    tokenised = time.perf_counter()
    return {"checks_s": checked - start, "tokenising_s": tokenised - checked}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    from tpo_plugin.testing.tiny_models import OFFLINE_ENV, build_tiny_model

    os.environ.update(OFFLINE_ENV)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        write_pairs(root / "data", args.pairs)
        model_dir = build_tiny_model("qwen2_vl", root / "model")
        for workers in args.workers:
            result = time_once(model_dir, root / "data", root / "out", workers)
            ratio = result["checks_s"] / result["tokenising_s"]
            print(
                json.dumps({"pairs": args.pairs, "workers": workers, **result, "checks_per_tokenising": ratio}),
                flush=True,
            )


if __name__ == "__main__":
    main()
