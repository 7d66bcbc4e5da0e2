"""LlamaBoard without a browser: build the Train tab as ``llamafactory-cli webui`` does and feed its runner the
values a user would have entered, keyed by element id (``top.model_name``, ``train.tpo_noise_step`` ...).

Run as a script (``python webui_helpers.py OUT.json``) it writes, as JSON, the training arguments the runner
builds for every stage of the stage dropdown: the tests compare them with and without the plugin.
"""

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


DATA_INFO = Path(__file__).resolve().parent.parent / "data_info"

# What a user fills in before Preview/Start (LLaMA-Factory refuses to preview without them).
USER_VALUES = {
    "top.lang": "en",
    "top.model_name": "Qwen2-VL-2B-Instruct",
    "top.model_path": "/models/tiny-qwen2-vl",
    "top.template": "qwen2_vl",
    "train.dataset_dir": str(DATA_INFO),
    "train.dataset": ["tpo_demo"],
    "train.output_dir": "run",
    "train.config_path": "tpo.yaml",
    "train.reward_model": ["rm"],  # PPO needs one; the other stages ignore it
}


@dataclass
class TrainTab:
    """LlamaBoard's engine and the Blocks holding its top bar and Train tab."""

    engine: Any
    blocks: Any

    def bound(self, handler: Callable) -> tuple[list[Any], list[Any]]:
        """The input and output elements of the event that calls ``handler`` (a runner method)."""
        (block_fn,) = [block_fn for block_fn in self.blocks.fns.values() if block_fn.fn == handler]
        return block_fn.inputs, block_fn.outputs

    def data(self, **values: Any) -> dict[Any, Any]:
        """What the runner gets from Preview/Start: each input element's initial value, then ``USER_VALUES`` and
        ``values`` (element ids with ``__`` for ``.``)."""
        inputs, _ = self.bound(self.engine.runner.preview_train)
        data = {elem: elem.value for elem in inputs}
        for elem_id, value in {**USER_VALUES, **{k.replace("__", "."): v for k, v in values.items()}}.items():
            data[self.engine.manager.get_elem_by_id(elem_id)] = value
        return data

    def stage_args(self) -> dict[str, dict[str, Any]]:
        """The runner's training arguments for each stage label of the dropdown, all other values as above."""
        from llamafactory.extras.constants import TRAINING_STAGES

        runner = self.engine.runner
        return {label: runner._parse_train_args(self.data(train__training_stage=label)) for label in TRAINING_STAGES}


def build_train_tab() -> TrainTab:
    """The top bar and the Train tab, built as ``webui.interface.create_ui`` builds them (the Engine writes
    ``llamaboard_cache/`` into the working directory)."""
    import gradio as gr
    from llamafactory.webui.components import create_top, create_train_tab
    from llamafactory.webui.engine import Engine

    engine = Engine()
    with gr.Blocks() as blocks:
        engine.manager.add_elems("top", create_top())
        with gr.Tab("Train"):
            engine.manager.add_elems("train", create_train_tab(engine))
    return TrainTab(engine, blocks)


if __name__ == "__main__":
    Path(sys.argv[1]).write_text(json.dumps(build_train_tab().stage_args()))
