"""Shared fixtures: tiny local models, tiny preference datasets, and runners for LLaMA-Factory's CLI.

Nothing is downloaded: models are built from configs with a locally trained tokenizer
(:mod:`tpo_plugin.testing.tiny_models`), images are drawn with PIL.
"""

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional

import pytest
import yaml
from PIL import Image, ImageDraw

from tpo_plugin.testing import tiny_models
from tpo_plugin.testing.tiny_models import build_tiny_model


OFFLINE_ENV = tiny_models.OFFLINE_ENV
os.environ.update(OFFLINE_ENV)
# Thread limits a user's shell does not set. With OMP_NUM_THREADS=1 in every test run, a hang of every shipped
# recipe went unseen (training/forking.py): the commands the tests start run without them.
THREAD_LIMITS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40)}
SHAPES = ("ball", "box")


def draw(colour: str, shape: str, size: int | tuple[int, int] = 56) -> Image.Image:
    width, height = (size, size) if isinstance(size, int) else size
    image = Image.new("RGB", (width, height), (250, 250, 250))
    box = (width // 4, height // 4, 3 * width // 4, 3 * height // 4)
    paint = ImageDraw.Draw(image)
    (paint.ellipse if shape == "ball" else paint.rectangle)(box, fill=COLOURS[colour])
    return image


def preference_rows(
    image_dir: Path, count: int, with_images: bool = True, size: int | tuple[int, int] = 56, prefix: str = ""
) -> list[dict[str, Any]]:
    rows = []
    for index in range(count):
        colour, shape = list(COLOURS)[index % len(COLOURS)], SHAPES[index % len(SHAPES)]
        prompt = "What is in the picture?"
        row = {
            "conversations": [{"from": "human", "value": ("<image>" if with_images else "") + prompt}],
            "chosen": {"from": "gpt", "value": f"A {colour} {shape}."},
            "rejected": {"from": "gpt", "value": f"A {colour} {shape} and a dog."},
        }
        if with_images:
            path = image_dir / f"{prefix}{index}.png"
            draw(colour, shape, size).save(path)
            row["images"] = [f"img/{prefix}{index}.png"]
        rows.append(row)
    return rows


PAIR_COLUMNS = {"messages": "conversations", "chosen": "chosen", "rejected": "rejected", "images": "images"}


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory) -> Path:
    """A dataset_dir with: tiny_pairs (8 image pairs), photo_pairs (8 pairs of photo-sized 320x240 images,
    large enough that the image processor runs torch on several threads), one_pair, mixed_pairs (2 of 6 without image),
    text_pairs (no image at all), tiny_sft (not a ranking dataset) and broken_pairs (samples 0-3 each
    broken in one way: missing image, undecodable image, placeholder count, empty rejected answer)."""
    root = tmp_path_factory.mktemp("data")
    (root / "img").mkdir()
    pairs = preference_rows(root / "img", 8)
    mixed = pairs[:4] + preference_rows(root / "img", 2, with_images=False)
    text_pairs = preference_rows(root / "img", 4, with_images=False)
    sft = [{"conversations": r["conversations"] + [r["chosen"]], "images": r["images"]} for r in pairs]
    (root / "img" / "broken.png").write_bytes(b"this is not a png")
    broken = [
        {**pairs[0], "images": ["img/missing.png"]},
        {**pairs[1], "images": ["img/broken.png"]},
        {**pairs[2], "conversations": [{"from": "human", "value": "<image><image>Compare the pictures."}]},
        {**pairs[3], "rejected": {"from": "gpt", "value": "  "}},
        pairs[4],
    ]
    files = {
        "photo_pairs.json": preference_rows(root / "img", 8, size=(320, 240), prefix="photo"),
        "broken_pairs.json": broken,
        "pairs.json": pairs,
        "one_pair.json": pairs[:1],
        "mixed.json": mixed,
        "text_pairs.json": text_pairs,
        "sft.json": sft,
    }
    for name, rows in files.items():
        (root / name).write_text(json.dumps(rows, indent=1))

    info = {
        "tiny_pairs": {"file_name": "pairs.json", "formatting": "sharegpt", "ranking": True, "columns": PAIR_COLUMNS},
        "photo_pairs": {
            "file_name": "photo_pairs.json",
            "formatting": "sharegpt",
            "ranking": True,
            "columns": PAIR_COLUMNS,
        },
        "one_pair": {"file_name": "one_pair.json", "formatting": "sharegpt", "ranking": True, "columns": PAIR_COLUMNS},
        "broken_pairs": {
            "file_name": "broken_pairs.json",
            "formatting": "sharegpt",
            "ranking": True,
            "columns": PAIR_COLUMNS,
        },
        "mixed_pairs": {"file_name": "mixed.json", "formatting": "sharegpt", "ranking": True, "columns": PAIR_COLUMNS},
        "text_pairs": {
            "file_name": "text_pairs.json",
            "formatting": "sharegpt",
            "ranking": True,
            "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"},
        },
        "tiny_sft": {
            "file_name": "sft.json",
            "formatting": "sharegpt",
            "columns": {"messages": "conversations", "images": "images"},
        },
    }
    (root / "dataset_info.json").write_text(json.dumps(info, indent=1))
    return root


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {family: build_tiny_model(family, root / family) for family in ("qwen2_vl", "llava")}


TEMPLATES = {"qwen2_vl": "qwen2_vl", "llava": "llava"}


def train_config(model_dir: Path, family: str, dataset_dir: Path, output_dir: Path, **overrides) -> dict[str, Any]:
    """A minimal two-step TPO recipe on the tiny model; keys as in a user's YAML."""
    config = {
        "model_name_or_path": str(model_dir),
        "stage": "tpo",
        "do_train": True,
        "finetuning_type": "lora",
        "lora_target": "all",
        "dataset": "tiny_pairs",
        "dataset_dir": str(dataset_dir),
        "template": TEMPLATES[family],
        "cutoff_len": 256,
        "preprocessing_num_workers": 1,
        "output_dir": str(output_dir),
        "overwrite_output_dir": True,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "max_steps": 2,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "plot_loss": True,
        "seed": 7,
    }
    config.update(overrides)
    return config


def write_yaml(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def user_env(extra_env: Optional[dict[str, str]] = None) -> dict[str, str]:
    """The environment of a user's shell for a command the test starts: no thread limits, no hub."""
    env = {key: value for key, value in os.environ.items() if key not in THREAD_LIMITS}
    return {**env, **OFFLINE_ENV, **(extra_env or {})}


def run_command(
    command: list[str], cwd: Path, env: Optional[dict[str, str]] = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    """Run ``command`` in the user's environment; a run past ``timeout`` seconds fails the test, whatever it left.

    The command gets its own process group, killed whole on time-out: a hung run's forked workers hold its
    output pipes open, and ``subprocess.run`` would wait for them forever after killing only the command.
    """
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env=env or user_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise AssertionError(
            f"{' '.join(command)} did not finish in {timeout} s (hung?):\n{stdout[-4000:]}\n{stderr[-8000:]}"
        ) from None
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def run_cli(
    args: list[str], cwd: Path, extra_env: Optional[dict[str, str]] = None, timeout: int = 300, check: bool = True
) -> subprocess.CompletedProcess:
    """Run ``llamafactory-cli`` of this environment, as a user would, and return its output."""
    cli = Path(sys.executable).with_name("llamafactory-cli")
    result = run_command([str(cli), *args], cwd, user_env(extra_env), timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"llamafactory-cli {' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
        )
    return result


def log_history(output_dir: Path) -> list[dict[str, Any]]:
    return json.loads((output_dir / "trainer_state.json").read_text())["log_history"]


def train_logs(output_dir: Path) -> list[dict[str, Any]]:
    """The per-step training log entries (those with a ``loss``)."""
    return [entry for entry in log_history(output_dir) if "loss" in entry]


def assert_resumed_steps_equal(
    uninterrupted: Path, resumed: Path, checkpoint_step: int, steps: list[int], keys: Iterable[str]
) -> None:
    """The resumed run logged ``steps`` after its checkpoint, each with the uninterrupted run's ``keys`` (1e-5)."""
    expected = {entry["step"]: entry for entry in train_logs(uninterrupted)}
    after_resume = [entry for entry in train_logs(resumed) if entry["step"] > checkpoint_step]
    assert [entry["step"] for entry in after_resume] == steps
    for entry in after_resume:
        for key in keys:
            assert entry[key] == pytest.approx(expected[entry["step"]][key], abs=1e-5), (entry["step"], key)


@pytest.fixture
def tpo_log_records():
    """The records the stage's logger (``llamafactory.train.tpo``) emits during the test, in order.

    A handler on that logger itself: LLaMA-Factory's loggers do not propagate to the root, where caplog listens.
    """
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("llamafactory.train.tpo")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
