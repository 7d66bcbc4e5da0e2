"""Token Preference Optimization (TPO) as a training stage of LLaMA-Factory.

Installing the distribution puts ``tpo_plugin.pth`` into site-packages; it imports
:mod:`tpo_plugin.integration.bootstrap` at every interpreter start, which patches LLaMA-Factory the moment
LLaMA-Factory itself is imported. Nothing else is needed: ``stage: tpo`` then works in
``llamafactory-cli train``, its torchrun children and ``llamafactory.train.tuner.run_exp``.

This module is imported at every Python start-up, so it must stay free of heavy imports.
"""

__version__ = "0.1.0"


def install() -> None:
    """Install the import hook by hand, for interpreters started without site-packages' ``.pth`` files.

    Patches any LLaMA-Factory module that is already imported, so the call order does not matter.
    """
    from .integration import bootstrap

    bootstrap.install(force=True)
