"""The installed environment works as a set, and ``tpo-plugin env`` reports it and diagnoses broken ones."""

import json
import os
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest

from tpo_plugin.commands.env import diagnose, trio_versions_match
from tpo_plugin.compat import TORCH_TRIO

from conftest import OFFLINE_ENV


ROOT = Path(__file__).resolve().parents[1]


def installed_trio() -> str:
    return ", ".join(f"{name} {version(name)}" for name in TORCH_TRIO)


def test_torch_torchvision_torchaudio_import_together():
    # LLaMA-Factory imports torchaudio at module level: a torchaudio built for another torch stops everything.
    result = subprocess.run(
        [sys.executable, "-c", "import torch, torchvision, torchaudio"], capture_output=True, text=True
    )
    assert result.returncode == 0, (
        f"torch, torchvision and torchaudio do not import together ({installed_trio()}); install "
        + " ".join(f"{name}=={pin}" for name, pin in TORCH_TRIO.items())
        + f":\n{result.stderr[-2000:]}"
    )


def test_the_installed_trio_is_the_pinned_one():
    pins = {}
    for requirement in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        name, _, pin = requirement.partition("==")
        if name in TORCH_TRIO:
            pins[name] = pin
    assert pins == TORCH_TRIO  # pyproject.toml and tpo_plugin.compat name the same set
    installed = {name: version(name).split("+")[0] for name in TORCH_TRIO}
    assert installed == TORCH_TRIO, f"installed {installed_trio()}, pinned {TORCH_TRIO}"


@pytest.mark.parametrize(
    ("torch", "torchvision", "torchaudio", "match"),
    [
        ("2.11.0", "0.26.0", "2.11.0", True),
        ("2.11.0+cu128", "0.26.0+cu128", "2.11.0+cu128", True),
        ("2.10.0", "0.25.0", "2.10.0", True),
        ("2.11.0", "0.26.0", "2.11.1", False),  # the release that broke fresh installs on 2026-12-01
        ("2.11.0", "0.25.0", "2.11.0", False),
        ("2.9.1", "0.24.1", "2.9.1", True),
        ("2.11.0", "0.26.0", None, False),
    ],
)
def test_trio_versions_match_the_release_numbering(torch, torchvision, torchaudio, match):
    assert trio_versions_match(torch, torchvision, torchaudio) is match


def healthy_report(**changes) -> dict:
    report = {
        "versions": {"torch": "2.11.0", "torchvision": "0.26.0", "torchaudio": "2.11.0", "llamafactory": "0.9.5"},
        "trio_error": None,
        "hook_files": ["/venv/lib/python3.11/site-packages/tpo_plugin.pth"],
        "hook_disabled": False,
        "hook_active": True,
        "stage_tpo": True,
        "llamafactory_error": None,
    }
    for key, value in changes.items():
        if key in report["versions"]:
            report["versions"][key] = value
        else:
            report[key] = value
    return report


def test_diagnosis_of_known_broken_combinations():
    assert diagnose(healthy_report()) == []
    assert diagnose(healthy_report(llamafactory="0.9.6.dev0")) == []
    assert diagnose(healthy_report(hook_disabled=True, hook_active=False, stage_tpo=False)) == []

    (problem,) = diagnose(
        healthy_report(torchaudio="2.11.1", trio_error="OSError: Could not load this library: libtorchaudio.so")
    )
    assert "torch 2.11.0, torchvision 0.26.0, torchaudio 2.11.1" in problem and "libtorchaudio.so" in problem
    assert "torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0" in problem

    (problem,) = diagnose(healthy_report(llamafactory="0.9.4"))
    assert "LLaMA-Factory 0.9.4 is not a version tpo-plugin supports" in problem and "0.9.5" in problem
    (problem,) = diagnose(healthy_report(llamafactory=None, stage_tpo=False))
    assert "LLaMA-Factory is not installed" in problem
    (problem,) = diagnose(healthy_report(hook_files=[], hook_active=False))
    assert "tpo_plugin.pth" in problem and "reinstall" in problem
    (problem,) = diagnose(healthy_report(hook_active=False))
    assert "installed but did not run" in problem
    (problem,) = diagnose(healthy_report(stage_tpo=False, llamafactory_error="IncompatibleLlamaFactoryError: x"))
    assert "does not know stage tpo" in problem and "IncompatibleLlamaFactoryError" in problem


def run_env(**env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tpo_plugin", "env", "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, **OFFLINE_ENV, **env},
    )


def test_env_command_reports_this_environment():
    result = run_env()
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    for name in (*TORCH_TRIO, "transformers", "llamafactory", "peft", "trl", "accelerate", "datasets"):
        assert report["versions"][name] == version(name)
    assert report["hook_active"] and report["stage_tpo"] and report["problems"] == []
    assert any(Path(path).name == "tpo_plugin.pth" for path in report["hook_files"])

    disabled = run_env(TPO_PLUGIN_DISABLE="1")
    report = json.loads(disabled.stdout)
    assert disabled.returncode == 0 and report["hook_disabled"] and not report["hook_active"]
    assert not report["stage_tpo"]  # the parser is LLaMA-Factory's own when the plugin is off


def test_env_command_prints_a_readable_report():
    result = subprocess.run(
        [sys.executable, "-m", "tpo_plugin", "env"], capture_output=True, text=True, env={**os.environ, **OFFLINE_ENV}
    )
    assert result.returncode == 0
    assert f"- torchaudio: {version('torchaudio')}" in result.stdout
    assert f"- llamafactory: {version('llamafactory')}" in result.stdout
    assert "- Start-up hook: installed and active, stage tpo registered" in result.stdout
    assert "No known problem found." in result.stdout
