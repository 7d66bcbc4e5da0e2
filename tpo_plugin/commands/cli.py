"""``tpo-plugin`` / ``python -m tpo_plugin``: the plugin's own commands.

Training itself is ``llamafactory-cli train``; these commands prepare data, run the offline demo, run ablation
sweeps (each through ``llamafactory-cli train``) and report the environment.
"""

import argparse
import importlib
from typing import Optional


# sub-command -> module defining ``add_arguments(parser)`` and ``run(args) -> int``. The modules import
# nothing heavy at module level, so ``--help`` stays instant.
COMMANDS = {
    "demo": (
        "tpo_plugin.commands.demo",
        "train TPO on the shipped demo set with a tiny local model (offline, ~15 s on CPU)",
    ),
    "sweep": ("tpo_plugin.commands.sweep", "run a recipe once per value of a key and tabulate the final metrics"),
    "convert": ("tpo_plugin.commands.convert", "convert RLHF-V / RLAIF-V files to LLaMA-Factory's preference format"),
    "eval": ("tpo_plugin.commands.eval", "score POPE / AMBER hallucination benchmarks on a LLaMA-Factory model"),
    "inspect": ("tpo_plugin.commands.inspect", "per-token visual scores and weights TPO gives a recipe's pairs"),
    "env": ("tpo_plugin.commands.env", "print versions and the plugin's state for a bug report, and known problems"),
}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tpo-plugin", description="tpo-plugin's own commands; training itself is `llamafactory-cli train`."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        subparser = subparsers.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(subparser)
        subparser.set_defaults(run=module.run)

    args = parser.parse_args(argv)
    return args.run(args)
