"""How the plugin reaches LLaMA-Factory: the start-up hook, its cost, the off switch, the patch guards,
and that the other stages train exactly as without the plugin."""

import subprocess
import sys
import types

import pytest

from tpo_plugin import compat
from tpo_plugin.integration import bootstrap, patches
from tpo_plugin.training.batch.corruption import regularize_images

from conftest import log_history, run_cli, train_config, user_env, write_yaml


def python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=user_env(env), capture_output=True, text=True)


def last_line(result: subprocess.CompletedProcess) -> str:
    """What the code printed last (LLaMA-Factory prints its warnings on stdout too)."""
    return result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-3000:]


def test_start_up_hook_imports_nothing_but_itself():
    result = python("import sys; print(sorted(m for m in sys.modules if m.startswith('tpo_plugin')))")
    assert result.stdout.strip() == "['tpo_plugin', 'tpo_plugin.integration', 'tpo_plugin.integration.bootstrap']"

    importtime = python("pass", PYTHONPROFILEIMPORTTIME="1").stderr.splitlines()
    imported = [line.rsplit("|", 1)[-1].strip() for line in importtime if line.startswith("import time:")]
    hook = imported.index("tpo_plugin.integration.bootstrap")
    # -X importtime lists a module's own imports right before it: under the hook only its two packages
    assert imported[hook - 2 : hook] == ["tpo_plugin", "tpo_plugin.integration"]
    assert not any(name.startswith("tpo_plugin") for name in imported[: hook - 2])
    assert importtime[0].startswith("import time: self [us]") and imported.index("site") > hook


def test_patches_and_bootstrap_agree_on_the_patched_modules():
    assert set(patches.PATCHES) == set(bootstrap.PATCHED_MODULES)
    assert patches.ARGUMENTS_MODULE == bootstrap.ARGUMENTS_MODULE
    assert compat.DISABLE_ENV == bootstrap.DISABLE_ENV


def test_importing_the_arguments_first_still_patches_the_parser():
    # Importing TPO's arguments is what loads LLaMA-Factory's parser here: its patch must wait for the class
    # and then be applied.
    code = (
        "from tpo_plugin.hparams.tpo_args import TPOFinetuningArguments; from llamafactory.hparams import parser; "
        "print(TPOFinetuningArguments in parser._TRAIN_ARGS and TPOFinetuningArguments in parser._INFER_ARGS)"
    )
    assert last_line(python(code)) == "True"


def test_hook_patches_llamafactory_on_import():
    code = (
        "from llamafactory.hparams import parser; from llamafactory.train import tuner; "
        "print(parser._TRAIN_ARGS[3].__name__, tuner.run_dpo.__name__)"
    )
    assert last_line(python(code)) == "TPOFinetuningArguments run_dpo_or_tpo"
    assert last_line(python(code, TPO_PLUGIN_DISABLE="1")) == "FinetuningArguments run_dpo"


def test_install_by_hand_patches_modules_already_loaded():
    code = (
        "from llamafactory.hparams import parser; import tpo_plugin; tpo_plugin.install(); "
        "print(parser._TRAIN_ARGS[3].__name__)"
    )
    # the hook is off at start-up; install() must still patch the parser that is already imported
    code = code.replace(
        "tpo_plugin.install()", "import os; os.environ.pop('TPO_PLUGIN_DISABLE'); tpo_plugin.install()"
    )
    assert last_line(python(code, TPO_PLUGIN_DISABLE="1")) == "TPOFinetuningArguments"


def test_patch_guards_name_the_supported_version():
    with pytest.raises(patches.IncompatibleLlamaFactoryError, match=r"tuner.run_dpo.*LLaMA-Factory 0\.9\.5"):
        patches.patch_tuner(
            types.SimpleNamespace(__name__="llamafactory.train.tuner", _training_function=None, get_train_args=None)
        )

    parser_without_finetuning_args = types.ModuleType("llamafactory.hparams.parser")
    parser_without_finetuning_args._TRAIN_ARGS = [object]
    with pytest.raises(patches.IncompatibleLlamaFactoryError, match=r"_TRAIN_ARGS.*0\.9\.5"):
        patches.patch_parser(parser_without_finetuning_args)

    with pytest.raises(patches.IncompatibleLlamaFactoryError, match=r"_regularize_images.*0\.9\.5"):
        regularize_images(object(), ["x.png"], processor=None)


@pytest.mark.e2e
def test_disabled_plugin_leaves_stage_tpo_unknown(model_dirs, dataset_dir, tmp_path):
    config = train_config(model_dirs["qwen2_vl"], "qwen2_vl", dataset_dir, tmp_path / "out")
    recipe = write_yaml(tmp_path / "tpo.yaml", config)
    result = run_cli(["train", str(recipe)], cwd=tmp_path, extra_env={"TPO_PLUGIN_DISABLE": "1"}, check=False)
    assert result.returncode != 0
    assert "Unknown task: tpo" in result.stderr


@pytest.mark.e2e
@pytest.mark.parametrize("stage", ["dpo", "sft"])
def test_other_stages_train_exactly_as_without_the_plugin(stage, model_dirs, dataset_dir, tmp_path):
    histories = {}
    for plugin in ("on", "off"):
        output_dir = tmp_path / plugin
        config = train_config(model_dirs["qwen2_vl"], "qwen2_vl", dataset_dir, output_dir, stage=stage)
        if stage == "sft":
            config["dataset"] = "tiny_sft"
        recipe = write_yaml(tmp_path / f"{plugin}.yaml", config)
        run_cli(
            ["train", str(recipe)], cwd=tmp_path, extra_env={"TPO_PLUGIN_DISABLE": "1" if plugin == "off" else "0"}
        )
        histories[plugin] = [
            {k: v for k, v in entry.items() if "runtime" not in k and "per_second" not in k}
            for entry in log_history(output_dir)
        ]

    assert histories["on"] == histories["off"]
    assert all(not any(key.startswith("tpo/") for key in entry) for entry in histories["on"])
