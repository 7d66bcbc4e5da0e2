"""Video pairs: stage tpo corrupts every frame the model sees, with the image schedule, and weights tokens by it.

Videos are written here with PyAV (PNG frames in a QuickTime file: lossless, so a white frame decodes white).
The independent side of the score checks uses only LLaMA-Factory's data pipeline and a transformers model: the
pair's video against a video of the same length and rate whose frames are all white.
"""

import json
import math
from pathlib import Path

import av
import pytest
import torch
from PIL import Image, ImageDraw
from transformers import AutoModelForImageTextToText

from tpo_plugin.testing.tiny_models import build_tiny_model

from conftest import COLOURS, draw, log_history, run_cli, run_command, train_config, train_logs, user_env, write_yaml


FRAMES, SIZE, FPS = 8, (64, 48), 4  # 2 s; LLaMA-Factory samples 2 frames a second: 4 frames reach the model
VIDEO_COLUMNS = {"messages": "conversations", "chosen": "chosen", "rejected": "rejected", "videos": "videos"}
MEDIA_COLUMNS = {**VIDEO_COLUMNS, "images": "images"}
TEMPLATES = {"qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_vl", "qwen3_vl": "qwen3_vl"}


def write_video(path: Path, colour: tuple[int, int, int], white_frames: range | tuple = ()) -> Path:
    """A ball crossing the frame; frames in ``white_frames`` are all white."""
    container = av.open(str(path), "w", format="mov")
    stream = container.add_stream("png", rate=FPS)
    stream.width, stream.height = SIZE
    stream.pix_fmt = "rgb24"
    for index in range(FRAMES):
        frame = Image.new("RGB", SIZE, (250, 250, 250))
        ImageDraw.Draw(frame).ellipse((4 + 4 * index, 10, 24 + 4 * index, 30), fill=colour)
        if index in white_frames:
            frame = Image.new("RGB", SIZE, (255, 255, 255))
        for packet in stream.encode(av.VideoFrame.from_image(frame)):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


def pair(colour: str, video: str | None = None, image: str | None = None) -> dict:
    prompt = ("<image>" if image else "") + ("<video>" if video else "") + "What do you see?"
    row = {
        "conversations": [{"from": "human", "value": prompt}],
        "chosen": {"from": "gpt", "value": f"A {colour} ball."},
        "rejected": {"from": "gpt", "value": f"A {colour} ball and a dog."},
    }
    if video:
        row["videos"] = [video]
    if image:
        row["images"] = [image]
    return row


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory) -> Path:
    """one_video_pair, video_pairs (4), mixed_media (image and video, video, image, text), rank_pairs (a video
    pair and a text pair) and broken_videos (a missing, an undecodable and a good video)."""
    root = tmp_path_factory.mktemp("video_data")
    (root / "vid").mkdir()
    (root / "img").mkdir()
    for name, colour in COLOURS.items():
        write_video(root / "vid" / f"{name}.mov", colour)
        draw(name, "ball").save(root / "img" / f"{name}.png")
    (root / "vid" / "broken.mov").write_bytes(b"this is not a video")
    datasets = {
        "one_video_pair": ([pair("red", video="vid/red.mov")], VIDEO_COLUMNS),
        "video_pairs": ([pair(name, video=f"vid/{name}.mov") for name in COLOURS], VIDEO_COLUMNS),
        "mixed_media": (
            [
                pair("red", video="vid/red.mov", image="img/red.png"),
                pair("green", video="vid/green.mov"),
                pair("blue", image="img/blue.png"),
                pair("yellow"),
            ],
            MEDIA_COLUMNS,
        ),
        "rank_pairs": ([pair("red", video="vid/red.mov"), pair("green")], VIDEO_COLUMNS),
        "broken_videos": (
            [
                pair("red", video="vid/missing.mov"),
                pair("green", video="vid/broken.mov"),
                pair("blue", "vid/blue.mov"),
            ],
            VIDEO_COLUMNS,
        ),
    }
    info = {}
    for name, (rows, columns) in datasets.items():
        (root / f"{name}.json").write_text(json.dumps(rows))
        info[name] = {"file_name": f"{name}.json", "formatting": "sharegpt", "ranking": True, "columns": columns}
    (root / "dataset_info.json").write_text(json.dumps(info))
    return root


@pytest.fixture(scope="module")
def video_models(model_dirs, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("video_models")
    return {
        "qwen2_vl": model_dirs["qwen2_vl"],
        **{f: build_tiny_model(f, root / f) for f in ("qwen2_5_vl", "qwen3_vl")},
    }


def video_config(model_dir: Path, family: str, video_dir: Path, output_dir: Path, **overrides) -> dict:
    config = train_config(model_dir, "qwen2_vl", video_dir, output_dir, template=TEMPLATES[family], cutoff_len=1024)
    return {**config, **overrides}


def independent_chosen_token_scores(config: dict, corrupted_video: Path) -> torch.Tensor:
    """Per-token ``logit(video) - logit(corrupted_video)`` of the chosen answer of the dataset's only pair."""
    from llamafactory.data import PairwiseDataCollatorWithPadding, get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    model_args, data_args, training_args, _, _ = get_train_args({**config, "output_dir": config["output_dir"] + "-x"})
    tokenizer_module = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
    (row,) = get_dataset(template, model_args, data_args, training_args, stage="rm", **tokenizer_module)[
        "train_dataset"
    ]
    model = AutoModelForImageTextToText.from_pretrained(config["model_name_or_path"]).eval()
    collator = PairwiseDataCollatorWithPadding(
        template=template, model=model, label_pad_token_id=-100, **tokenizer_module
    )
    target_logits = []
    for videos in (row["videos"], [str(corrupted_video)]):
        batch = collator([{**row, "videos": videos}])
        labels = batch.pop("labels")[0]  # row 0: the chosen answer
        with torch.no_grad():
            logits = model(**batch).logits[0]
        positions = (labels[1:] != -100).nonzero().squeeze(-1)
        target_logits.append(logits[positions, labels[1:][positions]])
    return target_logits[0] - target_logits[1]


@pytest.mark.e2e
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_blank_frames_give_the_scores_of_an_all_white_video(family, video_models, video_dir, tmp_path):
    output_dir = tmp_path / "out"
    config = video_config(
        video_models[family],
        family,
        video_dir,
        output_dir,
        dataset="one_video_pair",
        tpo_corruption="blank",
        per_device_train_batch_size=1,
        max_steps=1,
    )
    run_cli(["train", str(write_yaml(tmp_path / "tpo.yaml", config))], cwd=tmp_path)
    (first_step,) = train_logs(output_dir)
    assert math.isfinite(first_step["loss"])

    all_white = independent_chosen_token_scores(config, write_video(tmp_path / "white.mov", (0, 0, 0), range(FRAMES)))
    half_white = independent_chosen_token_scores(config, write_video(tmp_path / "half.mov", COLOURS["red"], range(4)))
    expected_score = all_white.mean().item()
    expected_weight = sum(0.5 + 1 / (1 + math.exp(-s)) for s in all_white.tolist()) / len(all_white)
    assert abs(expected_score) > 1e-4  # white frames do change the logits, so the check has teeth
    assert first_step["tpo/score_chosen"] == pytest.approx(expected_score, rel=0.01)
    assert first_step["tpo/weight_chosen"] == pytest.approx(expected_weight, rel=0.01)
    # Every frame is corrupted: whitening only the first half of the video gives another score.
    assert abs(half_white.mean().item() - expected_score) > 0.05 * abs(expected_score)


def vision_encodings_per_step(monkeypatch):
    """Images and videos encoded by Qwen2-VL's vision tower (policy and reference) in each training step."""
    from transformers import TrainerCallback
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    counts, total = [], [0]
    forward = Qwen2VisionTransformerPretrainedModel.forward

    def counting_forward(self, *args, **kwargs):
        total[0] += len(kwargs["grid_thw"])
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(Qwen2VisionTransformerPretrainedModel, "forward", counting_forward)

    class PerStep(TrainerCallback):
        def on_step_end(self, *args, **kwargs):
            counts.append(total[0] - sum(counts))

    return counts, PerStep()


@pytest.mark.e2e
def test_mixed_media_batches_train_with_reused_encodings_and_precomputed_reference_scores(
    model_dirs, video_dir, tmp_path, monkeypatch
):
    from llamafactory.train.tuner import run_exp

    counts, per_step = vision_encodings_per_step(monkeypatch)
    runs = {}
    for precompute in (False, True):
        output_dir = tmp_path / f"precompute-{precompute}"
        config = video_config(
            model_dirs["qwen2_vl"],
            "qwen2_vl",
            video_dir,
            output_dir,
            dataset="mixed_media",  # one batch: image and video, video, image, text
            per_device_train_batch_size=4,
            dataloader_num_workers=1,  # the frames are corrupted in the loader's worker
            tpo_noise_per="sample",
            tpo_precompute_ref=precompute,
            tpo_log_tokens=2 if precompute else 0,
            per_device_eval_batch_size=4,
        )
        run_exp(args=config, callbacks=[] if precompute else [per_step])
        runs[precompute] = train_logs(output_dir)

    # LoRA, frozen vision tower: 2 images and 2 videos, clean and corrupted, each encoded once a step for both
    # models; encoding each row's video in every forward would take 16 video encodings alone.
    assert counts == [8, 8]
    for live, precomputed in zip(runs[False], runs[True], strict=True):
        for key in ("loss", "rewards/margins", "tpo/score_chosen", "tpo/weight_rejected"):
            assert precomputed[key] == pytest.approx(live[key], rel=1e-4, abs=1e-6), key
        assert math.isfinite(live["loss"]) and live["tpo/score_chosen"] != 0.0
    tokens = [
        json.loads(line) for line in (tmp_path / "precompute-True" / "tpo_tokens.jsonl").read_text().splitlines()
    ]
    video_only = [record for record in tokens if record["pair"] == 1 and record["side"] == "chosen"]
    assert video_only and any(abs(score) > 0 for score in video_only[0]["visual_score"])


@pytest.mark.e2e
def test_two_torchrun_ranks_one_with_a_video_and_one_without(model_dirs, video_dir, tmp_path):
    output_dir = tmp_path / "out"
    config = video_config(
        model_dirs["qwen2_vl"], "qwen2_vl", video_dir, output_dir, dataset="rank_pairs", per_device_train_batch_size=1
    )
    recipe = write_yaml(tmp_path / "tpo.yaml", config)
    extra_env = {"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2", "MASTER_PORT": "29733"}
    result = run_cli(["train", str(recipe)], cwd=tmp_path, extra_env=extra_env, timeout=600, check=False)
    output = result.stdout + result.stderr
    # As in test_e2e_train: a gloo rank sometimes aborts at interpreter exit once training is done.
    exit_abort = (
        "terminate called without an active exception" in output and (output_dir / "all_results.json").is_file()
    )
    assert result.returncode == 0 or exit_abort, output[-8000:]
    assert "Stage tpo on rank 0" in output and "Stage tpo on rank 1" in output
    logs = [entry for entry in log_history(output_dir) if "loss" in entry]
    assert len(logs) == 2 and all(math.isfinite(entry["loss"]) for entry in logs)


@pytest.mark.e2e
def test_unusable_videos_are_named_before_the_model_loads(model_dirs, video_dir, tmp_path):
    config = video_config(model_dirs["qwen2_vl"], "qwen2_vl", video_dir, tmp_path / "out", dataset="broken_videos")
    result = run_cli(["train", str(write_yaml(tmp_path / "tpo.yaml", config))], cwd=tmp_path, check=False)
    message = result.stdout + result.stderr
    assert result.returncode != 0
    assert "The preference data has 2 problem(s)" in message
    assert "dataset `broken_videos`, sample 0: video `" in message and "missing.mov` does not exist" in message
    assert "dataset `broken_videos`, sample 1: video `" in message and "broken.mov` cannot be decoded" in message
    assert "all params" not in message and "sample 2" not in message  # refused before the model loaded

    config.update(dataset="one_video_pair", cutoff_len=12)
    result = run_cli(["train", str(write_yaml(tmp_path / "short.yaml", config))], cwd=tmp_path, check=False)
    message = result.stdout + result.stderr
    assert "sample 0: needs" in message and "video tokens for its 1 video(s)" in message
    assert "`video_max_pixels` or `video_maxlen`" in message


def test_video_templates_are_trained_or_refused_by_name():
    from llamafactory.data.template import TEMPLATES as LLAMAFACTORY_TEMPLATES

    from tpo_plugin.training.checks.families import VIDEO_TRAINED, video_refusal

    for name in VIDEO_TRAINED:
        assert video_refusal(name, LLAMAFACTORY_TEMPLATES[name]) is None
    assert "takes no videos" in video_refusal("llava", LLAMAFACTORY_TEMPLATES["llava"])
    refusal = video_refusal("video_llava", LLAMAFACTORY_TEMPLATES["video_llava"])
    assert "video_llava" in refusal and "transformers 5 refuses" in refusal and "qwen2_vl" in refusal


def test_each_frame_has_noise_of_its_own():
    from tpo_plugin.method.noise import corrupt_image

    still = Image.new("RGB", (8, 8), (120, 120, 120))
    first, second = (corrupt_image(still, "diffusion", 500, seed=3, step_key=1, frame=index) for index in (0, 1))
    again = corrupt_image(still, "diffusion", 500, seed=3, step_key=1, frame=0)
    assert first.tobytes() != second.tobytes()  # two equal frames of a still scene: independent noise
    assert first.tobytes() == again.tobytes()  # the same frame of the same video: the same noise, wherever drawn
    assert corrupt_image(still, "diffusion", 500, seed=3, step_key=1).tobytes() != first.tobytes()  # an image


@pytest.mark.e2e
def test_inspect_shows_a_video_pair_with_its_clean_and_corrupted_frames(model_dirs, video_dir, tmp_path):
    import sys

    config = video_config(model_dirs["qwen2_vl"], "qwen2_vl", video_dir, tmp_path / "train", dataset="video_pairs")
    recipe = write_yaml(tmp_path / "tpo.yaml", config)
    command = [sys.executable, "-m", "tpo_plugin", "inspect", str(recipe), "--output-dir", "out", "--num-pairs", "2"]
    result = run_command(command, tmp_path, user_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    records = [json.loads(line) for line in (tmp_path / "out" / "tokens.jsonl").read_text().splitlines()]
    assert [len(record["video"]) for record in records] == [1, 1] and records[0]["video"][0].endswith("red.mov")
    assert any(abs(score) > 0 for score in records[0]["chosen"]["visual_score"])
    page = (tmp_path / "out" / "report.html").read_text()
    for index in range(4):  # the 4 frames the model sees, each clean and corrupted
        assert f"pair 0, video 0, clean frame {index}" in page and f"pair 0, video 0, corrupted frame {index}" in page
