"""Installing the plugin next to a user's torch and LLaMA-Factory keeps them, wherever pyproject.toml admits them.

pip's own resolver decides, in a scratch environment that holds metadata-only stand-ins (a ``*.dist-info``
with a METADATA file) of what a user has installed; ``--no-index`` means nothing is downloaded, so any
requirement the stand-ins do not satisfy fails the resolution instead of replacing them.
"""

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]

# A user who installed torch for their own driver, and the rest of what the plugin requires.
USER_ENVIRONMENT = {
    "torch": "2.10.0",
    "torchvision": "0.25.0",
    "torchaudio": "2.10.0",
    "transformers": "5.6.0",
    "peft": "0.18.1",
    "trl": "0.24.0",
    "pillow": "11.3.0",
}


@pytest.fixture(scope="module")
def plugin_wheel_dir(tmp_path_factory) -> Path:
    """The plugin built as a wheel, as pip builds it from this checkout."""
    wheel_dir = tmp_path_factory.mktemp("wheel")
    command = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        str(wheel_dir),
        str(ROOT),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return wheel_dir


def dry_run_install(stand_ins: dict[str, str], wheel_dir: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """``pip install tpo-plugin --dry-run`` into a fresh environment holding only ``stand_ins``."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site_packages = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    for name, version in stand_ins.items():
        dist_info = site_packages / f"{name}-{version}.dist-info"
        dist_info.mkdir(parents=True)
        (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        (dist_info / "INSTALLER").write_text("pip\n")
    report = tmp_path / "report.json"
    python = venv / "bin" / "python"
    command = [sys.executable, "-m", "pip", "--python", str(python), "install", "--dry-run", "--no-index"]
    command += ["--find-links", str(wheel_dir), "--report", str(report), "tpo-plugin"]
    return subprocess.run(command, capture_output=True, text=True)


@pytest.mark.parametrize("llamafactory", ["0.9.5", "0.9.6.dev0", "0.9.6"])
def test_installing_the_plugin_keeps_an_admitted_torch_and_llamafactory(llamafactory, plugin_wheel_dir, tmp_path):
    result = dry_run_install({**USER_ENVIRONMENT, "llamafactory": llamafactory}, plugin_wheel_dir, tmp_path)
    assert result.returncode == 0, f"pip would replace part of the environment:\n{result.stderr[-3000:]}"
    report = json.loads((tmp_path / "report.json").read_text())
    assert [item["metadata"]["name"] for item in report["install"]] == ["tpo-plugin"]


@pytest.mark.parametrize(
    "changed",
    [{"torch": "2.9.1", "torchvision": "0.24.1", "torchaudio": "2.9.1"}, {"llamafactory": "0.10.0"}],
    ids=["torch-2.9", "llamafactory-0.10"],
)
def test_a_version_outside_the_admitted_ranges_would_be_replaced(changed, plugin_wheel_dir, tmp_path):
    # The control: the same resolution does not accept everything, so the test above can fail.
    result = dry_run_install({**USER_ENVIRONMENT, "llamafactory": "0.9.5", **changed}, plugin_wheel_dir, tmp_path)
    assert result.returncode != 0
    assert "conflicting dependencies" in result.stderr or "No matching distribution" in result.stderr
