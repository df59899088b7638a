"""The ``disel`` command line: thin, it parses, validates and calls the library.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
modules are imported only when their command runs, so ``disel --help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from collections.abc import Sequence

from .errors import UserError

# name -> (module, one-line help); a command's module is imported only when that command runs
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("disel.commands.demo", "Fine-tune the shipped tiny model with LoRA and DISeL and report."),
    "toy": ("disel.commands.toy", "The two-population regression of the paper's section 2, with theory."),
    "train": ("disel.commands.train", "Fine-tune a model from a YAML config."),
    "sweep": ("disel.commands.sweep", "Run a grid of trainings that survives being killed."),
    "eval": ("disel.commands.eval", "Evaluate a base model, an adapter or a run directory."),
    "eval-code": ("disel.commands.eval_code", "Score HumanEval completions (pass@1) in a sandbox."),
    "report": ("disel.commands.report", "Tables and plots from a results store."),
    "gates": ("disel.commands.gates", "Record and plot the gates of a DISeL adapter on several domains."),
    "compact": ("disel.commands.compact", "Drop closed gates and fold open ones into a mergeable part."),
    "bench": ("disel.commands.bench", "Time DISeL against LoRA on this machine."),
    "methods": ("disel.commands.methods", "List the registered fine-tuning methods."),
    "lm-eval": ("disel.commands.lm_eval", "Run lm-eval's command line with DISeL adapters loadable."),
}


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the ``selected`` command's module is imported to add its arguments."""
    parser = argparse.ArgumentParser(
        prog="disel", description="Fine-tune pretrained models without catastrophic forgetting."
    )
    parser.add_argument("--version", action="version", version=f"disel {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (mod, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=mod)
        if name == selected:
            importlib.import_module(mod).add_arguments(p)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # transformers 5.x warns about its own renamed APIs when PEFT calls them; nothing a user can act on
    warnings.filterwarnings(
        "ignore", message=".*is deprecated and will be removed in v6.*", category=FutureWarning
    )
    selected = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(selected)
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    module = importlib.import_module(args._module)
    try:
        return int(module.run(args) or 0)
    except (UserError, FileNotFoundError) as e:
        if os.environ.get("DISEL_DEBUG"):
            raise
        msg = str(e) if isinstance(e, UserError) else f"{e.strerror or e}: {e.filename} (check the path)."
        print(f"disel {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"disel {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
