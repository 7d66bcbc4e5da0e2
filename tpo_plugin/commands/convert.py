"""``tpo-plugin convert``: RLHF-V / RLAIF-V files to LLaMA-Factory's sharegpt preference format.

The two datasets are published as parquet shards whose rows hold an encoded image and the question,
chosen and rejected answers (RLHF-V packs the three texts into one JSON string). LLaMA-Factory wants a
JSON list of sharegpt pairs with image *paths*, declared in a ``dataset_info.json``. This command reads
the rows (parquet in record batches, or JSON lines, or a JSON list), writes each image once, byte for
byte, under ``OUTPUT_DIR/images/``, and writes the pairs and the ``dataset_info.json`` entry next to them.

Every row is checked before anything of it is written, and a bad row is reported with its file, its
0-based index in that file and the field at fault. Images and pairs JSON are written into a hidden folder
next to them and moved into place only once complete, so a failed conversion leaves an earlier one exactly
as it was, and a file with the final name is always a finished conversion.

Only the standard library is imported here; pyarrow, PIL and tqdm are imported when a conversion runs,
so that ``tpo-plugin --help`` stays instant.
"""

import argparse
import base64
import binascii
import contextlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, TextIO, Union

from . import file_in_the_way


IMAGE_TOKEN = "<image>"  # LLaMA-Factory's default image placeholder
IMAGE_DIR = "images"
PARQUET_BATCH_ROWS = 64  # rows of encoded images held in memory at once
# The shortest image files PIL reads (a 1x1 GIF, PNG) take 35 bytes or more, that is 48 base64 characters:
# a shorter string can only be a path.
MIN_BASE64_IMAGE_CHARS = 48
MEMORY_ADDRESS = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")  # PIL names the BytesIO it could not read
EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "GIF": "gif", "WEBP": "webp", "BMP": "bmp", "TIFF": "tiff"}


class ConversionError(Exception):
    """A problem in the input or the output folder that the user has to fix; the CLI prints it, no traceback."""


class FieldError(Exception):
    """What is wrong with one row (``field`` None: with the row as a whole); the caller adds file and index."""

    def __init__(self, field: Optional[str], problem: str):
        super().__init__(problem)
        self.field = field
        self.problem = problem


class BadRowError(ConversionError):
    """A :class:`FieldError` located in the input: ``rlhf_v.parquet row 17: field "text" is not valid JSON``."""

    def __init__(self, source: Path, row: int, error: FieldError):
        where = f"{source} row {row}"
        super().__init__(
            f'{where}: field "{error.field}" {error.problem}' if error.field else f"{where}: {error.problem}"
        )


# ---------------------------------------------------------------------------------------------------------
# The two datasets: which columns hold what


def _text(container: dict[str, Any], key: str, name: str) -> str:
    """``container[key]`` as a non-blank string: an empty answer would train on nothing."""
    if container.get(key) is None:
        raise FieldError(name, "is missing")
    value = container[key]
    if not isinstance(value, str):
        raise FieldError(name, f"must be a string, not {type(value).__name__}")
    if not value.strip():
        raise FieldError(name, "is empty")
    return value


def _rlhf_v_texts(row: dict[str, Any]) -> tuple[str, str, str]:
    """RLHF-V keeps question, chosen and rejected in one JSON string, the ``text`` column."""
    text = row.get("text")
    if text is None:
        raise FieldError("text", "is missing")
    if isinstance(text, str):
        try:
            text = json.loads(text)
        except json.JSONDecodeError as err:
            raise FieldError("text", f"is not valid JSON ({err})") from None
    if not isinstance(text, dict):
        raise FieldError("text", f"must hold a JSON object, not {type(text).__name__}")
    return tuple(_text(text, key, f"text.{key}") for key in ("question", "chosen", "rejected"))


def _rlaif_v_texts(row: dict[str, Any]) -> tuple[str, str, str]:
    """RLAIF-V has one column per text."""
    return tuple(_text(row, key, key) for key in ("question", "chosen", "rejected"))


@dataclass(frozen=True)
class Format:
    stem: str  # of the pairs JSON and of the image names; also the default dataset name, plus "_local"
    columns: tuple[str, ...]  # the only columns read from parquet (the others are ignored)
    question_field: str  # as named in error messages
    texts: Callable[[dict[str, Any]], tuple[str, str, str]]  # question, chosen, rejected


FORMATS = {
    "rlhf-v": Format("rlhf_v", ("image", "text"), "text.question", _rlhf_v_texts),
    "rlaif-v": Format("rlaif_v", ("image", "question", "chosen", "rejected"), "question", _rlaif_v_texts),
}


# ---------------------------------------------------------------------------------------------------------
# Images


@dataclass(frozen=True)
class EncodedImage:
    data: bytes
    extension: str


def _read_image_file(path: Path) -> bytes:
    if not os.path.isfile(path):  # os.path, unlike Path.is_file, also says False for over-long names
        raise FieldError("image", f"points to {path}, which does not exist")
    try:
        return path.read_bytes()
    except OSError as err:
        raise FieldError("image", f"cannot be read from {path} ({err.strerror})") from None


def _decode_base64(value: str) -> bytes:
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except binascii.Error as err:
        raise FieldError("image", f"is not valid base64 ({err})") from None


def _image_string(value: str, base_dir: Path) -> bytes:
    """A string is a data URI, a path to an existing file, or base64 data, in this order of preference."""
    if value.startswith("data:"):
        return _decode_base64(value.partition(",")[2])
    path = base_dir / value
    if len(value) < MIN_BASE64_IMAGE_CHARS or os.path.isfile(path):
        return _read_image_file(path)
    try:
        return _decode_base64(value)
    except FieldError:
        raise FieldError("image", f"is neither base64 data nor the path of a file ({path} does not exist)") from None


def _image_bytes(value: Any, base_dir: Path) -> bytes:
    """The encoded image, from any of the encodings the datasets' copies use; paths are relative to the input."""
    if isinstance(value, dict):  # Hugging Face's Image feature: {"bytes": ..., "path": ...}
        data, path = value.get("bytes"), value.get("path")
        if data is not None:
            return _decode_base64(data) if isinstance(data, str) else bytes(data)  # JSON can only hold base64
        if path:
            return _read_image_file(base_dir / path)
        raise FieldError("image", 'has neither "bytes" nor "path"')
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        return _image_string(value, base_dir)
    if value is None:
        raise FieldError("image", "is missing")
    raise FieldError("image", f"must be bytes, a string or a {{bytes, path}} object, not {type(value).__name__}")


def _checked_image(data: bytes) -> EncodedImage:
    """Let PIL identify and verify the bytes, so that training never meets an image it cannot open."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image_format = image.format
            image.verify()
    except Exception as err:  # PIL raises OSError, SyntaxError, struct.error, ... for bad data
        raise FieldError("image", f"is not a readable image ({MEMORY_ADDRESS.sub('', str(err))})") from None
    return EncodedImage(data, EXTENSIONS.get(image_format, image_format.lower()))


# ---------------------------------------------------------------------------------------------------------
# Reading rows

# A row, or the FieldError saying why a JSON line is no row, so that it is reported (or skipped) like any bad row.
RowOrError = Union[dict[str, Any], FieldError]


def _parquet_rows(path: Path, columns: tuple[str, ...]) -> Iterator[RowOrError]:
    """Batch by batch, and only the columns used: the shards of these datasets are hundreds of MB of images."""
    parquet = _open_parquet(path)
    present = [column for column in columns if column in parquet.schema_arrow.names]  # absent: missing fields
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=present):
        yield from batch.to_pylist()


def _jsonl_rows(path: Path) -> Iterator[RowOrError]:
    """Line by line; blank lines are no rows."""
    with path.open(encoding="utf-8") as file:
        for line in file:
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as err:
                yield FieldError(None, f"is not valid JSON ({err})")


def _json_rows(path: Path) -> Iterator[RowOrError]:
    """A JSON list cannot be read piecewise with the standard library; one file is loaded at a time."""
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConversionError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(rows, list):
        raise ConversionError(f"{path}: expected a JSON list of rows, found a {type(rows).__name__}")
    yield from rows


def _open_parquet(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise ConversionError(f"{path}: cannot be read as parquet ({err})") from None


SUFFIXES = (".parquet", ".jsonl", ".json")


def _rows(path: Path, columns: tuple[str, ...]) -> Iterator[RowOrError]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _parquet_rows(path, columns)
    return _jsonl_rows(path) if suffix == ".jsonl" else _json_rows(path)


def _check_inputs(inputs: list[Path]) -> Optional[int]:
    """Refuse missing or unsupported files before writing anything; return the number of rows if cheap to know."""
    total: Optional[int] = 0
    for path in inputs:
        if not path.is_file():
            raise ConversionError(f"{path}: no such file")
        if path.suffix.lower() not in SUFFIXES:
            raise ConversionError(f"{path}: unsupported file type; expected one of {', '.join(SUFFIXES)}")
        if path.suffix.lower() == ".parquet":  # also catches a corrupt file before anything is written
            rows = _open_parquet(path).metadata.num_rows
            total = None if total is None else total + rows
        else:
            total = None
    return total


# ---------------------------------------------------------------------------------------------------------
# Converting and writing


def _pair(fmt: Format, row: RowOrError, base_dir: Path) -> tuple[dict[str, Any], EncodedImage]:
    """The sharegpt pair and the image of one row (its ``images`` entry is filled in once named)."""
    if isinstance(row, FieldError):
        raise row
    if not isinstance(row, dict):
        raise FieldError(None, f"must be an object, not {type(row).__name__}")
    question, chosen, rejected = fmt.texts(row)
    tokens = question.count(IMAGE_TOKEN)
    if tokens > 1:
        raise FieldError(fmt.question_field, f"holds {tokens} {IMAGE_TOKEN} placeholders for the row's one image")
    image = _checked_image(_image_bytes(row.get("image"), base_dir))
    pair = {
        "conversations": [{"from": "human", "value": question if tokens else IMAGE_TOKEN + question}],
        "chosen": {"from": "gpt", "value": chosen},
        "rejected": {"from": "gpt", "value": rejected},
    }
    return pair, image


def dataset_info_entry(file_name: str) -> dict[str, Any]:
    return {
        "file_name": file_name,
        "ranking": True,
        "formatting": "sharegpt",
        "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected", "images": "images"},
    }


@contextlib.contextmanager
def _atomic_text_file(path: Path) -> Iterator[TextIO]:
    """Write a temporary file next to ``path`` and rename it over ``path`` only when the block succeeds."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with temporary.open("w", encoding="utf-8") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:  # also on Ctrl-C: leave no temporary file behind
        temporary.unlink(missing_ok=True)
        raise


def _read_dataset_info(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConversionError(f"{path}: not valid JSON ({err}); fix or remove it") from None
    if not isinstance(info, dict):
        raise ConversionError(f"{path}: expected a JSON object of datasets, found a {type(info).__name__}")
    return info


def _check_outputs(
    json_path: Path, info_path: Path, name: str, entry: dict[str, Any], overwrite: bool, inputs: list[Path]
) -> None:
    """Refuse, before reading any row, to replace earlier work that ``--overwrite`` did not allow to replace."""
    blocking = file_in_the_way(json_path.parent)
    if blocking is not None:
        raise ConversionError(f"--output-dir {json_path.parent}: {blocking} is a file, not a folder")
    for path in inputs:  # --overwrite would replace the input with its pairs, and its other columns would be lost
        if path.resolve() == json_path.resolve():
            raise ConversionError(f"{path} is both an input and the pairs JSON written; choose another --output-dir")
    if json_path.exists() and not overwrite:
        raise ConversionError(f"{json_path} already exists; pass --overwrite to replace it")
    existing = _read_dataset_info(info_path).get(name)
    if existing is not None and existing != entry and not overwrite:
        raise ConversionError(
            f"{info_path} already has a different dataset {name!r}; pass --name to choose another name "
            "or --overwrite to replace it"
        )


@dataclass
class Summary:
    json_path: Path
    name: str
    entry: dict[str, Any]
    written: int = 0
    skipped: list[str] = field(default_factory=list)  # messages of the bad rows skipped
    identical: list[str] = field(default_factory=list)  # "file row N" of pairs whose two answers are the same


def _located_rows(inputs: list[Path], columns: tuple[str, ...]) -> Iterator[tuple[Path, int, RowOrError]]:
    for path in inputs:
        for index, row in enumerate(_rows(path, columns)):
            yield path, index, row


def _write_pairs(
    file: TextIO,
    rows: Iterable[tuple[Path, int, RowOrError]],
    fmt: Format,
    folder: Path,
    summary: Summary,
    limit: Optional[int],
    skip_bad_rows: bool,
) -> None:
    """Write each good row's image under ``folder``, then its pair as one line of the JSON list in ``file``."""
    file.write("[")
    for source, index, row in rows:
        try:
            pair, image = _pair(fmt, row, source.parent)
        except FieldError as err:
            bad_row = BadRowError(source, index, err)
            if not skip_bad_rows:
                raise bad_row from None
            summary.skipped.append(str(bad_row))
            continue
        image_name = f"{IMAGE_DIR}/{fmt.stem}_{summary.written:08d}.{image.extension}"
        (folder / image_name).write_bytes(image.data)
        pair["images"] = [image_name]
        file.write(("," if summary.written else "") + "\n" + json.dumps(pair, ensure_ascii=False))
        if pair["chosen"]["value"].strip() == pair["rejected"]["value"].strip():
            summary.identical.append(f"{source} row {index}")
        summary.written += 1
        if summary.written == limit:
            break
    if not summary.written:  # LLaMA-Factory cannot train on an empty dataset
        reason = f"the first bad row: {summary.skipped[0]}" if summary.skipped else "the input files hold no rows"
        raise ConversionError(f"no pairs to write ({reason})")
    file.write("\n]\n")


def _move_into_place(staging: Path, output_dir: Path, json_path: Path, stem: str) -> None:
    """Replace the earlier conversion (if any) with the complete one in ``staging``.

    The old pairs JSON goes first and the new one comes last, so that no pairs JSON ever points at images of
    another conversion; only renames happen in between.
    """
    json_path.unlink(missing_ok=True)
    image_dir = output_dir / IMAGE_DIR
    image_dir.mkdir(exist_ok=True)
    new_images = sorted((staging / IMAGE_DIR).iterdir())
    stale = {path.name for path in image_dir.glob(f"{stem}_*")} - {path.name for path in new_images}
    for name in stale:  # images of the earlier conversion that no new one replaces (it had more rows)
        if re.fullmatch(rf"{stem}_\d{{8}}\.\w+", name):  # only the names this command gives
            (image_dir / name).unlink()
    for image in new_images:
        os.replace(image, image_dir / image.name)
    os.replace(staging / json_path.name, json_path)


def convert(
    dataset: str,
    inputs: list[Union[str, Path]],
    output_dir: Union[str, Path],
    *,
    name: Optional[str] = None,
    limit: Optional[int] = None,
    overwrite: bool = False,
    skip_bad_rows: bool = False,
) -> Summary:
    """Convert ``inputs`` (files of ``dataset``, a key of :data:`FORMATS`) into ``output_dir``.

    Raises :class:`ConversionError` (a :class:`BadRowError` for a bad row unless ``skip_bad_rows``), in
    which case ``output_dir`` is left as it was (an earlier conversion there included).
    """
    from tqdm import tqdm

    fmt = FORMATS[dataset]
    inputs, output_dir = [Path(path) for path in inputs], Path(output_dir)
    summary = Summary(
        output_dir / f"{fmt.stem}.json", name or f"{fmt.stem}_local", dataset_info_entry(f"{fmt.stem}.json")
    )
    info_path = output_dir / "dataset_info.json"
    total = _check_inputs(inputs)
    _check_outputs(summary.json_path, info_path, summary.name, summary.entry, overwrite, inputs)

    if limit is not None:  # the bar's end; without parquet's row counts a guess
        total = limit if total is None else min(total, limit)
    # On stderr, and only once a conversion has taken a second: small conversions print no bar.
    rows = tqdm(_located_rows(inputs, fmt.columns), total=total, unit=" rows", delay=1.0)
    output_dir.mkdir(parents=True, exist_ok=True)  # it stays even if the conversion fails: the user named it
    # Inside OUTPUT_DIR, so that moving the files into place is a rename on the same file system.
    staging = Path(tempfile.mkdtemp(prefix=f".{fmt.stem}.", suffix=".tmp", dir=output_dir))
    try:
        (staging / IMAGE_DIR).mkdir()
        with rows, (staging / summary.json_path.name).open("w", encoding="utf-8") as file:
            _write_pairs(file, rows, fmt, staging, summary, limit, skip_bad_rows)
            file.flush()
            os.fsync(file.fileno())
        _move_into_place(staging, output_dir, summary.json_path, fmt.stem)
    finally:  # also on Ctrl-C: nothing half-written stays behind
        shutil.rmtree(staging, ignore_errors=True)

    info = _read_dataset_info(info_path)  # read again: merge into the file as it is now
    info[summary.name] = summary.entry
    with _atomic_text_file(info_path) as file:
        json.dump(info, file, indent=2, ensure_ascii=False)
        file.write("\n")
    return summary


# ---------------------------------------------------------------------------------------------------------
# Command line


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", choices=list(FORMATS), help="the format of the input files")
    parser.add_argument(
        "inputs",
        nargs="+",
        type=Path,
        metavar="INPUT",
        help="files of the dataset: .parquet (e.g. all shards), .jsonl or .json (a list of rows)",
    )
    parser.add_argument(
        "--output-dir", type=Path, required=True, help="where images/, the JSON and dataset_info.json go"
    )
    parser.add_argument("--name", help="dataset name in dataset_info.json (default: rlhf_v_local / rlaif_v_local)")
    parser.add_argument("--limit", type=_positive_int, metavar="N", help="stop after N pairs")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier conversion in --output-dir")
    parser.add_argument(
        "--skip-bad-rows", action="store_true", help="skip malformed rows and list them at the end instead of stopping"
    )


def _report(summary: Summary, output_dir: Path) -> None:
    for message in summary.skipped:
        print(f"skipped {message}", file=sys.stderr)
    if summary.skipped:
        print(f"Skipped {len(summary.skipped)} bad row(s), listed above.", file=sys.stderr)
    if summary.identical:
        print(
            f"Warning: {len(summary.identical)} pair(s) have the same chosen and rejected answer: they state no "
            "preference, yet stage tpo's asymmetric token weights still give them a positive margin and a non-zero "
            f"gradient (stage tpo refuses data with more than half such pairs); remove them unless intended: "
            f"{', '.join(summary.identical)}",
            file=sys.stderr,
        )
    print(f"Wrote {summary.written} pairs to {summary.json_path} (images in {output_dir / IMAGE_DIR}).")
    print(f"Train on them with:\n  dataset: {summary.name}\n  dataset_dir: {output_dir.resolve()}")


def run(args: argparse.Namespace) -> int:
    try:
        summary = convert(
            args.dataset,
            args.inputs,
            args.output_dir,
            name=args.name,
            limit=args.limit,
            overwrite=args.overwrite,
            skip_bad_rows=args.skip_bad_rows,
        )
    except (ConversionError, OSError) as err:  # OSError: e.g. a full disk or an output folder not writable
        print(f"tpo-plugin convert: error: {err}", file=sys.stderr)
        return 1
    _report(summary, args.output_dir)
    return 0
