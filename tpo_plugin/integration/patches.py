"""Every place where tpo-plugin reaches into LLaMA-Factory's internals.

LLaMA-Factory 0.9.5 has no registry for training stages, so ``stage: tpo`` needs three small patches,
each applied by :mod:`tpo_plugin.integration.bootstrap` right after LLaMA-Factory has executed the module:

- ``llamafactory.hparams.parser``: the argument lists name :class:`TPOFinetuningArguments` instead of
  ``FinetuningArguments``, so ``stage: tpo`` and the ``tpo_*`` keys parse (YAML, ``key=value`` and argv).
- ``llamafactory.train.tuner``: ``_training_function`` dispatches on ``stage`` through a hard-coded
  if/elif that ends in "Unknown task". The patched ``get_train_args`` hands a TPO run to that chain as
  ``dpo`` and the patched ``run_dpo`` routes it to :func:`tpo_plugin.training.workflow.run_tpo`, which restores
  ``stage = "tpo"`` before anything reads it. Callbacks are built by LLaMA-Factory's own code.

For the web UI (LlamaBoard), four more, with the UI pieces themselves in :mod:`tpo_plugin.webui.panel`:
``llamafactory.extras.constants`` (TPO in the stage dropdown, with ranking datasets),
``llamafactory.webui.locales`` (the panel's texts), ``llamafactory.webui.runner`` (TPO's arguments, checks and
a launch in the UI's own environment) and ``llamafactory.webui.components.train`` (the TPO panel).

Each patch checks that what it replaces exists (:func:`tpo_plugin.compat.require`) and otherwise fails
loudly, naming the LLaMA-Factory versions this module was written for. The private helpers that training reads
are behind the same guard in :mod:`tpo_plugin.integration.internals`. Upgrading LLaMA-Factory means reading
these two modules.
"""

import sys
from types import ModuleType
from typing import Any, Callable

from ..compat import SUPPORTED_LLAMAFACTORY, IncompatibleLlamaFactoryError, require


_PATCHED_MARK = "_tpo_plugin_patched"
# The module that defines TPOFinetuningArguments; the start-up hook applies deferred patches once it has run.
ARGUMENTS_MODULE = "tpo_plugin.hparams.tpo_args"


def patch_parser(parser: ModuleType) -> bool:
    """Let the train/infer/eval parsers build ``TPOFinetuningArguments`` instead of ``FinetuningArguments``."""
    hparams = sys.modules.get(ARGUMENTS_MODULE)
    if hparams is not None and not hasattr(hparams, "TPOFinetuningArguments"):
        # Importing the arguments module is what loads LLaMA-Factory here, so the class does not exist yet;
        # the start-up hook applies this patch again once that module has executed.
        return False

    from llamafactory.hparams.finetuning_args import FinetuningArguments

    from ..hparams.tpo_args import TPOFinetuningArguments

    for list_name in ("_TRAIN_ARGS", "_INFER_ARGS", "_EVAL_ARGS"):
        dataclass_list = require(parser, list_name)
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
    require(tuner, "_training_function")
    get_train_args = require(tuner, "get_train_args")
    run_dpo = require(tuner, "run_dpo")

    def get_train_args_with_tpo(*args, **kwargs):
        model_args, data_args, training_args, finetuning_args, generating_args = get_train_args(*args, **kwargs)
        if finetuning_args.stage == "tpo":
            if getattr(finetuning_args, "use_mca", False):  # the chain would pick Megatron's DPO instead
                raise ValueError("stage tpo does not support USE_MCA (Megatron-Core) training; unset USE_MCA.")
            finetuning_args.stage = "dpo"  # the dispatch chain knows no "tpo"; run_dpo_or_tpo restores it
            finetuning_args.tpo_routed = True
        return model_args, data_args, training_args, finetuning_args, generating_args

    def run_dpo_or_tpo(model_args, data_args, training_args, finetuning_args, callbacks=None, **tpo_options):
        """``run_dpo``, or ``run_tpo`` for a routed TPO run (``tpo_options``: run_tpo's keywords, for harnesses)."""
        if not getattr(finetuning_args, "tpo_routed", False):
            return run_dpo(model_args, data_args, training_args, finetuning_args, callbacks)

        finetuning_args.stage = "tpo"
        del finetuning_args.tpo_routed
        from ..training.workflow import run_tpo

        return run_tpo(model_args, data_args, training_args, finetuning_args, callbacks, **tpo_options)

    tuner.get_train_args = get_train_args_with_tpo
    tuner.run_dpo = run_dpo_or_tpo
    return True


# --- Web UI (LlamaBoard) -------------------------------------------------------------------------------------
# Labels, the panel and the argument mapping live in tpo_plugin.webui.panel; only the reach-ins are here.

TPO_STAGE_LABEL = "TPO"  # the stage dropdown's entry; LLaMA-Factory does not translate stage names


def patch_constants(constants: ModuleType) -> bool:
    """Offer TPO in the web UI's stage dropdown, right after DPO, and list ranking datasets for it.

    Only the web UI reads these two tables, so training processes are unaffected. Mutated in place: the UI
    modules import the objects by name.
    """
    stages = require(constants, "TRAINING_STAGES")
    pair_stages = require(constants, "STAGES_USE_PAIR_DATA")
    entries = list(stages.items())
    after_dpo = next((i + 1 for i, (_, stage) in enumerate(entries) if stage == "dpo"), len(entries))
    entries.insert(after_dpo, (TPO_STAGE_LABEL, "tpo"))
    stages.clear()
    stages.update(entries)
    pair_stages.add("tpo")
    return True


def patch_locales(locales: ModuleType) -> bool:
    """Add the TPO panel's labels and help texts (en, ru, zh, ko, ja) to LLaMA-Factory's ``LOCALES``."""
    table = require(locales, "LOCALES")
    from ..webui.panel import LOCALES as TPO_LOCALES

    clashes = set(table) & set(TPO_LOCALES)
    if clashes:
        raise IncompatibleLlamaFactoryError(
            f"`{locales.__name__}.LOCALES` already has entries named {sorted(clashes)}, which tpo-plugin adds; "
            f"the plugin was written for LLaMA-Factory {SUPPORTED_LLAMAFACTORY}."
        )
    table.update(TPO_LOCALES)
    return True


def patch_runner(runner: ModuleType) -> bool:
    """Let the web UI's runner check, build and launch TPO runs.

    - ``_parse_train_args`` passes ``pref_*`` only for dpo/kto: for tpo it adds them and the ``tpo_*`` values.
    - ``_initialize`` (called by preview, save and start) also refuses, with the CLI's message, a TPO run the
      CLI would refuse before loading anything (a bad ``tpo_*`` value or refused option, a text-only template,
      a non-ranking dataset).
    - ``Popen`` (the module's name for ``subprocess.Popen``) starts ``llamafactory-cli`` as
      ``python -m llamafactory.cli`` with this interpreter, so training runs in the UI's own environment
      rather than with whichever ``llamafactory-cli`` comes first on ``PATH``.
    """
    runner_class = require(runner, "Runner")
    parse_train_args = require(runner_class, "_parse_train_args")
    initialize = require(runner_class, "_initialize")
    training_stages = require(runner, "TRAINING_STAGES")
    popen = require(runner, "Popen")
    from ..webui import panel as webui

    def parse_train_args_with_tpo(self, data):
        args = parse_train_args(self, data)
        if args["stage"] == "tpo":
            args.update(webui.tpo_train_args(lambda elem_id: data[self.manager.get_elem_by_id(elem_id)]))
        return args

    def initialize_with_tpo_checks(self, data, do_train, from_preview):
        error = initialize(self, data, do_train, from_preview)
        stage = training_stages[data[self.manager.get_elem_by_id("train.training_stage")]] if do_train else None
        if error or stage != "tpo":
            return error
        return webui.check_tpo_args(self._parse_train_args(data))

    def popen_in_this_environment(args, *popen_args, **popen_kwargs):
        if isinstance(args, list) and args[:1] == ["llamafactory-cli"]:
            args = [sys.executable, "-m", "llamafactory.cli", *args[1:]]
        return popen(args, *popen_args, **popen_kwargs)

    runner_class._parse_train_args = parse_train_args_with_tpo
    runner_class._initialize = initialize_with_tpo_checks
    runner.Popen = popen_in_this_environment
    return True


def patch_train_tab(train: ModuleType) -> bool:
    """Add the TPO settings panel to the Train tab, right after the RLHF panel, bound like LLaMA-Factory's own.

    ``create_train_tab`` binds preview, save, load and start to a set of input elements that starts as
    ``engine.manager.get_base_elems()``. The wrapper builds the TPO panel first, has that call return the
    panel's controls as well while the tab is built, then moves the panel after the RLHF accordion and returns
    its elements with the tab's, so the manager registers them as ``train.tpo_*`` (ids the runner reads).
    """
    create_train_tab = require(train, "create_train_tab")
    from ..webui import panel as webui

    def create_train_tab_with_tpo(engine):
        manager_class = type(engine.manager)
        get_base_elems = require(manager_class, "get_base_elems")
        tpo_elems = webui.create_tpo_tab()
        engine.manager.get_base_elems = lambda: get_base_elems(engine.manager) | webui.input_elems(tpo_elems)
        try:
            elem_dict = create_train_tab(engine)
        finally:
            del engine.manager.get_base_elems

        for name in ("rlhf_tab", "training_stage"):
            if name not in elem_dict:
                raise IncompatibleLlamaFactoryError(
                    f"`{train.__name__}.create_train_tab` returned no `{name}` element; "
                    f"tpo-plugin was written for LLaMA-Factory {SUPPORTED_LLAMAFACTORY}."
                )
        _place_after(tpo_elems["tpo_tab"], elem_dict["rlhf_tab"])
        stage, stages = elem_dict["training_stage"], require(train, "TRAINING_STAGES")
        stage.change(lambda label: webui.toggle_tpo_tab(stages.get(label)), stage, tpo_elems["tpo_tab"], queue=False)
        return {**elem_dict, **tpo_elems}

    train.create_train_tab = create_train_tab_with_tpo
    return True


def _place_after(block: Any, anchor: Any) -> None:
    """Move a gradio block right after ``anchor`` among their parent's children (gradio lays a page out in
    that order)."""
    parent = getattr(anchor, "parent", None)
    children = getattr(parent, "children", None)
    if not isinstance(children, list) or block not in children:
        raise IncompatibleLlamaFactoryError(
            "tpo-plugin places its panel among the Train tab's children (gradio 5 `Block.parent.children`), "
            "which this gradio does not have."
        )
    children.remove(block)
    children.insert(children.index(anchor) + 1, block)


# Each patch returns whether it was applied (False: deferred, it will be applied again later).
PATCHES: dict[str, Callable[[ModuleType], bool]] = {
    "llamafactory.hparams.parser": patch_parser,
    "llamafactory.train.tuner": patch_tuner,
    "llamafactory.extras.constants": patch_constants,
    "llamafactory.webui.locales": patch_locales,
    "llamafactory.webui.runner": patch_runner,
    "llamafactory.webui.components.train": patch_train_tab,
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
