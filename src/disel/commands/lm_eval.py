"""``disel lm-eval ARGS...``: lm-evaluation-harness's own command line, with disel's adapter types registered.

lm-eval's ``--model hf --model_args pretrained=BASE,peft=ADAPTER`` loads the adapter with
``PeftModel.from_pretrained``, which knows a DISeL (or Queryable) adapter only once disel has registered its
PEFT type; the plain ``lm_eval`` console script never imports disel, so there PEFT fails with
``KeyError: 'DISEL'``. This command registers the types, then runs lm-eval's entry point
(``lm_eval.__main__.cli_evaluate``) on every argument after ``lm-eval``, untouched::

    disel lm-eval --model hf --model_args pretrained=BASE,peft=ADAPTER --tasks hellaswag --batch_size 8
    disel lm-eval run --model hf ... ; disel lm-eval ls tasks        # lm-eval's subcommands too

Without the ``disel`` script: ``python -c "import disel; from lm_eval.__main__ import cli_evaluate;
cli_evaluate()" --model hf ...`` does the same.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "lm_eval_args",
        nargs=argparse.REMAINDER,
        metavar="LM_EVAL_ARGS",
        help="Every argument of lm-eval's own command line (see `disel lm-eval --help`), passed through.",
    )
    module = p.get_default("_module")

    # Everything after `lm-eval` belongs to lm-eval, options first included (`--model hf ...`), which
    # argparse's REMAINDER does not take when it starts with an option; so this parser takes all of it as is.
    def parse_known_args(
        args: list[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        ns = namespace if namespace is not None else argparse.Namespace()
        ns._module = module
        ns.lm_eval_args = list(sys.argv[1:] if args is None else args)
        return ns, []

    p.parse_known_args = parse_known_args  # type: ignore[method-assign]


def run(args: argparse.Namespace) -> int:
    from ..methods.peft_registration import ensure_registered

    ensure_registered()
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as e:
        raise UserError(
            f"lm-evaluation-harness cannot be imported ({e}): install it with "
            "`pip install 'lm-eval>=0.4.9,<0.5'`."
        ) from None
    argv: list[str] = list(args.lm_eval_args)
    if argv[:1] in (["-h"], ["--help"]):
        print(
            "disel lm-eval: lm-eval's command line, run after `import disel` so that DISeL and Queryable "
            "adapters load with --model_args peft=ADAPTER. lm-eval's own help follows.\n"
        )
    return _call_with_argv(cli_evaluate, ["lm-eval", *argv])


def _call_with_argv(entry: Any, argv: list[str]) -> int:
    """Run a console-script entry that reads ``sys.argv``; its exit status (``SystemExit`` included)."""
    saved = sys.argv
    sys.argv = argv
    try:
        entry()
    except SystemExit as e:
        code = e.code
        if code is None or isinstance(code, int):
            return int(code or 0)
        print(code, file=sys.stderr)
        return 1
    finally:
        sys.argv = saved
    return 0
