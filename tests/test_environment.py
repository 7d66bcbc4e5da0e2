"""The installed environment works as a set, and ``tpo-plugin env`` reports it and diagnoses broken ones."""

import json
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tpo_plugin import compat
from tpo_plugin.commands.env import (
    diagnose,
    matching_trio_command,
    parse_nvidia_smi,
    trio_versions_match,
    untested_versions,
)
from tpo_plugin.compat import SUPPORTED_LLAMAFACTORY_VERSIONS, TESTED_TORCH, TORCH_TRIO

from conftest import user_env


ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = sorted((ROOT / "constraints").glob("*.txt"))


def installed_trio() -> str:
    return ", ".join(f"{name} {version(name)}" for name in TORCH_TRIO)


def test_torch_torchvision_torchaudio_import_together():
    # LLaMA-Factory imports torchaudio at module level: a torchaudio built for another torch stops everything.
    result = subprocess.run(
        [sys.executable, "-c", "import torch, torchvision, torchaudio"], capture_output=True, text=True
    )
    assert result.returncode == 0, (
        f"torch, torchvision and torchaudio do not import together ({installed_trio()}); "
        f"{matching_trio_command(version('torch'))}:\n{result.stderr[-2000:]}"
    )


def plugin_requirements() -> dict[str, Requirement]:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {requirement.name: requirement for requirement in map(Requirement, dependencies)}


def pins(constraints: Path) -> dict[str, str]:
    lines = [line.strip() for line in constraints.read_text().splitlines()]
    return dict(line.split("==", 1) for line in lines if line and not line.startswith("#"))


def test_pyproject_admits_the_tested_releases_and_needs_no_torchaudio():
    requirements = plugin_requirements()
    assert "torchaudio" not in requirements  # LLaMA-Factory's requirement: the plugin never imports it
    assert str(requirements["torch"].specifier) == f">={TESTED_TORCH[0].rsplit('.', 1)[0]}"  # the lower end run
    for torch in TESTED_TORCH:
        assert requirements["torch"].specifier.contains(torch)
    for llamafactory in SUPPORTED_LLAMAFACTORY_VERSIONS:
        assert requirements["llamafactory"].specifier.contains(llamafactory, prereleases=True)
    assert not requirements["llamafactory"].specifier.contains("0.10.0")


@pytest.mark.parametrize("constraints", CONSTRAINTS, ids=[path.stem for path in CONSTRAINTS])
def test_constraints_pin_a_tested_set_that_pyproject_admits(constraints):
    pinned = pins(constraints)
    assert pinned["torch"] in TESTED_TORCH and pinned["llamafactory"] in SUPPORTED_LLAMAFACTORY_VERSIONS
    assert trio_versions_match(*(pinned[name] for name in TORCH_TRIO))
    for name, requirement in plugin_requirements().items():
        assert requirement.specifier.contains(pinned[name], prereleases=True), (name, pinned[name])
    assert "tpo-plugin" not in pinned


def test_constraints_cover_both_tested_llamafactory_versions():
    assert sorted(pins(path)["llamafactory"] for path in CONSTRAINTS) == sorted(SUPPORTED_LLAMAFACTORY_VERSIONS)


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
    assert diagnose(healthy_report(llamafactory="0.9.6")) == []  # untested is a warning, not a problem
    assert diagnose(healthy_report(hook_disabled=True, hook_active=False, stage_tpo=False)) == []

    (problem,) = diagnose(
        healthy_report(torchaudio="2.11.1", trio_error="OSError: Could not load this library: libtorchaudio.so")
    )
    assert "torch 2.11.0, torchvision 0.26.0, torchaudio 2.11.1" in problem and "libtorchaudio.so" in problem
    assert "Keep your torch and install its set: `pip install torchvision==0.26.0 torchaudio==2.11.0`" in problem

    (problem,) = diagnose(healthy_report(llamafactory=None, stage_tpo=False))
    assert "LLaMA-Factory is not installed" in problem
    (problem,) = diagnose(healthy_report(hook_files=[], hook_active=False))
    assert "tpo_plugin.pth" in problem and "reinstall" in problem
    (problem,) = diagnose(healthy_report(hook_active=False))
    assert "installed but did not run" in problem
    (problem,) = diagnose(healthy_report(stage_tpo=False, llamafactory_error="IncompatibleLlamaFactoryError: x"))
    assert "does not know stage tpo" in problem and "IncompatibleLlamaFactoryError" in problem


@pytest.mark.parametrize(
    ("torch", "expected"),
    [
        ("2.11.0", "pip install torchvision==0.26.0 torchaudio==2.11.0"),
        ("2.10.0+cu126", "pip install torchvision==0.25.0+cu126 torchaudio==2.10.0+cu126 --index-url "
         "https://download.pytorch.org/whl/cu126"),
        ("2.9.1+cpu", "pip install torchvision==0.24.1+cpu torchaudio==2.9.1+cpu --index-url "
         "https://download.pytorch.org/whl/cpu"),
    ],
)  # fmt: skip
def test_the_trio_command_keeps_the_installed_torch_and_its_build(torch, expected):
    assert matching_trio_command(torch) == expected


NVIDIA_SMI = """
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 550.54.15              Driver Version: 550.54.15      CUDA Version: 12.4     |
|-----------------------------------------+------------------------+----------------------+
| GPU  Name                 Persistence-M | Bus-Id          Disp.A | Volatile Uncorr. ECC |
|   0  NVIDIA A100-SXM4-80GB          On  |   00000000:07:00.0 Off |                    0 |
"""


def test_nvidia_smi_header_gives_the_driver_and_its_newest_cuda():
    assert parse_nvidia_smi(NVIDIA_SMI) == {"version": "550.54.15", "cuda": "12.4"}
    assert parse_nvidia_smi("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.") is None


def test_torch_built_for_a_newer_cuda_than_the_driver_runs():
    driver = {"version": "550.54.15", "cuda": "12.4"}
    (problem,) = diagnose(healthy_report(cuda_version="13.0", nvidia_driver=driver))
    assert "torch 2.11.0 is built for CUDA 13.0" in problem and "NVIDIA driver 550.54.15" in problem
    assert "runs CUDA up to 12.4" in problem and "cannot use the GPU" in problem
    assert "pip install torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0 --index-url " in problem
    assert "https://download.pytorch.org/whl/cu124" in problem
    # a build for the driver's CUDA or an older one runs; no driver, nothing to say
    assert diagnose(healthy_report(cuda_version="12.4", nvidia_driver=driver)) == []
    assert diagnose(healthy_report(cuda_version="11.8", nvidia_driver={"version": "580.1", "cuda": "13.0"})) == []
    assert diagnose(healthy_report(cuda_version="13.0", nvidia_driver=None)) == []


def test_cpu_only_torch_on_a_machine_with_an_nvidia_gpu():
    driver = {"version": "580.65.06", "cuda": "13.0"}
    (problem,) = diagnose(healthy_report(torch="2.11.0+cpu", cuda_version=None, nvidia_driver=driver))
    assert "torch 2.11.0+cpu is a CPU-only build" in problem and "NVIDIA driver 580.65.06" in problem
    assert "https://download.pytorch.org/whl/cu130" in problem
    assert diagnose(healthy_report(torch="2.11.0+cpu", cuda_version=None, nvidia_driver=None)) == []


@pytest.mark.parametrize(
    ("changes", "warned"),
    [
        ({}, []),
        ({"torch": "2.10.0+cu126"}, []),
        ({"torch": "2.11.0+cu130", "llamafactory": "0.9.6.dev0"}, []),
        ({"torch": "2.9.1"}, ["torch 2.9.1 is outside the releases tpo-plugin is tested with (2.10.0 to 2.11.0)"]),
        ({"torch": "2.12.0"}, ["torch 2.12.0 is outside the releases tpo-plugin is tested with (2.10.0 to 2.11.0)"]),
        ({"llamafactory": "0.9.6"}, ["LLaMA-Factory 0.9.6 is not a version tpo-plugin is tested with (0.9.5 and"]),
    ],
)
def test_versions_outside_the_tested_ones_are_warnings(changes, warned):
    warnings = untested_versions(healthy_report(**changes))
    assert len(warnings) == len(warned)
    for warning, start in zip(warnings, warned, strict=True):
        assert warning.startswith(start)


def test_stage_tpo_warns_about_an_untested_llamafactory(monkeypatch):
    assert compat.untested_llamafactory() is None  # the installed one is tested
    monkeypatch.setattr(compat, "installed_version", lambda name: "0.9.7")
    warning = compat.untested_llamafactory()
    assert "LLaMA-Factory 0.9.7 is not a version tpo-plugin is tested with (0.9.5 and 0.9.6.dev0 (main))" in warning


def run_env(**env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tpo_plugin", "env", "--json"],
        capture_output=True,
        text=True,
        env=user_env(env),
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
        [sys.executable, "-m", "tpo_plugin", "env"], capture_output=True, text=True, env=user_env()
    )
    assert result.returncode == 0
    assert f"- torchaudio: {version('torchaudio')}" in result.stdout
    assert f"- llamafactory: {version('llamafactory')}" in result.stdout
    assert "- Start-up hook: installed and active, stage tpo registered" in result.stdout
    assert "No known problem found." in result.stdout
