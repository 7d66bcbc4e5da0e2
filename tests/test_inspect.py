"""``tpo-plugin inspect`` and ``tpo_log_tokens``: per-token visual scores and weights, checked independently.

The independent side encodes the pair with LLaMA-Factory's own pairwise collator and runs a plain
transformers model from the same directory on the clean and on the corrupted image (``corrupt_image`` with
the evaluation step key, or a white image), then takes raw target-token logits (docs/method.md §2–§3).
"""

import html
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from tpo_plugin.commands.cli import main as tpo_plugin_main
from tpo_plugin.method.noise import corrupt_image
from tpo_plugin.training.batch.keys import EVAL_STEP_KEY

from conftest import run_cli, run_command, train_config, train_logs, write_yaml


pytestmark = pytest.mark.e2e


def run_inspect(args: list[str], cwd) -> subprocess.CompletedProcess:
    result = run_command([sys.executable, "-m", "tpo_plugin", "inspect", *args], cwd, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def independent_token_scores(config: dict) -> dict[str, torch.Tensor]:
    """Per side of the dataset's only pair: ``z(token | clean) - z(token | corrupted)`` of each answer token."""
    from llamafactory.data import PairwiseDataCollatorWithPadding, get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    model_args, data_args, training_args, _, _ = get_train_args({**config, "output_dir": config["output_dir"] + "-x"})
    tokenizer_module = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
    (pair,) = get_dataset(template, model_args, data_args, training_args, stage="rm", **tokenizer_module)[
        "train_dataset"
    ]
    model = AutoModelForImageTextToText.from_pretrained(config["model_name_or_path"]).eval()
    collator = PairwiseDataCollatorWithPadding(
        template=template, model=model, label_pad_token_id=-100, **tokenizer_module
    )
    clean = Image.open(pair["images"][0]).convert("RGB")
    corrupted = corrupt_image(clean, config["tpo_corruption"], 500, config["seed"], EVAL_STEP_KEY)
    logits_by_image = []
    for image in (clean, corrupted):
        batch = collator([{**pair, "images": [image]}])
        labels = batch.pop("labels")
        with torch.no_grad():
            logits = model(**batch).logits
        sides = []
        for row in (0, 1):  # chosen, rejected
            positions = (labels[row, 1:] != -100).nonzero().squeeze(-1)
            sides.append(logits[row, positions, labels[row, 1:][positions]])
        logits_by_image.append(sides)
    return {side: logits_by_image[0][row] - logits_by_image[1][row] for row, side in enumerate(("chosen", "rejected"))}


@pytest.mark.parametrize("family, corruption", [("qwen2_vl", "diffusion"), ("llava", "blank")])
def test_inspect_scores_weights_and_report(family, corruption, model_dirs, dataset_dir, tmp_path):
    config = train_config(
        model_dirs[family], family, dataset_dir, tmp_path / "run", dataset="one_pair", tpo_corruption=corruption
    )
    recipe = write_yaml(tmp_path / "tpo.yaml", config)
    out = tmp_path / "inspect"
    result = run_inspect([str(recipe), "--output-dir", str(out), "--num-pairs", "5"], cwd=tmp_path)

    (record,) = [json.loads(line) for line in (out / "tokens.jsonl").read_text().splitlines()]  # 5 > 1 pair: all
    assert record["pair"] == 0 and record["image"][0].endswith("img/0.png")
    expected = independent_token_scores(config)
    for side, sign in (("chosen", 1), ("rejected", -1)):
        data = record[side]
        assert len(data["tokens"]) == len(data["visual_score"]) == len(data["weight"]) == len(data["logp"])
        assert data["visual_score"] == pytest.approx(expected[side].tolist(), abs=1e-3)
        assert max(abs(s) for s in data["visual_score"]) > 1e-3  # the corruption changes logits: the check has teeth
        assert data["weight"] == pytest.approx([0.5 + 1 / (1 + math.exp(-sign * s)) for s in data["visual_score"]])
        # a fresh LoRA adapter is zero: the reference (the adapter-disabled model) scores exactly like the policy
        assert data["reference"]["visual_score"] == pytest.approx(data["visual_score"], abs=1e-5)
    assert "".join(record["chosen"]["tokens"]).startswith("A ")
    assert "adapter disabled" in result.stdout

    page = (out / "report.html").read_text()
    assert "http://" not in page and "https://" not in page and "data:image/png;base64," in page
    for token in record["chosen"]["tokens"] + record["rejected"]["tokens"]:
        assert f">{html.escape(token)}</span>" in page


def test_inspect_with_preprocessing_workers_on_photo_sized_images(model_dirs, dataset_dir, tmp_path):
    # inspect runs the data checks (torch, several threads) before get_dataset forks its workers, as training does
    config = train_config(
        model_dirs["qwen2_vl"], "qwen2_vl", dataset_dir, tmp_path / "run", dataset="photo_pairs",
        preprocessing_num_workers=4, overwrite_cache=True,
    )  # fmt: skip
    out = tmp_path / "inspect"
    run_inspect(
        [str(write_yaml(tmp_path / "tpo.yaml", config)), "--output-dir", str(out), "--num-pairs", "2"], tmp_path
    )
    records = [json.loads(line) for line in (out / "tokens.jsonl").read_text().splitlines()]
    assert [record["pair"] for record in records] == [0, 1]
    assert records[0]["image"][0].endswith("img/photo0.png")


def test_logged_tokens_equal_the_steps_metrics_inspect_and_history(model_dirs, dataset_dir, tmp_path):
    # learning_rate 0: the weights never change, so the passes after each step see the model the step saw.
    output_dir = tmp_path / "run"
    config = train_config(
        model_dirs["qwen2_vl"], "qwen2_vl", dataset_dir, output_dir, dataset="one_pair", tpo_corruption="blank",
        per_device_train_batch_size=1, learning_rate=0.0, tpo_log_tokens=3,
    )  # fmt: skip
    recipe = write_yaml(tmp_path / "tpo.yaml", config)
    run_cli(["train", str(recipe)], cwd=tmp_path)
    logs = train_logs(output_dir)
    records = [json.loads(line) for line in (output_dir / "tpo_tokens.jsonl").read_text().splitlines()]
    assert [(r["step"], r["pair"], r["side"]) for r in records] == [
        (1, 0, "chosen"), (1, 0, "rejected"), (2, 0, "chosen"), (2, 0, "rejected"),
    ]  # fmt: skip
    for record in records:
        log = logs[record["step"] - 1]
        assert sum(record["visual_score"]) / len(record["tokens"]) == pytest.approx(
            log[f"tpo/score_{record['side']}"], rel=1e-4, abs=1e-6
        )
        assert sum(record["weight"]) / len(record["tokens"]) == pytest.approx(log[f"tpo/weight_{record['side']}"])

    out = tmp_path / "inspect"
    run_inspect([str(recipe), "--output-dir", str(out)], cwd=tmp_path)
    (inspected,) = [json.loads(line) for line in (out / "tokens.jsonl").read_text().splitlines()]
    assert inspected["chosen"]["visual_score"] == pytest.approx(records[0]["visual_score"], abs=1e-5)
    assert inspected["rejected"]["weight"] == pytest.approx(records[1]["weight"], abs=1e-5)

    assert tpo_plugin_main(["inspect", "--history", str(output_dir)]) == 0
    history = (output_dir / "history.html").read_text()
    assert "http://" not in history and history.count("<tr><td>2</td>") == 2  # step 2, chosen and rejected


def test_history_keeps_the_records_of_the_run_as_it_stands_after_resumes():
    from tpo_plugin.commands.token_report import records_of_the_current_run

    sides = ("chosen", "rejected")

    def records(*steps: int) -> list[dict]:  # "run": which of the logging calls wrote the record
        return [{"step": step, "pair": 0, "side": side, "run": i} for i, step in enumerate(steps) for side in sides]

    # logged at 5, 10, 15, 20; resumed from checkpoint-10: 15 and 20 again, then 25
    appended = records(5, 10, 15, 20, 15, 20, 25)
    kept = records_of_the_current_run(appended)
    assert [(r["step"], r["run"]) for r in kept] == [(s, i) for s, i in ((5, 0), (10, 1), (15, 4), (20, 5), (25, 6))
                                                      for _ in sides]  # fmt: skip
    # died at 23 after logging 20, resumed from checkpoint-20: nothing to replace
    assert records_of_the_current_run(records(5, 10, 15, 20, 25)) == records(5, 10, 15, 20, 25)
    # resumed from checkpoint-10 again, after a first resume had reached 25: 15 on belongs to the latest part
    twice = records_of_the_current_run(records(5, 10, 15, 20, 15, 20, 25, 15))
    assert [(r["step"], r["run"]) for r in twice] == [(5, 0), (5, 0), (10, 1), (10, 1), (15, 7), (15, 7)]


def test_tokens_logged_again_after_a_resume_are_kept_and_shown_once(model_dirs, dataset_dir, tmp_path):
    output_dir = tmp_path / "run"
    config = train_config(
        model_dirs["qwen2_vl"], "qwen2_vl", dataset_dir, output_dir, dataset="one_pair", per_device_train_batch_size=1,
        tpo_log_tokens=1, max_steps=4, save_strategy="steps", save_steps=2,
    )  # fmt: skip
    run_cli(["train", str(write_yaml(tmp_path / "a.yaml", config))], cwd=tmp_path)
    config["resume_from_checkpoint"] = str(output_dir / "checkpoint-2")  # as after a crash at step 3 or 4
    run_cli(["train", str(write_yaml(tmp_path / "b.yaml", config))], cwd=tmp_path)

    records = [json.loads(line) for line in (output_dir / "tpo_tokens.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 1, 2, 2, 3, 3, 4, 4, 3, 3, 4, 4]  # appended: nothing is lost
    for first, again in zip(records[4:8], records[8:], strict=True):  # same seed, same data: the same values
        assert again["weight"] == pytest.approx(first["weight"], abs=1e-5)
    assert tpo_plugin_main(["inspect", "--history", str(output_dir)]) == 0
    history = (output_dir / "history.html").read_text()
    assert [history.count(f"<tr><td>{step}</td>") for step in (1, 2, 3, 4)] == [2, 2, 2, 2]


def test_a_new_run_into_the_same_output_dir_sets_the_earlier_token_log_aside(model_dirs, dataset_dir, tmp_path):
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    earlier_log = "".join(json.dumps(token_record(step=1, tokens=["old"])) + "\n" for _ in range(2))
    (output_dir / "tpo_tokens.jsonl").write_text(earlier_log)  # an earlier run on other data, logged at step 1
    config = train_config(
        model_dirs["qwen2_vl"], "qwen2_vl", dataset_dir, output_dir, dataset="one_pair", per_device_train_batch_size=1,
        tpo_log_tokens=1, max_steps=4, logging_steps=2,
    )  # fmt: skip
    result = run_cli(["train", str(write_yaml(tmp_path / "new.yaml", config))], cwd=tmp_path)

    (set_aside,) = output_dir.glob("tpo_tokens.*.jsonl")
    assert set_aside.read_text() == earlier_log
    moved = f"the token log of the earlier run there, {output_dir / 'tpo_tokens.jsonl'}, was moved to {set_aside}"
    assert moved in result.stdout + result.stderr
    records = [json.loads(line) for line in (output_dir / "tpo_tokens.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [2, 2, 4, 4]
    assert tpo_plugin_main(["inspect", "--history", str(output_dir)]) == 0
    history = (output_dir / "history.html").read_text()
    assert [history.count(f"<tr><td>{step}</td>") for step in (1, 2, 4)] == [0, 2, 2]
    assert f"The run that wrote {output_dir / 'tpo_tokens.jsonl'}: 2 logged steps (2..4)." in history
    assert f"Earlier runs in {output_dir}, not shown here: {set_aside.name}." in history


def token_record(step: int, tokens: list[str], side: str = "chosen") -> dict:
    return {"step": step, "pair": 0, "side": side, "tokens": tokens, "visual_score": [0.5] * len(tokens),
            "weight": [1.2] * len(tokens)}  # fmt: skip


def test_set_aside_keeps_every_earlier_log_and_a_resume_keeps_its_own(tmp_path):
    from transformers import TrainingArguments

    from tpo_plugin.training.diagnostics.token_view import set_aside_earlier_token_log

    log = tmp_path / "tpo_tokens.jsonl"
    new_run = TrainingArguments(output_dir=str(tmp_path), do_train=True, report_to="none", use_cpu=True)
    resumed = TrainingArguments(
        output_dir=str(tmp_path), do_train=True, report_to="none", use_cpu=True,
        resume_from_checkpoint=str(tmp_path / "checkpoint-2"),
    )  # fmt: skip
    log.write_text("the resumed run's\n")
    assert set_aside_earlier_token_log(resumed) is None and log.read_text() == "the resumed run's\n"
    contents = ["first run\n", "second run\n"]
    for content in contents:  # the same modification time: the second must not replace the first
        log.write_text(content)
        os.utime(log, (1_700_000_000, 1_700_000_000))
        assert set_aside_earlier_token_log(new_run) is not None and not log.exists()
    assert sorted(path.read_text() for path in tmp_path.glob("tpo_tokens.*.jsonl")) == contents
    assert set_aside_earlier_token_log(new_run) is None  # nothing to set aside


def test_history_of_a_cut_off_log_shows_what_is_readable_and_escapes_every_field(tmp_path, capsys):
    records = [
        token_record(1, ["<b>A</b>", "ball"]),
        token_record(1, ["<script>alert(1)</script>"], side="<img src=x onerror=alert(2)>"),
        token_record(2, ["'quoted\" & more"]),
    ]
    log = tmp_path / "tpo_tokens.jsonl"
    log.write_text("".join(json.dumps(record) + "\n" for record in records) + json.dumps(records[0])[:40])

    assert tpo_plugin_main(["inspect", "--history", str(tmp_path)]) == 0
    error = capsys.readouterr().err
    assert f"Line 4 of {log} holds no token record (cut off by a crash?): left out." in error
    assert "Traceback" not in error
    history = (tmp_path / "history.html").read_text()
    assert "Line 4 of" in history and history.count("<tr><td>") == 3
    for raw in ("<b>A", "<script>", "<img src=x", "'quoted"):
        assert raw not in history
    for escaped in ("&lt;b&gt;A&lt;/b&gt;", "&lt;script&gt;alert(1)", "&lt;img src=x onerror=alert(2)", "&amp; more"):
        assert escaped in history

    log.write_text(json.dumps(records[0])[:40])  # nothing readable: refused, naming the line
    assert tpo_plugin_main(["inspect", "--history", str(tmp_path), "--overwrite"]) == 2
    assert f"Line 1 of {log} holds no token record" in capsys.readouterr().err


def test_tpo_log_tokens_off_writes_nothing(model_dirs, dataset_dir, tmp_path):
    output_dir = tmp_path / "run"
    config = train_config(
        model_dirs["llava"], "llava", dataset_dir, output_dir, dataset="one_pair", per_device_train_batch_size=1,
        max_steps=1,
    )  # fmt: skip
    run_cli(["train", str(write_yaml(tmp_path / "tpo.yaml", config))], cwd=tmp_path)
    assert train_logs(output_dir) and not (output_dir / "tpo_tokens.jsonl").exists()


def test_output_dir_that_is_a_file_is_refused_before_loading(tmp_path, capsys):
    recipe = write_yaml(tmp_path / "tpo.yaml", {"stage": "tpo", "model_name_or_path": str(tmp_path / "no_model")})
    (tmp_path / "tpo_tokens.jsonl").write_text("")
    taken = tmp_path / "report"
    taken.write_text("mine")
    for args in ([str(recipe)], ["--history", str(tmp_path)]):
        assert tpo_plugin_main(["inspect", *args, "--output-dir", str(taken)]) == 2
        error = capsys.readouterr().err
        assert error == f"tpo-plugin inspect: --output-dir {taken}: {taken} is a file, not a folder.\n"
    assert taken.read_text() == "mine"


def test_bad_input_is_refused_before_loading(dataset_dir, model_dirs, tmp_path, capsys):
    config = train_config(model_dirs["llava"], "llava", dataset_dir, tmp_path / "run")
    recipe = write_yaml(tmp_path / "tpo.yaml", config)
    dpo = write_yaml(tmp_path / "dpo.yaml", {**config, "stage": "dpo"})
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "report.html").write_text("previous")
    cases = [
        ([str(tmp_path / "missing.yaml")], "does not exist"),
        ([str(dpo)], "has `stage: dpo`; tpo-plugin inspect needs a `stage: tpo` recipe"),
        ([str(recipe), "--num-pairs", "0"], "--num-pairs must be at least 1, got 0"),
        ([str(recipe), "--split", "eval"], "--split eval, but"),
        ([str(recipe), "tpo_noise_step=1000"], "`tpo_noise_step` must be an integer in 0..999, got 1000"),
        ([str(recipe), "template=qwen"], "has no multimodal plugin for images"),
        ([str(recipe), "--history", str(tmp_path)], "tpo_tokens.jsonl does not exist"),
    ]
    for args, message in cases:
        assert tpo_plugin_main(["inspect", *args, "--output-dir", str(tmp_path / "out")]) == 2, args
        assert message in capsys.readouterr().err, args
    assert tpo_plugin_main(["inspect", str(recipe), "--output-dir", str(tmp_path / "old")]) == 2
    assert "already holds report.html; pass --overwrite" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
