"""Every place where tpo-plugin reaches into LLaMA-Factory's internals.

LLaMA-Factory 0.9.5 has no registry for training stages, so ``stage: tpo`` needs three small patches,
each applied by :mod:`tpo_plugin._bootstrap` right after LLaMA-Factory has executed the module:

- ``llamafactory.hparams.parser``: the argument lists name :class:`TPOFinetuningArguments` instead of
  ``FinetuningArguments``, so ``stage: tpo`` and the ``tpo_*`` keys parse (YAML, ``key=value`` and argv).
- ``llamafactory.train.tuner``: ``_training_function`` dispatches on ``stage`` through a hard-coded
  if/elif that ends in "Unknown task". The patched ``get_train_args`` hands a TPO run to that chain as
  ``dpo`` and the patched ``run_dpo`` routes it to :func:`tpo_plugin.workflow.run_tpo`, which restores
  ``stage = "tpo"`` before anything reads it. Callbacks are built by LLaMA-Factory's own code.

Besides, :func:`regularize_images` reads images exactly as LLaMA-Factory's multimodal plugins do.

Each patch checks that what it replaces exists and otherwise fails loudly, naming the LLaMA-Factory
version this module was written for. Upgrading LLaMA-Factory means reading this file.
"""

import sys
from types import ModuleType
from typing import Any, Callable

from . import _bootstrap


SUPPORTED_LLAMAFACTORY = "0.9.5"
_PATCHED_MARK = "_tpo_plugin_patched"


class IncompatibleLlamaFactoryError(RuntimeError):
    """LLaMA-Factory's internals differ from those the plugin was written for."""


def _require(module: ModuleType, attribute: str) -> Any:
    if not hasattr(module, attribute):
        version = _installed_llamafactory_version()
        raise IncompatibleLlamaFactoryError(
            f"tpo-plugin expects `{module.__name__}.{attribute}`, which LLaMA-Factory {version} does not have; "
            f"the plugin was written for LLaMA-Factory {SUPPORTED_LLAMAFACTORY}. "
            f"Install llamafactory=={SUPPORTED_LLAMAFACTORY}, "
            f"or set {_bootstrap.DISABLE_ENV}=1 to turn the plugin off."
        )
    return getattr(module, attribute)


def _installed_llamafactory_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llamafactory")
    except PackageNotFoundError:
        return "(unknown version)"


def patch_parser(parser: ModuleType) -> bool:
    """Let the train/infer/eval parsers build ``TPOFinetuningArguments`` instead of ``FinetuningArguments``."""
    hparams = sys.modules.get("tpo_plugin.hparams")
    if hparams is not None and not hasattr(hparams, "TPOFinetuningArguments"):
        # Importing tpo_plugin.hparams is what loads LLaMA-Factory here, so the class does not exist yet;
        # hparams.py applies this patch itself once it does.
        return False

    from llamafactory.hparams.finetuning_args import FinetuningArguments

    from .hparams import TPOFinetuningArguments

    for list_name in ("_TRAIN_ARGS", "_INFER_ARGS", "_EVAL_ARGS"):
        dataclass_list = _require(parser, list_name)
        # Find the entry by identity: newer LLaMA-Factory versions reorder these lists.
        positions = [i for i, cls in enumerate(dataclass_list) if cls is FinetuningArguments]
        if len(positions) != 1:
            raise IncompatibleLlamaFactoryError(
                f"`{parser.__name__}.{list_name}` should hold FinetuningArguments once "
                f"(LLaMA-Factory {SUPPORTED_LLAMAFACTORY}); found it {len(positions)} times."
            )
        dataclass_list[positions[0]] = TPOFinetuningArguments
    return True


def patch_tuner(tuner: ModuleType) -> bool:
    """Route ``stage: tpo`` through LLaMA-Factory's own ``_training_function`` to ``run_tpo``."""
    _require(tuner, "_training_function")
    get_train_args = _require(tuner, "get_train_args")
    run_dpo = _require(tuner, "run_dpo")

    def get_train_args_with_tpo(*args, **kwargs):
        model_args, data_args, training_args, finetuning_args, generating_args = get_train_args(*args, **kwargs)
        if finetuning_args.stage == "tpo":
            if getattr(finetuning_args, "use_mca", False):  # the chain would pick Megatron's DPO instead
                raise ValueError("stage tpo does not support USE_MCA (Megatron-Core) training; unset USE_MCA.")
            finetuning_args.stage = "dpo"  # the dispatch chain knows no "tpo"; run_dpo_or_tpo restores it
            finetuning_args.tpo_routed = True
        return model_args, data_args, training_args, finetuning_args, generating_args

    def run_dpo_or_tpo(model_args, data_args, training_args, finetuning_args, callbacks=None):
        if not getattr(finetuning_args, "tpo_routed", False):
            return run_dpo(model_args, data_args, training_args, finetuning_args, callbacks)

        finetuning_args.stage = "tpo"
        del finetuning_args.tpo_routed
        from .workflow import run_tpo

        return run_tpo(model_args, data_args, training_args, finetuning_args, callbacks)

    tuner.get_train_args = get_train_args_with_tpo
    tuner.run_dpo = run_dpo_or_tpo
    return True


def regularize_images(mm_plugin: Any, images: list[Any], processor: Any) -> list[Any]:
    """Open and resize images exactly as ``mm_plugin.get_mm_inputs`` does (LLaMA-Factory 0.9.5, ``_get_mm_inputs``)."""
    regularize = getattr(mm_plugin, "_regularize_images", None)
    if regularize is None:
        raise IncompatibleLlamaFactoryError(
            f"tpo-plugin expects `{type(mm_plugin).__name__}._regularize_images` "
            f"(LLaMA-Factory {SUPPORTED_LLAMAFACTORY}); the installed LLaMA-Factory does not have it."
        )
    return regularize(
        images,
        image_max_pixels=getattr(processor, "image_max_pixels", 768 * 768),
        image_min_pixels=getattr(processor, "image_min_pixels", 32 * 32),
    )["images"]


def aligned_datasets(dataset_names: list[str] | None, model_args: Any, data_args: Any, training_args: Any) -> dict:
    """Each dataset as LLaMA-Factory aligns it before tokenising (``_prompt``, ``_response``, ``_images`` ...)."""
    from llamafactory.data import loader

    if not dataset_names:
        return {}
    merged = _require(loader, "_get_merged_dataset")
    return merged(dataset_names, model_args, data_args, training_args, stage="rm", return_dict=True)


# Each patch returns whether it was applied (False: deferred, it will be applied again later).
PATCHES: dict[str, Callable[[ModuleType], bool]] = {
    "llamafactory.hparams.parser": patch_parser,
    "llamafactory.train.tuner": patch_tuner,
}


_deferred: dict[str, ModuleType] = {}


def apply(module_name: str, module: ModuleType) -> None:
    """Apply the patch for ``module_name`` once; a second call for the same module does nothing."""
    if getattr(module, _PATCHED_MARK, False):
        return
    if PATCHES[module_name](module):
        setattr(module, _PATCHED_MARK, True)
    else:
        _deferred[module_name] = module


def apply_deferred() -> None:
    """Apply the patches that had to wait for a plugin module to finish importing."""
    while _deferred:
        apply(*_deferred.popitem())
