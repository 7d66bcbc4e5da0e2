"""TPO in LlamaBoard (``llamafactory-cli webui``): the stage, its settings panel, the runner's arguments and
checks, and a real run driven from headless Chromium through Playwright.

The browser tests start the web UI of this environment on a free loopback port and use Debian's
``chromium`` (Playwright's own browser download does not work offline); if Chromium cannot start they are
skipped, with the reason in the warnings summary.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import types
import urllib.request
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml
from webui_helpers import DATA_INFO, build_train_tab

from tpo_plugin.hparams.tpo_args import TPOArguments, tpo_defaults
from tpo_plugin.integration import patches
from tpo_plugin.webui import panel as webui

from conftest import ARTIFACTS, user_env


# Every tpo_* key set to a value other than its default, as a user would in the panel; but tpo_weighting, since
# tpo_weight_clip is refused with the other weighting (the refusal is tested below).
TPO_UI_VALUES = {
    "tpo_noise_step": 250,
    "tpo_corruption": "blank",
    "tpo_reward_on": "chosen",
    "tpo_reward_offset": 0.75,
    "tpo_score": "logprob",
    "tpo_detach_reward": True,
    "tpo_weighting": "log_additive",
    "tpo_weight_clip": 0.05,
    "tpo_noise_per": "sample",
    "tpo_precompute_ref": True,
    "tpo_allow_changed_settings": True,
    "tpo_log_tokens": 2,
}
PREF_UI_VALUES = {"pref_beta": 0.2, "pref_ftx": 0.5, "pref_loss": "hinge"}


def train_ids(values: dict[str, Any]) -> dict[str, Any]:
    """``TrainTab.data`` keyword arguments for Train-tab element values."""
    return {f"train__{key}": value for key, value in values.items()}


@pytest.fixture(scope="module")
def train_tab(tmp_path_factory):
    """The top bar and Train tab of LlamaBoard, built in this process with the plugin's patches applied."""
    previous = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("llamaboard"))
    try:
        return build_train_tab()
    finally:
        os.chdir(previous)


def test_tpo_is_a_stage_after_dpo_that_lists_ranking_datasets():
    from llamafactory.extras.constants import TRAINING_STAGES
    from llamafactory.webui.control import list_datasets

    labels = list(TRAINING_STAGES)
    assert labels[labels.index("DPO") + 1] == "TPO" and TRAINING_STAGES["TPO"] == "tpo"
    tpo_datasets = list_datasets(str(DATA_INFO), "TPO").choices
    assert tpo_datasets == list_datasets(str(DATA_INFO), "DPO").choices
    assert ("tpo_demo", "tpo_demo") in tpo_datasets


def test_panel_has_a_control_per_key_with_the_yaml_default_after_the_rlhf_panel(train_tab):
    get = train_tab.engine.manager.get_elem_by_id
    for key, default in tpo_defaults().items():
        assert get(f"train.{key}").value == default, key

    slider = get("train.tpo_noise_step")
    assert (slider.minimum, slider.maximum, slider.step) == (0, 999, 1)
    for field in fields(TPOArguments):
        if get_args(field.type):  # a Literal: a dropdown of exactly its values
            assert [value for value, _ in get(f"train.{field.name}").choices] == list(get_args(field.type))

    siblings = get("train.rlhf_tab").parent.children
    assert siblings.index(get("train.tpo_tab")) == siblings.index(get("train.rlhf_tab")) + 1


def test_panel_controls_reach_preview_start_save_and_load(train_tab):
    runner = train_tab.engine.runner
    controls = {train_tab.engine.manager.get_elem_by_id(f"train.{key}") for key in webui.TPO_KEYS}
    for handler in (runner.preview_train, runner.run_train, runner.save_args):
        assert controls <= set(train_tab.bound(handler)[0]), handler.__name__
    assert controls <= set(train_tab.bound(runner.load_args)[1])


def test_panel_texts_in_all_five_languages(train_tab):
    from llamafactory.webui.locales import LOCALES

    for key in webui.TPO_KEYS:
        for lang in ("en", "ru", "zh", "ko", "ja"):
            assert LOCALES[key][lang]["label"] and LOCALES[key][lang]["info"], (key, lang)
        # English help is the YAML key's help, less the pointer into docs/method.md
        help_text = next(f.metadata["help"] for f in fields(TPOArguments) if f.name == key)
        assert LOCALES[key]["en"]["info"] == re.sub(r" \(docs/method\.md[^)]*\)", "", help_text)
        assert "method.md" not in LOCALES[key]["en"]["info"]
    for name in ("tpo_tab", "tpo_info"):
        assert all(LOCALES[name][lang] for lang in ("en", "ru", "zh", "ko", "ja"))

    # switching the language relabels the panel's elements, as it does LLaMA-Factory's own
    relabelled = train_tab.engine.change_lang("zh")
    get = train_tab.engine.manager.get_elem_by_id
    assert relabelled[get("train.tpo_noise_step")].label == "加噪步数"
    assert relabelled[get("train.tpo_tab")].label == "TPO 参数设置"


def test_runner_passes_rlhf_and_tpo_values_for_tpo(train_tab):
    ui_values = {**TPO_UI_VALUES, "tpo_noise_step": 250.0, "tpo_reward_offset": 1}  # as gradio may hand them
    args = train_tab.engine.runner._parse_train_args(
        train_tab.data(train__training_stage="TPO", **train_ids({**PREF_UI_VALUES, **ui_values}))
    )
    assert args["stage"] == "tpo"
    assert {key: args[key] for key in PREF_UI_VALUES} == PREF_UI_VALUES
    assert {key: args[key] for key in TPO_UI_VALUES} == {**TPO_UI_VALUES, "tpo_reward_offset": 1.0}
    assert type(args["tpo_noise_step"]) is int and type(args["tpo_reward_offset"]) is float


def test_other_stages_get_the_same_arguments_as_without_the_plugin(tmp_path):
    helper = Path(__file__).with_name("webui_helpers.py")
    stage_args = {}
    for plugin in ("on", "off"):
        workdir = tmp_path / plugin
        workdir.mkdir()
        env = user_env({"TPO_PLUGIN_DISABLE": "1" if plugin == "off" else "0"})
        result = subprocess.run(
            [sys.executable, str(helper), "args.json"], cwd=workdir, env=env, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr[-4000:]
        stage_args[plugin] = json.loads((workdir / "args.json").read_text())

    assert set(stage_args["on"]) == set(stage_args["off"]) | {"TPO"}
    for label, args in stage_args["off"].items():
        assert stage_args["on"][label] == args, label
    assert {"pref_beta", "pref_ftx", "pref_loss", *webui.TPO_KEYS} <= set(stage_args["on"]["TPO"])


def test_save_and_load_arguments_round_trip_every_tpo_field(train_tab, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = train_tab.data(train__training_stage="TPO", **train_ids(TPO_UI_VALUES))
    assert "Arguments have been saved" in next(iter(train_tab.engine.runner.save_args(data).values()))

    saved = yaml.safe_load((tmp_path / "llamaboard_config" / "tpo.yaml").read_text())
    assert {key: saved[f"train.{key}"] for key in TPO_UI_VALUES} == TPO_UI_VALUES

    loaded = train_tab.engine.runner.load_args("en", "tpo.yaml")
    by_id = {train_tab.engine.manager.get_id_by_elem(elem): value for elem, value in loaded.items()}
    assert {key: by_id[f"train.{key}"] for key in TPO_UI_VALUES} == TPO_UI_VALUES


@pytest.mark.parametrize(
    "values, message",
    [
        ({"top__template": "qwen"}, "Template `qwen` has no multimodal plugin for images, but stage tpo needs one"),
        ({"train__dataset": ["tiny_sft"]}, "Dataset `tiny_sft` (sft.json) is not a ranking (preference) dataset"),
        ({"train__pref_loss": "orpo"}, "`pref_loss: orpo` is not supported by stage tpo"),
        ({"train__tpo_noise_step": 1000}, "`tpo_noise_step` must be an integer in 0..999, got 1000"),
        (
            {"train__tpo_weighting": "multiplicative", "train__tpo_weight_clip": 0.1},
            "`tpo_weight_clip: 0.1` has no effect with `tpo_weighting: multiplicative`",
        ),
    ],
)
def test_ui_refuses_what_the_cli_refuses_with_its_message(values, message, train_tab, dataset_dir):
    data = train_tab.data(train__training_stage="TPO", train__dataset_dir=str(dataset_dir), **values)
    if "train__dataset" not in values:
        data[train_tab.engine.manager.get_elem_by_id("train.dataset")] = ["tiny_pairs"]
    assert message in train_tab.engine.runner._initialize(data, do_train=True, from_preview=True)

    # the same inputs with DPO are not TPO's business
    data[train_tab.engine.manager.get_elem_by_id("train.training_stage")] = "DPO"
    assert train_tab.engine.runner._initialize(data, do_train=True, from_preview=True) == ""


def test_valid_tpo_inputs_pass_the_ui_checks(train_tab):
    data = train_tab.data(train__training_stage="TPO", **train_ids(TPO_UI_VALUES))
    assert train_tab.engine.runner._initialize(data, do_train=True, from_preview=True) == ""


def test_start_launches_llamafactory_cli_with_the_ui_interpreter():
    from llamafactory.webui import runner

    launched = []
    fake_runner = types.ModuleType("llamafactory.webui.runner")
    fake_runner.Runner = type("Runner", (), {"_parse_train_args": None, "_initialize": None})
    fake_runner.TRAINING_STAGES = {}
    fake_runner.Popen = lambda args, **kwargs: launched.append((args, kwargs))
    patches.patch_runner(fake_runner)

    fake_runner.Popen(["llamafactory-cli", "train", "saves/x/training_args.yaml"], text=True)
    assert launched == [
        ([sys.executable, "-m", "llamafactory.cli", "train", "saves/x/training_args.yaml"], {"text": True})
    ]
    assert runner.Popen.__name__ == "popen_in_this_environment"


def test_webui_patch_guards_name_the_supported_version():
    for patch in (patches.patch_constants, patches.patch_locales, patches.patch_runner, patches.patch_train_tab):
        module = types.ModuleType(next(name for name, p in patches.PATCHES.items() if p is patch))
        with pytest.raises(patches.IncompatibleLlamaFactoryError, match=r"LLaMA-Factory 0\.9\.5"):
            patch(module)

    locales = types.ModuleType("llamafactory.webui.locales")
    locales.LOCALES = {"tpo_noise_step": {}}
    with pytest.raises(patches.IncompatibleLlamaFactoryError, match="tpo_noise_step"):
        patches.patch_locales(locales)


# --- In a real browser -----------------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [  # Playwright adds --headless and a fresh --user-data-dir itself
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
UI_TIMEOUT_MS = 120_000  # the first page load builds every tab; generous for a loaded 2-core CI machine
RUN_TIMEOUT_MS = 300_000


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_serving(url: str, process: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(
                f"llamafactory-cli webui exited with {process.returncode}:\n{log.read_text()[-4000:]}"
            )
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"llamafactory-cli webui did not serve {url} in {timeout} s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def webui_server(tmp_path_factory):
    """``llamafactory-cli webui`` of this environment on a free loopback port, run in its own directory
    (LlamaBoard writes ``llamaboard_cache/``, ``llamaboard_config/`` and ``saves/`` there)."""
    workdir = tmp_path_factory.mktemp("webui")
    port = free_port()
    env = user_env(
        {
            "GRADIO_SERVER_NAME": "127.0.0.1",
            "GRADIO_SERVER_PORT": str(port),
            "GRADIO_ANALYTICS_ENABLED": "False",
            "BROWSER": "true",  # gradio's launch(inbrowser=True) would open a browser where a display exists
        }
    )
    log = workdir / "webui.log"
    cli = Path(sys.executable).with_name("llamafactory-cli")
    with log.open("w") as log_file:
        process = subprocess.Popen(
            [str(cli), "webui"], cwd=workdir, env=env, stdout=log_file, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_serving(url, process, log)
        yield types.SimpleNamespace(url=url, pid=process.pid)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def browser():
    """Headless Debian Chromium through Playwright, or a skip naming why it cannot start."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as error:
        skip_browser_tests(f"Playwright is not installed ({error})")

    with sync_playwright() as playwright:
        try:
            chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000)
        except Exception as error:  # Playwright reports a missing or crashing browser in several ways
            skip_browser_tests(f"Chromium ({CHROMIUM}) cannot start: {error}")
        yield chromium
        chromium.close()


def skip_browser_tests(reason: str) -> None:
    warnings.warn(f"LlamaBoard browser tests skipped: {reason}", stacklevel=2)
    pytest.skip(reason)


@pytest.fixture
def page(browser, webui_server):
    """A fresh tab on LlamaBoard, loaded and labelled; requests that would leave this machine are refused."""
    context = browser.new_context(viewport={"width": 1600, "height": 1300})
    board = context.new_page()
    board.set_default_timeout(UI_TIMEOUT_MS)  # every wait returns at the event; this only bounds a stuck page
    board.route("**/*", lambda route: route.continue_() if is_local(route.request.url) else route.abort())
    board.goto(webui_server.url, wait_until="domcontentloaded", timeout=UI_TIMEOUT_MS)
    use_english(board)
    yield board
    context.close()


def use_english(page) -> None:
    """Choose English (LlamaBoard starts in the language last chosen, whichever page chose it)."""
    from llamafactory.webui.locales import LOCALES

    names = "|".join(re.escape(LOCALES["lang"][lang]["label"]) for lang in LOCALES["lang"])
    language = page.get_by_label(re.compile(f"^({names})$"))
    language.wait_for(timeout=UI_TIMEOUT_MS)  # labelled once the page has loaded
    language.click()
    language.fill("en")
    page.get_by_role("option", name="en", exact=True).click()
    page.get_by_text("TPO configurations", exact=True).wait_for()


def is_local(url: str) -> bool:
    return url.startswith(("http://127.0.0.1", "ws://127.0.0.1", "data:", "blob:"))


def expect(locator):
    """Playwright's assertions, which wait for the page to catch up (imported late: Playwright may be missing).

    They return as soon as the page shows what they expect; the limit only bounds a page that never does. The
    UI polls the run's log every few seconds, so on a busy machine the loss plot may follow "Finished." by more
    than Playwright's default 5 s.
    """
    from playwright.sync_api import expect as playwright_expect

    playwright_expect.set_options(timeout=UI_TIMEOUT_MS)
    return playwright_expect(locator)


def textbox(page, label: str):
    """A textbox by its label (gradio names a textbox by its label followed by its help text)."""
    return page.get_by_role("textbox", name=re.compile("^" + re.escape(label)))


def choose(page, label: str, option: str) -> None:
    """Pick an option of a dropdown, typing to filter its list first (the template list is long)."""
    dropdown = page.get_by_label(label, exact=True)
    dropdown.click()
    dropdown.fill(option)
    page.get_by_role("option", name=option, exact=True).click()


def set_number(page, label: str, value: Any) -> None:
    """Type into a slider's or number box's input, as a user does, and commit it."""
    slider_box = page.get_by_label(f"number input for {label}", exact=True)
    box = slider_box.or_(page.get_by_role("spinbutton", name=re.compile("^" + re.escape(label))))
    box.fill(str(value))
    box.press("Enter")


def open_panel(page, title: str) -> None:
    """Open an accordion by clicking its header (a button named by its title and an arrow)."""
    page.get_by_role("button", name=re.compile("^" + re.escape(title))).click()


def fill_tpo_run(page, model_dir: Path, dataset_dir: Path, dataset: str, output_dir: Path, max_steps: int) -> None:
    """What a user fills in for a small LoRA TPO run on CPU: model, stage, data, size of the run, output dir."""
    choose(page, "Model name", "Qwen2-VL-2B-Instruct")  # sets the template to qwen2_vl
    expect(page.get_by_label("Chat template", exact=True)).to_have_value("qwen2_vl")
    textbox(page, "Model path").fill(str(model_dir))
    choose(page, "Stage", "TPO")
    textbox(page, "Data dir").fill(str(dataset_dir))
    page.get_by_role("textbox", name="Dataset", exact=True).click()
    page.get_by_role("option", name=dataset, exact=True).click()
    textbox(page, "Max samples").fill("8")
    choose(page, "Compute type", "fp32")
    open_panel(page, "Extra configurations")
    # LlamaBoard's own preprocessing_num_workers (16) is kept: the training it starts forks that many workers.
    extra_args = {"optim": "adamw_torch", "gradient_accumulation_steps": 1, "overwrite_cache": True}
    textbox(page, "Extra arguments").fill(json.dumps({**extra_args, "max_steps": max_steps, "logging_steps": 1}))
    output = page.get_by_label("Output dir", exact=True)
    output.fill(str(output_dir))
    output.press("Enter")


def wait_for_end_of_run(page) -> None:
    page.get_by_text("Finished.").or_(page.get_by_text("Failed.")).first.wait_for(timeout=RUN_TIMEOUT_MS)


def shown_command(page) -> str:
    preview = page.locator("pre", has_text="llamafactory-cli train")
    preview.wait_for()
    return preview.inner_text()


@pytest.mark.e2e
def test_tpo_trains_from_the_web_ui(page, model_dirs, dataset_dir, tmp_path):
    output_dir = tmp_path / "tpo_from_ui"
    page.get_by_label("Stage", exact=True).click()
    assert "TPO" in page.get_by_role("option").all_inner_texts()
    page.keyboard.press("Escape")

    fill_tpo_run(page, model_dirs["qwen2_vl"], dataset_dir, "photo_pairs", output_dir, max_steps=2)
    for key in webui.TPO_KEYS:  # choosing TPO opened its panel, labelled in English
        page.get_by_text(webui.LOCALES[key]["en"]["label"], exact=True).wait_for()

    set_number(page, "Noise step", TPO_UI_VALUES["tpo_noise_step"])
    choose(page, "Image corruption", TPO_UI_VALUES["tpo_corruption"])
    choose(page, "Weighted responses", TPO_UI_VALUES["tpo_reward_on"])
    set_number(page, "Weight offset", TPO_UI_VALUES["tpo_reward_offset"])
    choose(page, "Visual score", TPO_UI_VALUES["tpo_score"])
    page.get_by_role("checkbox", name=re.compile("^Detach reward")).check()
    choose(page, "Token weighting", TPO_UI_VALUES["tpo_weighting"])
    set_number(page, "Weight-change bound", TPO_UI_VALUES["tpo_weight_clip"])
    choose(page, "Noise drawn per", TPO_UI_VALUES["tpo_noise_per"])
    page.get_by_role("checkbox", name=re.compile("^Precompute reference scores")).check()
    page.get_by_role("checkbox", name=re.compile("^Allow changed settings on resume")).check()
    set_number(page, "Log token weights of N pairs", TPO_UI_VALUES["tpo_log_tokens"])
    open_panel(page, "RLHF configurations")
    set_number(page, "Beta value", PREF_UI_VALUES["pref_beta"])

    page.get_by_role("button", name="Preview command").click()
    command = shown_command(page)
    assert "--stage tpo" in command and "--pref_beta 0.2" in command
    for key, value in TPO_UI_VALUES.items():
        assert f"--{key} {value}" in command, key

    # Save arguments, change a value, Load arguments: the saved value is back
    page.get_by_role("button", name="Save arguments").click()
    page.get_by_text("Arguments have been saved").first.wait_for()
    set_number(page, "Noise step", 100)
    page.get_by_role("button", name="Load arguments").click()
    page.get_by_text("Arguments have been restored.").first.wait_for()
    expect(page.get_by_label("number input for Noise step")).to_have_value("250")

    page.get_by_role("button", name="Start").click()
    wait_for_end_of_run(page)
    expect(page.get_by_test_id("markdown").filter(has_text="Finished.")).to_be_visible()
    expect(page.locator("[data-testid=matplotlib] img")).to_have_count(1)  # the loss plot, from the run's log
    screenshot(page, "TPO configurations", "webui_tpo_trained.png")

    assert (output_dir / "adapter_model.safetensors").is_file()
    assert (output_dir / "training_loss.png").is_file()
    ran = yaml.safe_load((output_dir / "training_args.yaml").read_text())
    assert ran["stage"] == "tpo" and ran["model_name_or_path"] == str(model_dirs["qwen2_vl"])
    assert ran["pref_beta"] == PREF_UI_VALUES["pref_beta"]
    assert {key: ran[key] for key in TPO_UI_VALUES} == TPO_UI_VALUES

    # the panel in Chinese
    choose(page, "Language", "zh")
    for key in ("tpo_tab", *webui.TPO_KEYS):
        page.get_by_text(webui.LOCALES[key]["zh"]["label"], exact=True).wait_for()
    expect(page.get_by_text("加噪步数", exact=True)).to_be_visible()
    screenshot(page, "TPO 参数设置", "webui_tpo_zh.png")


@pytest.mark.e2e
def test_invalid_tpo_inputs_show_the_cli_message(page, model_dirs, dataset_dir, tmp_path):
    output_dir = tmp_path / "text_only"
    fill_tpo_run(page, model_dirs["qwen2_vl"], dataset_dir, "text_pairs", output_dir, max_steps=2)

    # checked in the UI process before anything starts
    choose(page, "Chat template", "qwen")
    page.get_by_role("button", name="Preview command").click()
    output_box = page.get_by_test_id("markdown")  # toasts repeat the message elsewhere
    output_box.filter(has_text="has no multimodal plugin for images, but stage tpo needs one").wait_for()

    # found by the training process once it has read the data, reported in the output box
    choose(page, "Chat template", "qwen2_vl")
    page.get_by_role("button", name="Start").click()
    wait_for_end_of_run(page)
    page.locator("pre", has_text="ValueError: No training pair has an image").wait_for()
    assert not (output_dir / "adapter_model.safetensors").exists()
    page.get_by_role("button", name="Preview command").click()  # the UI still answers
    assert "--stage tpo" in shown_command(page)


@pytest.mark.e2e
def test_abort_stops_a_tpo_run(page, webui_server, model_dirs, tmp_path):
    import psutil

    output_dir = tmp_path / "aborted"
    fill_tpo_run(page, model_dirs["qwen2_vl"], DATA_INFO, "tpo_demo", output_dir, max_steps=1000)
    page.get_by_role("button", name="Start").click()
    page.get_by_text(re.compile(r"Running \d+/1000")).first.wait_for(timeout=RUN_TIMEOUT_MS)
    (trainer,) = training_processes(webui_server.pid)
    command = trainer.cmdline()
    assert command[1:4] == ["-m", "llamafactory.cli", "train"]
    assert Path(command[0]).parent == Path(sys.executable).parent  # this environment's interpreter

    page.get_by_role("button", name="Abort").click()  # LLaMA-Factory's callback stops at the end of the step
    wait_for_end_of_run(page)
    assert psutil.wait_procs([trainer], timeout=30)[1] == []
    last_log = json.loads((output_dir / "trainer_log.jsonl").read_text().splitlines()[-1])
    assert last_log["current_steps"] < 1000


def training_processes(pid: int) -> list[Any]:
    """The training runs the web UI process has started (and not other children, such as exited ones)."""
    import psutil

    def command(process: psutil.Process) -> list[str]:
        try:
            return process.cmdline()
        except psutil.Error:
            return []

    return [child for child in psutil.Process(pid).children() if "llamafactory.cli" in command(child)]


def screenshot(page, panel_title: str, name: str) -> None:
    """Save the page from the given panel down (settings, buttons, output box, loss plot) as a test artifact."""
    ARTIFACTS.mkdir(exist_ok=True)
    header = page.get_by_role("button", name=re.compile("^" + re.escape(panel_title)))
    header.evaluate("element => element.scrollIntoView({block: 'start'})")
    page.screenshot(path=str(ARTIFACTS / name))
