"""What the plugin is compatible with, and the guard every reach into LLaMA-Factory's internals goes through.

The plugin extends LLaMA-Factory where it has no public extension point (argument lists, the stage
dispatch, the web UI) and reads a few of its private helpers (image resizing, dataset alignment, length
cutting); all of that lives in :mod:`tpo_plugin.integration`. Each such place first calls :func:`require`, so a
LLaMA-Factory whose internals moved fails at once, naming what is missing and the versions the plugin was written
for, instead of training something else.
"""

from importlib.metadata import PackageNotFoundError, version
from types import ModuleType
from typing import Any


# The LLaMA-Factory versions CI tests: the 0.9.5 release and its main branch, which reports 0.9.6.dev0 until the
# next release. pyproject.toml admits the whole 0.9 series, so that installing the plugin never replaces a user's
# LLaMA-Factory; another version is warned about, not refused (:func:`untested_llamafactory`).
SUPPORTED_LLAMAFACTORY = "0.9.5 and 0.9.6.dev0 (main)"
SUPPORTED_LLAMAFACTORY_VERSIONS = ("0.9.5", "0.9.6.dev0")

# torch, torchvision and torchaudio are built against each other and must come from one release set.
TORCH_TRIO = ("torch", "torchvision", "torchaudio")
# The torch releases the suite has run on: the lower end pyproject.toml admits, and the set in constraints/.
TESTED_TORCH = ("2.10.0", "2.11.0")

# Must equal tpo_plugin.integration.bootstrap.DISABLE_ENV (a test checks); the start-up hook keeps its own
# copy so that it imports nothing at interpreter start.
DISABLE_ENV = "TPO_PLUGIN_DISABLE"


class IncompatibleLlamaFactoryError(RuntimeError):
    """LLaMA-Factory's internals differ from those the plugin was written for."""


def installed_version(distribution: str) -> str | None:
    """The installed version of a distribution, or ``None`` when it is not installed."""
    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def release(version: str) -> str:
    """A version without its local build label: ``2.11.0+cu130`` -> ``2.11.0``."""
    return version.split("+", 1)[0]


def untested_llamafactory() -> str | None:
    """A warning when the installed LLaMA-Factory is not a version CI tests, else ``None``."""
    installed = installed_version("llamafactory")
    if installed is None or release(installed) in SUPPORTED_LLAMAFACTORY_VERSIONS:
        return None
    return (
        f"LLaMA-Factory {installed} is not a version tpo-plugin is tested with ({SUPPORTED_LLAMAFACTORY}). Stage tpo "
        "runs, and every patch checks what it needs of LLaMA-Factory's internals and stops if that moved; if "
        "anything else looks wrong, try a tested version and report the difference."
    )


def require(owner: ModuleType | type | Any, attribute: str) -> Any:
    """``owner.attribute`` (of a module, class or object), or an :class:`IncompatibleLlamaFactoryError` naming it
    and the supported versions."""
    if not hasattr(owner, attribute):
        name = getattr(owner, "__name__", type(owner).__name__)
        raise IncompatibleLlamaFactoryError(
            f"tpo-plugin expects `{name}.{attribute}`, which LLaMA-Factory "
            f"{installed_version('llamafactory') or '(unknown version)'} does not have; the plugin was written "
            f"for LLaMA-Factory {SUPPORTED_LLAMAFACTORY}. Install one of those, "
            f"or set {DISABLE_ENV}=1 to turn the plugin off."
        )
    return getattr(owner, attribute)
