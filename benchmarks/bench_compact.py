"""Forward (inference) speed of a compacted DISeL adapter, with and without its static part merged.

One process, one randomly initialised Llama-style decoder (nothing downloaded), adapters on every linear
layer. The DISeL adapter is synthetic with a stated split: in every layer a random ``--closed`` fraction of
the rank components has a gate that is always closed (b_g = -12, W_g = 0), an ``--open`` fraction one that is
always open (b_g = +12, W_g = 0), and the rest input-dependent gates (b_g = 0, random W_g). The gates are then
recorded on the benchmark input and compacted with the library (``plan_compaction``,
``add_compacted_adapter``, ``merge_static``), so what is timed is what ``disel compact`` produces. The
contenders are built by ``disel.commands.bench.build_model_variants``, as for ``disel bench --model``.

Contenders, timed interleaved (random order per round, medians, paired ratios with 95% confidence intervals
of the median, :mod:`disel.utils.timing`):

* ``disel``: the uncompacted adapter (fused kernel);
* ``compact``: dropped + static + gated components (fused kernel with ``num_static``);
* ``compact_module_path``: the same on the module path (what compacted layers ran before the fused kernel
  took static components);
* ``compact_merged``: static part merged into the base weights, only the gated components left;
* ``lora``: PEFT LoRA of the same rank, unmerged;
* ``base``: the model without adapters.

    python benchmarks/bench_compact.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from disel.commands.bench import (
    _interleave,
    _on_path,
    _summary,
    add_llama_arguments,
    bench_llama,
    build_model_variants,
    machine_info,
)
from disel.utils.io import atomic_write_json
from disel.utils.timing import format_interval


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_llama_arguments(p, tokens=256)
    p.add_argument("--closed", type=float, default=0.5, help="Fraction of components with closed gates.")
    p.add_argument("--open", type=float, default=0.25, help="Fraction of components with open gates.")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="Write the results as JSON here.")
    args = p.parse_args(argv)
    if not (args.closed >= 0 and args.open >= 0 and args.closed + args.open <= 1):
        p.error("--closed and --open must be fractions with closed + open <= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = bench_llama(args.hidden, args.layers, args.vocab, args.tokens).requires_grad_(False).eval()
    ids = torch.randint(0, args.vocab, (1, args.tokens), generator=torch.Generator().manual_seed(1))
    # the contenders of `disel bench --model` (synthetic gates, recorded and compacted by the library)
    variants, info = build_model_variants(base, args.r, ids, args.closed, args.open, seed=2)
    pm, compact, merged, lora = (variants[n] for n in ("disel", "disel_compact", "disel_merged", "lora"))

    with torch.no_grad():
        logits = {n: m(input_ids=ids).logits for n, m in (("disel", pm), ("compact", compact), ("m", merged))}
    fidelity = {
        "compact_vs_disel_max_abs_logit_diff": float((logits["compact"] - logits["disel"]).abs().max()),
        "merged_vs_compact_max_abs_logit_diff": float((logits["m"] - logits["compact"]).abs().max()),
    }

    models = {
        "disel": (pm, False),
        "compact": (compact, False),
        "compact_module_path": (compact, True),
        "compact_merged": (merged, False),
        "lora": (lora, False),
        "base": (base, False),
    }

    def forward(m: torch.nn.Module) -> None:
        with torch.no_grad():
            m(input_ids=ids)

    fns = {n: _on_path(ref, lambda m=m: forward(m)) for n, (m, ref) in models.items()}
    times = _interleave(fns, args.repeats, warmup=1)
    vs_disel, vs_base = _summary(times, "disel"), _summary(times, "base")
    med = {n: statistics.median(t) for n, t in times.items()}
    overhead = med["disel"] - med["base"]
    res = {
        "shape": {**vars(args)},
        "machine": machine_info(),
        "gates": info["gates"],
        "counts": info["counts"],
        "merge_static": info["merge_static"],
        "cost": info["cost"],
        "fidelity": fidelity,
        "vs_disel": vs_disel,
        "vs_base": vs_base,
        "adapter_overhead_vs_disel": {
            n: (med[n] - med["base"]) / overhead if overhead > 0 else float("nan") for n in med
        },
    }
    c = res["counts"]
    print(
        f"Llama-style, hidden {args.hidden}, {args.layers} layers, r = {args.r}, {args.tokens} tokens, "
        f"{torch.get_num_threads()} thread(s), {args.repeats} interleaved rounds; {res['gates']}"
    )
    print(
        f"compaction: {c['components']} components, {c['dropped']} dropped, {c['folded']} folded, "
        f"{c['gated']} gated; adapter MACs/token {res['cost']['macs_per_token_before']} -> "
        f"{res['cost']['macs_per_token_after']} (merged: {res['cost']['macs_per_token_merged_static']})"
    )
    print(
        f"max |logit diff|: compact vs disel {fidelity['compact_vs_disel_max_abs_logit_diff']:.2e}, "
        f"merged vs compact {fidelity['merged_vs_compact_max_abs_logit_diff']:.2e}"
    )
    ci = f"{vs_disel['lora']['ratio_ci_level']:.0%} CI"
    print(f"| contender | forward | × DISeL [{ci}] | × base [{ci}] | adapter overhead × DISeL's |")
    print("|---|---|---|---|---|")
    for n in models:
        a, b = vs_disel[n], vs_base[n]
        print(
            f"| {n} | {1000 * med[n]:.1f} ms | {format_interval(a['interval'])} | "
            f"{format_interval(b['interval'])} | "
            f"{res['adapter_overhead_vs_disel'][n]:.2f} |"
        )
    if args.out:
        atomic_write_json(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
