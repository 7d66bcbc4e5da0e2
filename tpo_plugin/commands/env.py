"""``tpo-plugin env``: what a bug report needs, and a plain diagnosis of combinations known not to work.

Like ``llamafactory-cli env``, plus the plugin's own state: whether the start-up hook is installed and
active (or turned off by ``TPO_PLUGIN_DISABLE``) and whether ``stage: tpo`` reaches LLaMA-Factory's parser.
Each library is imported in a child process, so one that cannot load (a torchaudio built for another
torch) is reported instead of taking the command down. On a machine with ``nvidia-smi`` it also reads the
driver, since the commonest way a GPU user's torch breaks is a build the driver cannot run.

Problems (known-broken combinations, each with what to install) make it exit 1; warnings (versions outside
those tested) do not.
"""

import argparse
import json
import os
import platform
import re
import shutil
import site
import subprocess
import sys
from pathlib import Path
from typing import Any

from .. import __version__
from ..compat import (
    DISABLE_ENV,
    SUPPORTED_LLAMAFACTORY,
    SUPPORTED_LLAMAFACTORY_VERSIONS,
    TESTED_TORCH,
    TORCH_TRIO,
    installed_version,
    release,
)


LIBRARIES = ("transformers", "llamafactory", "peft", "trl", "accelerate", "datasets", "gradio")
OPTIONAL_LIBRARIES = ("deepspeed", "bitsandbytes", "vllm")
HOOK_FILE = "tpo_plugin.pth"

PYTORCH_INDEX = "https://download.pytorch.org/whl"

# Run in a child: imports the trio together and LLaMA-Factory's parser, and reports what it saw as JSON.
_PROBE = """
import json, sys
report = {}
try:
    import torch, torchvision, torchaudio
    report["trio_error"] = None
    report["cuda"] = torch.cuda.is_available()
    report["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    report["cuda_version"] = torch.version.cuda
except Exception as err:
    report["trio_error"] = f"{type(err).__name__}: {err}"
report["hook_active"] = any(type(f).__name__ == "PatchingFinder" for f in sys.meta_path)
try:
    from llamafactory.hparams import parser
    report["stage_tpo"] = any(cls.__name__ == "TPOFinetuningArguments" for cls in parser._TRAIN_ARGS)
    report["llamafactory_error"] = None
except Exception as err:
    report["stage_tpo"] = False
    report["llamafactory_error"] = f"{type(err).__name__}: {err}"
print(json.dumps(report))
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")


def run(args: argparse.Namespace) -> int:
    report = collect()
    problems, warnings = diagnose(report), untested_versions(report)
    if args.json:
        print(json.dumps({**report, "problems": problems, "warnings": warnings}, indent=2))
    else:
        print(render(report, problems, warnings))
    return 1 if problems else 0


def collect() -> dict[str, Any]:
    """Versions, accelerator and the plugin's state, as seen by a fresh interpreter of this environment."""
    probe = subprocess.run(
        [sys.executable, "-c", _PROBE],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "DISABLE_VERSION_CHECK": "1"},
    )
    try:
        seen = json.loads(probe.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        seen = {"trio_error": f"the probe interpreter failed: {probe.stderr.strip()[-500:]}"}

    return {
        "tpo-plugin": __version__,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {name: installed_version(name) for name in (*TORCH_TRIO, *LIBRARIES, *OPTIONAL_LIBRARIES)},
        "cuda": seen.get("cuda"),
        "cuda_version": seen.get("cuda_version"),
        "gpus": seen.get("gpus", []),
        "nvidia_driver": nvidia_driver(),
        "trio_error": seen.get("trio_error"),
        "hook_files": [str(path) for path in hook_files()],
        "hook_disabled": os.environ.get(DISABLE_ENV, "").strip().lower() in {"1", "true", "yes", "on"},
        "hook_active": seen.get("hook_active", False),
        "stage_tpo": seen.get("stage_tpo", False),
        "llamafactory_error": seen.get("llamafactory_error"),
    }


def nvidia_driver() -> dict[str, Any] | None:
    """The NVIDIA driver's version and the newest CUDA it runs, as ``nvidia-smi`` prints them (``None`` without it)."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        output = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_nvidia_smi(output)


def parse_nvidia_smi(output: str) -> dict[str, Any] | None:
    """``{"version", "cuda"}`` from ``nvidia-smi``'s header ("Driver Version: 550.54.15   CUDA Version: 12.4")."""
    driver = re.search(r"Driver Version:\s*([\d.]+)", output)
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", output)
    if driver is None:
        return None
    return {"version": driver.group(1), "cuda": cuda.group(1) if cuda else None}


def hook_files() -> list[Path]:
    """The start-up files of this environment that import the plugin's hook."""
    folders = [*site.getsitepackages(), site.getusersitepackages()]
    return [Path(folder) / HOOK_FILE for folder in folders if (Path(folder) / HOOK_FILE).is_file()]


def diagnose(report: dict[str, Any]) -> list[str]:
    """Plain sentences, one per known-broken combination in ``report``, each saying what to install (empty when
    none is found)."""
    versions, problems = report["versions"], []
    torch, vision, audio = (versions.get(name) for name in TORCH_TRIO)
    trio = ", ".join(f"{name} {versions.get(name) or 'not installed'}" for name in TORCH_TRIO)
    if report.get("trio_error") or not trio_versions_match(torch, vision, audio):
        problems.append(
            f"torch, torchvision and torchaudio are not one release set ({trio})"
            + (f": importing them fails with {report['trio_error']}" if report.get("trio_error") else "")
            + (f". Keep your torch and install its set: `{matching_trio_command(torch)}`." if torch else ".")
        )
    problems += gpu_problems(report)

    if versions.get("llamafactory") is None:
        problems.append("LLaMA-Factory is not installed: `pip install llamafactory==0.9.5` or install it from source.")

    if not report["hook_files"]:
        problems.append(
            f"The start-up hook ({HOOK_FILE}) is not in this environment's site-packages: reinstall tpo-plugin."
        )
    elif not report["hook_disabled"] and not report["hook_active"]:
        problems.append(f"The start-up hook is installed but did not run; check {', '.join(report['hook_files'])}.")
    elif report["hook_active"] and versions.get("llamafactory") and not report["stage_tpo"]:
        problems.append(
            "The hook is active but LLaMA-Factory's parser does not know stage tpo"
            + (f" ({report['llamafactory_error']})" if report.get("llamafactory_error") else "")
            + "."
        )
    return problems


def gpu_problems(report: dict[str, Any]) -> list[str]:
    """A torch that cannot use this machine's NVIDIA GPU: a CPU-only build, or one built for a CUDA newer than the
    driver runs."""
    driver, torch = report.get("nvidia_driver"), report["versions"].get("torch")
    if not driver or not torch:
        return []
    cuda, driver_cuda = report.get("cuda_version"), driver.get("cuda")
    seen = f"NVIDIA driver {driver['version']}" + (f", which runs CUDA up to {driver_cuda}" if driver_cuda else "")
    install = (
        f"`{matching_trio_command(torch, driver_cuda)}` (or the index of another CUDA {driver_cuda} or older that "
        "PyTorch builds this release for)"
        if driver_cuda
        else "a CUDA build of the same release from PyTorch's index"
    )
    if cuda is None and not report.get("trio_error"):
        return [
            f"torch {torch} is a CPU-only build, but this machine has an NVIDIA GPU ({seen}): training would run on "
            f"the CPU. Install {install}."
        ]
    if cuda and driver_cuda and _numbers(cuda) > _numbers(driver_cuda):
        return [
            f"torch {torch} is built for CUDA {cuda}, but the {seen}: torch cannot use the GPU. Update the NVIDIA "
            f"driver, or install {install}."
        ]
    return []


def matching_trio_command(torch: str, cuda: str | None = None) -> str:
    """The pip command that makes torch, torchvision and torchaudio one set around ``torch``'s release.

    Without ``cuda`` it keeps the installed torch and adds the torchvision and torchaudio of its release and
    build (``+cu126`` builds come from PyTorch's index of that name); with ``cuda`` it installs the whole set
    built for that CUDA version.
    """
    torch_release = release(torch)
    minor, patch = (torch_release.split(".") + ["0", "0"])[1:3]
    vision, audio = f"0.{int(minor) + 15}.{patch}", torch_release
    if cuda is not None:
        index = "cu" + "".join(cuda.split(".")[:2])
        trio = f"torch=={torch_release} torchvision=={vision} torchaudio=={audio}"
        return f"pip install {trio} --index-url {PYTORCH_INDEX}/{index}"
    label = torch.partition("+")[2]
    if label:
        trio = f"torchvision=={vision}+{label} torchaudio=={audio}+{label}"
        return f"pip install {trio} --index-url {PYTORCH_INDEX}/{label}"
    return f"pip install torchvision=={vision} torchaudio=={audio}"


def untested_versions(report: dict[str, Any]) -> list[str]:
    """Warnings, not problems: a torch or LLaMA-Factory outside the versions the suite has run on."""
    versions, warnings = report["versions"], []
    torch = versions.get("torch")
    if torch and not _numbers(TESTED_TORCH[0]) <= _numbers(release(torch)) <= _numbers(TESTED_TORCH[-1]):
        warnings.append(
            f"torch {torch} is outside the releases tpo-plugin is tested with ({TESTED_TORCH[0]} to "
            f"{TESTED_TORCH[-1]}); it is admitted, but if something fails, try the tested set (constraints/)."
        )
    llamafactory = versions.get("llamafactory")
    if llamafactory and release(llamafactory) not in SUPPORTED_LLAMAFACTORY_VERSIONS:
        warnings.append(
            f"LLaMA-Factory {llamafactory} is not a version tpo-plugin is tested with ({SUPPORTED_LLAMAFACTORY}); "
            "its patches stop with a clear error if LLaMA-Factory's internals moved under them."
        )
    return warnings


def _numbers(version: str) -> tuple[int, ...]:
    """The leading numeric parts of a version, to compare: ``12.4`` -> (12, 4); ``0.9.6.dev0`` -> (0, 9, 6)."""
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0].split(".dev")[0])[:3])


def trio_versions_match(torch: str | None, torchvision: str | None, torchaudio: str | None) -> bool:
    """Whether three versions form one PyTorch release set: with torch X.Y.Z, torchaudio X.Y.Z and torchvision
    0.(Y+15).Z.

    That numbering has held since torch 2.0 / torchvision 0.15 / torchaudio 2.0; local labels (+cu128, +cpu)
    are ignored.
    """
    if not (torch and torchvision and torchaudio):
        return False
    torch_release, vision_release, audio_release = (release(v).split(".") for v in (torch, torchvision, torchaudio))
    if len(torch_release) < 3 or len(vision_release) < 3 or not all(part.isdigit() for part in torch_release[:2]):
        return False
    expected_vision = ["0", str(int(torch_release[1]) + 15), torch_release[2]]
    return audio_release[:3] == torch_release[:3] and vision_release[:3] == expected_vision


def render(report: dict[str, Any], problems: list[str], warnings: list[str]) -> str:
    versions = report["versions"]
    accelerator = ", ".join(report["gpus"]) if report["gpus"] else "none (CPU only)"
    if report["gpus"]:
        accelerator += f" ({len(report['gpus'])} GPU(s), CUDA {report['cuda_version']})"
    if report["hook_disabled"]:
        hook = f"installed, turned off by {DISABLE_ENV}"
    elif report["hook_active"]:
        hook = "installed and active" + (", stage tpo registered" if report["stage_tpo"] else "")
    else:
        hook = "installed but not active" if report["hook_files"] else "not installed"

    rows = [
        ("tpo-plugin", report["tpo-plugin"]),
        ("Platform", report["platform"]),
        ("Python", report["python"]),
        *((name, versions[name] or "not installed") for name in (*TORCH_TRIO, *LIBRARIES)),
        *((name, versions[name]) for name in OPTIONAL_LIBRARIES if versions[name]),
        ("Accelerator", accelerator),
        ("NVIDIA driver", _driver_line(report.get("nvidia_driver"))),
        ("Start-up hook", hook),
    ]
    lines = [f"- {name}: {value}" for name, value in rows]
    lines.append("")
    lines += [f"WARNING: {warning}" for warning in warnings]
    lines += [f"PROBLEM: {problem}" for problem in problems] or ["No known problem found."]
    return "\n".join(lines)


def _driver_line(driver: dict[str, Any] | None) -> str:
    if not driver:
        return "none found (no nvidia-smi)"
    return driver["version"] + (f" (runs CUDA up to {driver['cuda']})" if driver.get("cuda") else "")
