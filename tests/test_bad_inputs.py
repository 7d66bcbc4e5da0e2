"""Second round of bad inputs (issue 16): image tokens past `cutoff_len`, image modes LLaMA-Factory's RGB
conversion destroys, identical answers, video pairs a template cannot train and dataset files that do not parse."""

import json

import numpy as np
import pytest
from PIL import Image
from test_refusals import run_exp_error

from tpo_plugin.training.batch.corruption import regularize_images

from conftest import PAIR_COLUMNS, preference_rows, train_config


def add_dataset(root, name, rows_or_text, columns=PAIR_COLUMNS):
    file = root / f"{name}.json"
    file.write_text(rows_or_text if isinstance(rows_or_text, str) else json.dumps(rows_or_text))
    info = json.loads((root / "dataset_info.json").read_text())
    info[name] = {"file_name": file.name, "formatting": "sharegpt", "ranking": True, "columns": columns}
    (root / "dataset_info.json").write_text(json.dumps(info))


@pytest.fixture
def data_root(tmp_path, dataset_dir):
    (tmp_path / "img").mkdir()
    (tmp_path / "dataset_info.json").write_text("{}")
    return tmp_path


def grey_levels():
    return np.linspace(0, 1, 56 * 56).reshape(56, 56)


def expected_grey(unit):
    grey = np.round(unit * 255).astype(np.uint8)
    return np.stack([grey] * 3, axis=-1)


def grey_palette_image(unit):
    image = Image.frombytes("P", unit.shape[::-1], np.round(unit * 255).astype(np.uint8).tobytes())
    image.putpalette([level for index in range(256) for level in (index, index, index)])
    return image


def converted_from_grey(mode):
    """An 8-bit grey image converted by PIL to ``mode``: lossless for grey, so it shows the same grey."""
    return lambda u: Image.fromarray(expected_grey(u)).convert(mode)


def raw_16_bit(mode, dtype):
    return lambda u: Image.frombytes(mode, u.shape[::-1], (u * 65535).round().astype(dtype).tobytes())


MODES = {  # mode: (image built from known values, the 8-bit RGB it shows, computed from those values)
    "I;16": (lambda u: Image.fromarray((u * 65535).round().astype(np.uint16)), expected_grey),
    "I;16B": (lambda u: Image.fromarray((u * 65535).round().astype(">u2"), "I;16B"), expected_grey),
    "I": (lambda u: Image.fromarray((u * 65535).round().astype(np.int32)), expected_grey),
    "F": (lambda u: Image.fromarray(u.astype(np.float32)), expected_grey),
    "I;16L": (raw_16_bit("I;16L", "<u2"), expected_grey),
    "I;16N": (raw_16_bit("I;16N", "=u2"), expected_grey),
    "L": (lambda u: Image.fromarray((u * 255).round().astype(np.uint8)), expected_grey),
    "1": (lambda u: Image.fromarray(u > 0.5), lambda u: expected_grey((u > 0.5).astype(float))),
    "P": (grey_palette_image, expected_grey),
    "CMYK": (converted_from_grey("CMYK"), expected_grey),
    "YCbCr": (converted_from_grey("YCbCr"), expected_grey),
    "HSV": (converted_from_grey("HSV"), expected_grey),
    "LA": (
        lambda u: Image.fromarray(np.stack([np.zeros_like(u), u * 255], -1).round().astype(np.uint8), "LA"),
        lambda u: expected_grey(1 - np.round(u * 255) / 255),  # black at opacity u over white
    ),
    "RGBA": (
        lambda u: Image.fromarray(np.stack([np.zeros_like(u)] * 3 + [u * 255], -1).round().astype(np.uint8)),
        lambda u: expected_grey(1 - np.round(u * 255) / 255),
    ),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_image_modes_reach_the_model_as_what_they_show(mode, model_dirs):
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.hparams import get_infer_args
    from llamafactory.model import load_tokenizer

    model_args, data_args, _, _ = get_infer_args(
        {"model_name_or_path": str(model_dirs["qwen2_vl"]), "template": "qwen2_vl"}
    )
    tokenizer_module = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
    build, expected = MODES[mode]
    image = build(grey_levels())
    assert image.mode == mode
    (seen,) = regularize_images(template.mm_plugin, [image], tokenizer_module["processor"])
    difference = np.abs(np.asarray(seen, dtype=int) - expected(grey_levels()))
    assert seen.mode == "RGB" and difference.max() <= 1, difference.max()


@pytest.mark.e2e
def test_bad_samples_of_the_second_round_are_named(model_dirs, data_root, tmp_path):
    rows = preference_rows(data_root / "img", 6)
    (data_root / "img" / "folder").mkdir()
    Image.fromarray(np.full((56, 56), np.nan, dtype=np.float32)).save(data_root / "img" / "nan.tiff")
    rows[1]["images"] = ["img/folder"]
    rows[2]["images"] = ["img/nan.tiff"]
    rows[3]["videos"] = ["clip.mp4"]
    big = Image.new("RGB", (448, 448), (10, 200, 30))
    big.save(data_root / "img" / "big.png")
    rows[4]["images"] = ["img/big.png"]
    rows[5]["rejected"] = rows[5]["chosen"]
    add_dataset(data_root, "bad", rows, {**PAIR_COLUMNS, "videos": "videos"})
    config = train_config(
        model_dirs["qwen2_vl"], "qwen2_vl", data_root, tmp_path / "out", dataset="bad", cutoff_len=30
    )
    message = run_exp_error(config)
    assert "The preference data has 4 problem(s)" in message
    assert "sample 1: image `img/folder` is a directory" in message
    assert "sample 2: image `" in message and "nan.tiff` has PIL mode F with non-finite pixel values" in message
    assert "sample 3: has 0 <video> placeholder(s) but 1 video(s)" in message
    # The processor scales the square 448x448 image down to its pixel cap (`size.longest_edge`, a square of side
    # a multiple of the merged patch), then makes one token per merged patch.
    config = json.loads((model_dirs["qwen2_vl"] / "processor_config.json").read_text())["image_processor"]
    merged_patch = config["patch_size"] * config["merge_size"]
    side = min(448, int(config["size"]["longest_edge"] ** 0.5))
    assert side % merged_patch == 0
    assert f"sample 4: needs {(side // merged_patch) ** 2} image tokens" in message
    assert "`cutoff_len: 30` keeps only" in message and "`image_max_pixels`" in message
    assert "sample 0" not in message and "sample 5" not in message


@pytest.mark.e2e
def test_suggested_cutoff_len_is_enough(model_dirs, data_root, tmp_path):
    import re

    rows = preference_rows(data_root / "img", 2)
    Image.new("RGB", (448, 448), (10, 200, 30)).save(data_root / "img" / "big.png")
    rows[0]["images"] = ["img/big.png"]
    rows[1]["rejected"] = rows[1]["chosen"]
    rows[0]["rejected"] = rows[0]["chosen"]
    add_dataset(data_root, "big", rows)
    config = train_config(
        model_dirs["qwen2_vl"], "qwen2_vl", data_root, tmp_path / "out", dataset="big", cutoff_len=30
    )
    enough = int(re.search(r"set `cutoff_len: (\d+)` or more", run_exp_error(config)).group(1))
    config["cutoff_len"] = enough
    message = run_exp_error(config)  # now refused only for its identical answers (2 of 2 pairs)
    assert "2 of 2 training pairs have the same chosen and rejected answer" in message
    assert "image tokens" not in message


@pytest.mark.e2e
def test_dataset_files_that_do_not_parse_are_named(model_dirs, data_root, tmp_path):
    rows = preference_rows(data_root / "img", 2)
    add_dataset(data_root, "truncated", json.dumps(rows)[:-40])
    add_dataset(data_root, "empty", [])
    add_dataset(data_root, "not_objects", [1, 2])
    config = train_config(
        model_dirs["qwen2_vl"], "qwen2_vl", data_root, tmp_path / "out", dataset="truncated,empty,not_objects"
    )
    message = run_exp_error(config)
    assert "3 dataset file(s) cannot be read as samples" in message
    assert "dataset `truncated`, file `" in message and "truncated.json`: is not valid JSON" in message
    assert "truncated?" in message
    assert "empty.json`: is an empty list: it holds no samples" in message
    assert "not_objects.json`: 2 sample(s) are not JSON objects, the first is sample 0 (a int)" in message


@pytest.mark.e2e
def test_video_pairs_are_refused_with_a_template_that_trains_no_videos(model_dirs, data_root, tmp_path):
    rows = preference_rows(data_root / "img", 2, with_images=False)
    for row in rows:
        row["conversations"][0]["value"] = "<video>" + row["conversations"][0]["value"]
        row["videos"] = ["clip.mp4"]
    add_dataset(
        data_root, "videos", rows, {**{k: v for k, v in PAIR_COLUMNS.items() if k != "images"}, "videos": "videos"}
    )
    config = train_config(model_dirs["llava"], "llava", data_root, tmp_path / "out", dataset="videos")
    message = run_exp_error(config)
    assert "dataset `videos`, sample 0: has 1 video(s) (`clip.mp4`): template `llava` takes no videos" in message
    assert "No training pair has an image" not in message
