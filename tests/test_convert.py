"""``tpo-plugin convert``: RLHF-V / RLAIF-V rows in their published encodings become LLaMA-Factory pairs.

The inputs are small synthetic files in the datasets' own layouts (parquet with Hugging Face's
``{"bytes", "path"}`` image structs, JSON lines, a JSON list) with images drawn by PIL.
"""

import base64
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tpo_plugin.commands import convert
from tpo_plugin.commands.cli import main


IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
ENTRY = {
    "file_name": "rlhf_v.json",
    "ranking": True,
    "formatting": "sharegpt",
    "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected", "images": "images"},
}


def encoded_image(colour: tuple[int, int, int], image_format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, image_format)
    return buffer.getvalue()


PNG, JPEG = encoded_image((200, 30, 30)), encoded_image((30, 30, 200), "JPEG")
PNG_STRUCT = {"bytes": PNG, "path": None}  # the Hugging Face parquet encoding of an image
PNG_BASE64 = base64.b64encode(PNG).decode()


def rlhf_v_row(index: int, image: Any, question: str = "What is shown?") -> dict[str, Any]:
    """A row as in openbmb/RLHF-V-Dataset: the texts are one JSON string."""
    text = json.dumps({"question": question, "chosen": f"Answer {index}.", "rejected": f"Wrong answer {index}."})
    return {"image": image, "text": text, "idx": index, "origin_dataset": "synthetic", "image_path": f"{index}.png"}


def rlaif_v_row(index: int, image: Any) -> dict[str, Any]:
    """A row as in openbmb/RLAIF-V-Dataset: one column per text."""
    return {
        "ds_name": "synthetic",
        "image": image,
        "question": f"Question {index}?",
        "chosen": f"Answer {index}.",
        "rejected": f"Wrong answer {index}.",
        "origin_dataset": "synthetic",
        "idx": str(index),
        "image_path": f"{index}.png",
    }


def pair(question: str, chosen: str, rejected: str, image: str) -> dict[str, Any]:
    return {
        "conversations": [{"from": "human", "value": question}],
        "chosen": {"from": "gpt", "value": chosen},
        "rejected": {"from": "gpt", "value": rejected},
        "images": [image],
    }


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    schema = pa.schema([(key, IMAGE_STRUCT if key == "image" else pa.infer_type([rows[0][key]])) for key in rows[0]])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(row if isinstance(row, str) else json.dumps(row) + "\n" for row in rows))
    return path


def run_convert(*args: Any) -> int:
    return main(["convert", *map(str, args)])


def test_rlhf_v_parquet_shards(tmp_path, capsys):
    shard0 = write_parquet(
        tmp_path / "train-0.parquet",
        [rlhf_v_row(0, {"bytes": PNG, "path": "0.png"}), rlhf_v_row(1, {"bytes": JPEG, "path": None})],
    )
    shard1 = write_parquet(tmp_path / "train-1.parquet", [rlhf_v_row(2, PNG_STRUCT, "<image>\nWhy?")])
    out = tmp_path / "out"

    assert run_convert("rlhf-v", shard0, shard1, "--output-dir", out) == 0

    assert json.loads((out / "rlhf_v.json").read_text()) == [
        pair("<image>What is shown?", "Answer 0.", "Wrong answer 0.", "images/rlhf_v_00000000.png"),
        pair("<image>What is shown?", "Answer 1.", "Wrong answer 1.", "images/rlhf_v_00000001.jpg"),
        pair("<image>\nWhy?", "Answer 2.", "Wrong answer 2.", "images/rlhf_v_00000002.png"),
    ]
    for name, data, image_format in [("00000000.png", PNG, "PNG"), ("00000001.jpg", JPEG, "JPEG")]:
        assert (out / "images" / f"rlhf_v_{name}").read_bytes() == data  # written as given, not re-encoded
        with Image.open(out / "images" / f"rlhf_v_{name}") as image:
            assert image.format == image_format and image.size == (8, 8)
    assert json.loads((out / "dataset_info.json").read_text()) == {"rlhf_v_local": ENTRY}
    stdout = capsys.readouterr().out
    assert "Wrote 3 pairs" in stdout
    assert f"dataset: rlhf_v_local\n  dataset_dir: {out.resolve()}" in stdout
    assert sorted(path.name for path in out.iterdir()) == ["dataset_info.json", "images", "rlhf_v.json"]


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_rlaif_v_image_encodings(tmp_path, suffix):
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.png").write_bytes(PNG)
    b64 = base64.b64encode(JPEG).decode()
    images = [
        "pics/a.png",  # a path relative to the input file
        str(tmp_path / "pics" / "a.png"),  # an absolute path
        b64,  # base64
        f"data:image/jpeg;base64,{b64}",  # a data URI
        {"bytes": b64, "path": "ignored.png"},  # the parquet struct as JSON: bytes as base64
        {"bytes": None, "path": "pics/a.png"},  # the parquet struct without bytes
    ]
    rows = [rlaif_v_row(index, image) for index, image in enumerate(images)]
    source = tmp_path / f"rlaif{suffix}"
    if suffix == ".jsonl":
        write_jsonl(source, rows)
    else:
        source.write_text(json.dumps(rows))
    out = tmp_path / "out"

    assert run_convert("rlaif-v", source, "--output-dir", out, "--name", "mine") == 0

    expected_bytes = [PNG, PNG, JPEG, JPEG, JPEG, PNG]
    written = json.loads((out / "rlaif_v.json").read_text())
    assert len(written) == len(images)
    for index, (row, data) in enumerate(zip(written, expected_bytes, strict=True)):
        image = f"images/rlaif_v_{index:08d}.{'png' if data == PNG else 'jpg'}"
        assert row == pair(f"<image>Question {index}?", f"Answer {index}.", f"Wrong answer {index}.", image)
        assert (out / row["images"][0]).read_bytes() == data
    assert json.loads((out / "dataset_info.json").read_text()) == {"mine": {**ENTRY, "file_name": "rlaif_v.json"}}


def test_merges_into_existing_dataset_info(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    other = {"file_name": "other.json", "formatting": "sharegpt"}
    (out / "dataset_info.json").write_text(json.dumps({"other": other}))
    rlhf = write_jsonl(tmp_path / "rlhf.jsonl", [rlhf_v_row(0, PNG_BASE64)])
    rlaif = write_jsonl(tmp_path / "rlaif.jsonl", [rlaif_v_row(0, PNG_BASE64)])

    assert run_convert("rlhf-v", rlhf, "--output-dir", out) == 0
    assert run_convert("rlaif-v", rlaif, "--output-dir", out) == 0

    info = json.loads((out / "dataset_info.json").read_text())
    assert info == {"other": other, "rlhf_v_local": ENTRY, "rlaif_v_local": {**ENTRY, "file_name": "rlaif_v.json"}}
    assert sorted(path.name for path in (out / "images").iterdir()) == ["rlaif_v_00000000.png", "rlhf_v_00000000.png"]


def test_limit(tmp_path, capsys):
    source = write_parquet(tmp_path / "rlaif.parquet", [rlaif_v_row(i, PNG_STRUCT) for i in range(5)])
    out = tmp_path / "out"

    assert run_convert("rlaif-v", source, "--output-dir", out, "--limit", "2") == 0

    written = json.loads((out / "rlaif_v.json").read_text())
    assert [row["chosen"]["value"] for row in written] == ["Answer 0.", "Answer 1."]
    assert len(list((out / "images").iterdir())) == 2
    assert "Wrote 2 pairs" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # argparse refuses --limit 0
        run_convert("rlaif-v", source, "--output-dir", out, "--limit", "0")


def rlhf_text(**texts: Any) -> str:
    return json.dumps({"question": "Q?", "chosen": "A.", "rejected": "B.", **texts})


BAD_ROWS = {
    "text not JSON": ("rlhf-v", {"text": "{question: Q?"}, 'field "text" is not valid JSON (Expecting property name'),
    "text lacks a key": (
        "rlhf-v",
        {"text": json.dumps({"question": "Q?", "chosen": "A."})},
        'field "text.rejected" is missing',
    ),
    "no text": ("rlhf-v", {"text": None}, 'field "text" is missing'),
    "empty question": ("rlhf-v", {"text": rlhf_text(question="  ")}, 'field "text.question" is empty'),
    "two placeholders": (
        "rlhf-v",
        {"text": rlhf_text(question="<image><image>Q?")},
        'field "text.question" holds 2 <image> placeholders',
    ),
    "no chosen": ("rlaif-v", {"chosen": None}, 'field "chosen" is missing'),
    "empty rejected": ("rlaif-v", {"rejected": ""}, 'field "rejected" is empty'),
    "number question": ("rlaif-v", {"question": 7}, 'field "question" must be a string, not int'),
    "no image": ("rlaif-v", {"image": None}, 'field "image" is missing'),
    "image bytes not an image": (
        "rlaif-v",
        {"image": {"bytes": base64.b64encode(b"x" * 64).decode(), "path": None}},
        'field "image" is not a readable image (cannot identify image file',
    ),
    "truncated png": ("rlaif-v", {"image": base64.b64encode(PNG[:-20]).decode()}, 'field "image" is not a readable'),
    "image file missing": ("rlaif-v", {"image": "pics/nope.png"}, 'field "image" points to '),
    "image struct empty": ("rlaif-v", {"image": {"bytes": None, "path": None}}, 'field "image" has neither'),
    "image not base64": ("rlaif-v", {"image": "!" * 60}, 'field "image" is neither base64 data nor the path'),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_row_names_file_row_and_field(tmp_path, capsys, case):
    dataset, change, message = BAD_ROWS[case]
    make_row = rlhf_v_row if dataset == "rlhf-v" else rlaif_v_row
    rows = [make_row(index, PNG_BASE64) for index in range(3)]
    rows[1].update(change)
    source = write_jsonl(tmp_path / "bad.jsonl", rows)
    out = tmp_path / "out"

    assert run_convert(dataset, source, "--output-dir", out) == 1

    stderr = capsys.readouterr().err
    assert stderr.startswith(f"tpo-plugin convert: error: {source} row 1: {message}"), stderr
    assert "Traceback" not in stderr
    # Nothing is left (row 0's image removed again): no pairs JSON, not even a temporary one, no dataset_info.json.
    assert [path.name for path in out.iterdir()] == []  # a failed conversion leaves nothing behind, not even images/
    assert not (out / "images").exists()  # row 0's image, written before row 1 failed, was removed


def test_bad_parquet_row_is_counted_within_its_file(tmp_path, capsys):
    good = write_parquet(tmp_path / "a.parquet", [rlhf_v_row(i, PNG_STRUCT) for i in range(2)])
    rows = [rlhf_v_row(i, PNG_STRUCT) for i in range(3)]
    rows[2]["image"] = {"bytes": b"not an image", "path": "x.png"}
    bad = write_parquet(tmp_path / "b.parquet", rows)

    assert run_convert("rlhf-v", good, bad, "--output-dir", tmp_path / "out") == 1

    assert f'{bad} row 2: field "image" is not a readable image' in capsys.readouterr().err


def test_parquet_without_a_column(tmp_path, capsys):
    source = tmp_path / "rlaif.parquet"
    pq.write_table(pa.table({"image": pa.array([PNG_STRUCT], IMAGE_STRUCT), "question": ["Q?"]}), source)

    assert run_convert("rlaif-v", source, "--output-dir", tmp_path / "out") == 1

    assert f'{source} row 0: field "chosen" is missing' in capsys.readouterr().err


def test_skip_bad_rows(tmp_path, capsys):
    rows = [
        rlaif_v_row(0, PNG_BASE64),
        "{bad\n",
        rlaif_v_row(2, PNG_BASE64),
        rlaif_v_row(3, None),
        rlaif_v_row(4, PNG_BASE64),
    ]
    source = write_jsonl(tmp_path / "rlaif.jsonl", rows)
    out = tmp_path / "out"

    assert run_convert("rlaif-v", source, "--output-dir", out, "--skip-bad-rows") == 0

    written = json.loads((out / "rlaif_v.json").read_text())
    assert [row["chosen"]["value"] for row in written] == ["Answer 0.", "Answer 2.", "Answer 4."]
    assert [row["images"] for row in written] == [[f"images/rlaif_v_0000000{i}.png"] for i in range(3)]
    captured = capsys.readouterr()
    assert f"skipped {source} row 1: is not valid JSON" in captured.err
    assert f'skipped {source} row 3: field "image" is missing' in captured.err
    assert "Skipped 2 bad row(s)" in captured.err
    assert "Wrote 3 pairs" in captured.out


def test_all_rows_bad_writes_nothing(tmp_path, capsys):
    source = write_jsonl(tmp_path / "rlaif.jsonl", [rlaif_v_row(0, None)])

    assert run_convert("rlaif-v", source, "--output-dir", tmp_path / "out", "--skip-bad-rows") == 1

    assert (
        f'no pairs to write (the first bad row: {source} row 0: field "image" is missing)' in capsys.readouterr().err
    )
    assert not (tmp_path / "out" / "rlaif_v.json").exists()


def test_identical_answers_are_kept_with_a_warning(tmp_path, capsys):
    row = rlaif_v_row(0, PNG_BASE64)
    row["rejected"] = row["chosen"]
    source = write_jsonl(tmp_path / "rlaif.jsonl", [rlaif_v_row(1, PNG_BASE64), row])

    assert run_convert("rlaif-v", source, "--output-dir", tmp_path / "out") == 0

    assert len(json.loads((tmp_path / "out" / "rlaif_v.json").read_text())) == 2
    err = capsys.readouterr().err
    assert "1 pair(s) have the same chosen and rejected answer" in err and f"unless intended: {source} row 1" in err
    assert "positive margin and a non-zero gradient" in err and "teach nothing" not in err


def test_refuses_to_overwrite_without_flag(tmp_path, capsys):
    source = write_jsonl(tmp_path / "rlhf.jsonl", [rlhf_v_row(0, PNG_BASE64)])
    out = tmp_path / "out"
    assert run_convert("rlhf-v", source, "--output-dir", out) == 0
    before = (out / "rlhf_v.json").read_text()
    write_jsonl(source, [rlhf_v_row(7, PNG_BASE64)])

    assert run_convert("rlhf-v", source, "--output-dir", out) == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert (out / "rlhf_v.json").read_text() == before

    assert run_convert("rlhf-v", source, "--output-dir", out, "--overwrite") == 0
    assert json.loads((out / "rlhf_v.json").read_text())[0]["chosen"]["value"] == "Answer 7."


def folder_contents(folder: Path) -> dict[str, Any]:
    """Every file's bytes and every folder (None) under ``folder``, hidden ones included, by relative path."""
    return {str(path.relative_to(folder)): path.read_bytes() if path.is_file() else None for path in folder.rglob("*")}


def test_failed_overwrite_leaves_the_earlier_conversion_as_it_was(tmp_path, capsys):
    source = write_jsonl(tmp_path / "old.jsonl", [rlhf_v_row(index, PNG_BASE64) for index in range(3)])
    out = tmp_path / "out"
    assert run_convert("rlhf-v", source, "--output-dir", out) == 0
    before = folder_contents(out)
    # Rows 0 and 1 are good, with other images of the same names: written before row 2 fails, they must replace none.
    green = base64.b64encode(encoded_image((30, 200, 30))).decode()
    rows = [rlhf_v_row(index, green) for index in range(3)]
    rows[2]["text"] = "not json"
    bad = write_jsonl(tmp_path / "new.jsonl", rows)
    capsys.readouterr()

    assert run_convert("rlhf-v", bad, "--output-dir", out, "--overwrite") == 1

    assert capsys.readouterr().err == (
        f'tpo-plugin convert: error: {bad} row 2: field "text" is not valid JSON '
        "(Expecting value: line 1 column 1 (char 0))\n"
    )
    assert folder_contents(out) == before  # byte for byte, and no temporary folder left
    for pair_row in json.loads((out / "rlhf_v.json").read_text()):
        assert (out / pair_row["images"][0]).read_bytes() == PNG

    # A successful overwrite with fewer rows replaces the earlier images and leaves none of them behind.
    one = write_jsonl(tmp_path / "one.jsonl", [rlhf_v_row(0, base64.b64encode(JPEG).decode())])
    assert run_convert("rlhf-v", one, "--output-dir", out, "--overwrite") == 0
    assert sorted(path.name for path in (out / "images").iterdir()) == ["rlhf_v_00000000.jpg"]
    assert json.loads((out / "rlhf_v.json").read_text())[0]["images"] == ["images/rlhf_v_00000000.jpg"]


def test_refuses_to_overwrite_its_own_input(tmp_path, capsys):
    out = tmp_path / "out"
    source = write_jsonl(tmp_path / "rows.jsonl", [rlhf_v_row(0, PNG_BASE64)])
    assert run_convert("rlhf-v", source, "--output-dir", out) == 0
    before = folder_contents(out)
    capsys.readouterr()

    assert run_convert("rlhf-v", out / "rlhf_v.json", "--output-dir", out, "--overwrite") == 1

    assert capsys.readouterr().err == (
        f"tpo-plugin convert: error: {out / 'rlhf_v.json'} is both an input and the pairs JSON written; "
        "choose another --output-dir\n"
    )
    assert folder_contents(out) == before


def test_refuses_an_output_dir_that_is_a_file(tmp_path, capsys):
    source = write_jsonl(tmp_path / "rows.jsonl", [rlhf_v_row(0, PNG_BASE64)])

    assert run_convert("rlhf-v", source, "--output-dir", source / "out") == 1

    assert capsys.readouterr().err == (
        f"tpo-plugin convert: error: --output-dir {source / 'out'}: {source} is a file, not a folder\n"
    )


def test_refuses_to_replace_another_dataset_of_the_same_name(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "dataset_info.json").write_text(json.dumps({"rlhf_v_local": {"file_name": "mine.json"}}))
    source = write_jsonl(tmp_path / "rlhf.jsonl", [rlhf_v_row(0, PNG_BASE64)])

    assert run_convert("rlhf-v", source, "--output-dir", out) == 1

    assert "already has a different dataset 'rlhf_v_local'" in capsys.readouterr().err
    assert not (out / "rlhf_v.json").exists()


def test_interrupted_run_leaves_no_json(tmp_path, monkeypatch):
    rows = [rlhf_v_row(index, PNG_BASE64) for index in range(3)]
    source = write_jsonl(tmp_path / "rlhf.jsonl", rows)
    calls = []

    def checked_image_then_interrupt(data):
        calls.append(data)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return convert.EncodedImage(data, "png")

    monkeypatch.setattr(convert, "_checked_image", checked_image_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        convert.convert("rlhf-v", [source], tmp_path / "out")

    assert [
        path.name for path in (tmp_path / "out").iterdir()
    ] == []  # a failed conversion leaves nothing behind, not even images/


@pytest.mark.parametrize(
    "inputs, message",
    [(["missing.jsonl"], "missing.jsonl: no such file"), (["rows.csv"], "rows.csv: unsupported file type")],
)
def test_bad_input_files(tmp_path, capsys, inputs, message):
    (tmp_path / "rows.csv").write_text("a,b\n")

    assert run_convert("rlhf-v", *[tmp_path / name for name in inputs], "--output-dir", tmp_path / "out") == 1

    assert message in capsys.readouterr().err


def test_module_entry_point_exits_non_zero_without_traceback(tmp_path):
    rows = [rlhf_v_row(0, PNG_BASE64) | {"text": "not json"}]
    source = write_jsonl(tmp_path / "rlhf.jsonl", rows)
    command = [sys.executable, "-m", "tpo_plugin", "convert", "rlhf-v", str(source), "--output-dir", str(tmp_path)]

    result = subprocess.run(command, capture_output=True, text=True, timeout=60)

    assert result.returncode == 1
    assert result.stderr == f'tpo-plugin convert: error: {source} row 0: field "text" is not valid JSON ' + (
        "(Expecting value: line 1 column 1 (char 0))\n"
    )


def test_output_loads_in_llamafactory(tmp_path, model_dirs):
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.data.parser import get_dataset_list
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    source = write_parquet(tmp_path / "rlhf.parquet", [rlhf_v_row(i, PNG_STRUCT) for i in range(2)])
    out = tmp_path / "out"
    assert run_convert("rlhf-v", source, "--output-dir", out) == 0

    (attr,) = get_dataset_list(["rlhf_v_local"], str(out))
    assert (attr.load_from, attr.formatting, attr.ranking, attr.images) == ("file", "sharegpt", True, "images")

    model_args, data_args, training_args, _, _ = get_train_args(
        {
            "model_name_or_path": str(model_dirs["qwen2_vl"]),
            "stage": "dpo",
            "do_train": True,
            "dataset": "rlhf_v_local",
            "dataset_dir": str(out),
            "template": "qwen2_vl",
            "cutoff_len": 256,
            "output_dir": str(tmp_path / "run"),
            "cache_dir": str(tmp_path / "cache"),
            "report_to": "none",
        }
    )
    modules = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(modules["tokenizer"], data_args)
    train = get_dataset(template, model_args, data_args, training_args, stage="rm", **modules)["train_dataset"]
    assert len(train) == 2
    assert [len(images) for images in train["images"]] == [1, 1]  # each pair's image was found and read
