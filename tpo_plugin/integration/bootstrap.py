"""Start-up hook: patch LLaMA-Factory right after it loads the modules TPO extends.

``tpo_plugin.pth`` imports this module in every interpreter of the environment, including the
children that ``llamafactory-cli`` starts through torchrun, so it runs in processes that never
import LLaMA-Factory too. It therefore uses only what the interpreter has already loaded (``sys``,
``os``) and does nothing but put one finder on ``sys.meta_path``. The finder answers ``None`` for
every module except the few LLaMA-Factory modules listed in ``PATCHED_MODULES``; for those it
wraps the real loader so that :func:`tpo_plugin.integration.patches.apply` runs once the module has
executed. It also watches the plugin's own arguments module: when importing that module is what loads
LLaMA-Factory, the parser patch has to wait for the class the module defines, and is applied right
after the module has run.

Set ``TPO_PLUGIN_DISABLE=1`` to turn the plugin off.
"""

import os
import sys


# Must equal tpo_plugin.compat.DISABLE_ENV, the keys of tpo_plugin.integration.patches.PATCHES and its
# ARGUMENTS_MODULE (a test checks it); kept here so that the start-up path imports nothing else.
DISABLE_ENV = "TPO_PLUGIN_DISABLE"
ARGUMENTS_MODULE = "tpo_plugin.hparams.tpo_args"
PATCHED_MODULES = frozenset(
    {
        "llamafactory.hparams.parser",
        "llamafactory.train.tuner",
        "llamafactory.extras.constants",
        "llamafactory.webui.locales",
        "llamafactory.webui.runner",
        "llamafactory.webui.components.train",
    }
)


def _disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


class _PatchingLoader:
    """Delegates to the real loader and applies the plugin's patch after the module has executed."""

    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        from tpo_plugin.integration import patches

        if module.__name__ == ARGUMENTS_MODULE:
            patches.apply_deferred()
        else:
            patches.apply(module.__name__, module)


class PatchingFinder:
    """A ``sys.meta_path`` finder that only ever claims the modules in ``PATCHED_MODULES`` and ``ARGUMENTS_MODULE``."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in PATCHED_MODULES and fullname != ARGUMENTS_MODULE:
            return None

        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue

            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PatchingLoader(spec.loader)
                return spec

        return None


def install(force: bool = False) -> None:
    """Put the finder first on ``sys.meta_path`` (once) and patch modules that are already loaded."""
    if _disabled():
        return

    if not any(isinstance(finder, PatchingFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, PatchingFinder())

    already_loaded = [name for name in PATCHED_MODULES if name in sys.modules]
    if already_loaded and force:
        from tpo_plugin.integration import patches

        for name in sorted(already_loaded):
            patches.apply(name, sys.modules[name])


install()
