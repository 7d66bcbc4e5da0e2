"""``tpo-plugin env``: what a bug report needs, and a plain diagnosis of combinations known not to work.

Like ``llamafactory-cli env``, plus the plugin's own state: whether the start-up hook is installed and
active (or turned off by ``TPO_PLUGIN_DISABLE``) and whether ``stage: tpo`` reaches LLaMA-Factory's parser.
Each library is imported in a child process, so one that cannot load (a torchaudio built for another
torch) is reported instead of taking the command down. Exits 1 when it finds a known-broken combination.
"""

import argparse
import json
import os
import platform
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
    TORCH_TRIO,
    installed_version,
)


LIBRARIES = ("transformers", "llamafactory", "peft", "trl", "accelerate", "datasets", "gradio")
OPTIONAL_LIBRARIES = ("deepspeed", "bitsandbytes", "vllm")
HOOK_FILE = "tpo_plugin.pth"

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
    problems = diagnose(report)
    if args.json:
        print(json.dumps({**report, "problems": problems}, indent=2))
    else:
        print(render(report, problems))
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
        "trio_error": seen.get("trio_error"),
        "hook_files": [str(path) for path in hook_files()],
        "hook_disabled": os.environ.get(DISABLE_ENV, "").strip().lower() in {"1", "true", "yes", "on"},
        "hook_active": seen.get("hook_active", False),
        "stage_tpo": seen.get("stage_tpo", False),
        "llamafactory_error": seen.get("llamafactory_error"),
    }


def hook_files() -> list[Path]:
    """The start-up files of this environment that import the plugin's hook."""
    folders = [*site.getsitepackages(), site.getusersitepackages()]
    return [Path(folder) / HOOK_FILE for folder in folders if (Path(folder) / HOOK_FILE).is_file()]


def diagnose(report: dict[str, Any]) -> list[str]:
    """Plain sentences, one per known-broken combination in ``report`` (empty when none is found)."""
    versions, problems = report["versions"], []
    torch, vision, audio = (versions.get(name) for name in TORCH_TRIO)
    trio = ", ".join(f"{name} {versions.get(name) or 'not installed'}" for name in TORCH_TRIO)
    if report.get("trio_error") or not trio_versions_match(torch, vision, audio):
        problems.append(
            f"torch, torchvision and torchaudio are not one release set ({trio})"
            + (f": importing them fails with {report['trio_error']}" if report.get("trio_error") else "")
            + ". Install the set tpo-plugin is tested with: "
            + " ".join(f"{name}=={pin}" for name, pin in TORCH_TRIO.items())
            + "."
        )

    llamafactory = versions.get("llamafactory")
    if llamafactory is None:
        problems.append("LLaMA-Factory is not installed: `pip install llamafactory==0.9.5` or install it from source.")
    elif _release(llamafactory) not in SUPPORTED_LLAMAFACTORY_VERSIONS:
        problems.append(
            f"LLaMA-Factory {llamafactory} is not a version tpo-plugin supports ({SUPPORTED_LLAMAFACTORY}); "
            "its internals may have moved under the plugin's patches."
        )

    if not report["hook_files"]:
        problems.append(
            f"The start-up hook ({HOOK_FILE}) is not in this environment's site-packages: reinstall tpo-plugin."
        )
    elif not report["hook_disabled"] and not report["hook_active"]:
        problems.append(f"The start-up hook is installed but did not run; check {', '.join(report['hook_files'])}.")
    elif report["hook_active"] and llamafactory and not report["stage_tpo"]:
        problems.append(
            "The hook is active but LLaMA-Factory's parser does not know stage tpo"
            + (f" ({report['llamafactory_error']})" if report.get("llamafactory_error") else "")
            + "."
        )
    return problems


def trio_versions_match(torch: str | None, torchvision: str | None, torchaudio: str | None) -> bool:
    """Whether three versions form one PyTorch release set: with torch X.Y.Z, torchaudio X.Y.Z and torchvision
    0.(Y+15).Z.

    That numbering has held since torch 2.0 / torchvision 0.15 / torchaudio 2.0; local labels (+cu128, +cpu)
    are ignored.
    """
    if not (torch and torchvision and torchaudio):
        return False
    torch_release, vision_release, audio_release = (_release(v).split(".") for v in (torch, torchvision, torchaudio))
    if len(torch_release) < 3 or len(vision_release) < 3 or not all(part.isdigit() for part in torch_release[:2]):
        return False
    expected_vision = ["0", str(int(torch_release[1]) + 15), torch_release[2]]
    return audio_release[:3] == torch_release[:3] and vision_release[:3] == expected_vision


def _release(version: str) -> str:
    return version.split("+", 1)[0]


def render(report: dict[str, Any], problems: list[str]) -> str:
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
        ("Start-up hook", hook),
    ]
    lines = [f"- {name}: {value}" for name, value in rows]
    lines.append("")
    lines += [f"PROBLEM: {problem}" for problem in problems] or ["No known problem found."]
    return "\n".join(lines)
