"""What a saved adapter says about itself outside disel: its model card (README.md), and in its
``adapter_config.json`` a ``peft_type`` PEFT and transformers can read (:class:`PeftTypeName`) and the
``requires`` hint (:data:`REQUIRES_HINT`) for whoever opens the file after a load failed without disel.

Written on every ``save_pretrained`` of a DISeL or Queryable adapter (their configs' ``save_pretrained``
calls :func:`write_model_card` after PEFT has written its own card and ``adapter_config.json``), and by the
trainer's final save with the run's recipe. The card is PEFT's metadata header (``base_model``, tags) with
``library_name: disel`` and disel's section, between two markers, in place of PEFT's empty template; text a
user wrote outside the markers is kept, and a recipe written once is kept by later writes that pass none.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..utils.io import atomic_write_text

# The value of ``requires`` in every adapter_config.json disel writes: what a reader of a failed load needs.
REQUIRES_HINT = (
    "disel: this adapter's peft_type is not built into PEFT; `pip install disel` and `import disel` before "
    "loading it with PEFT or transformers (PEFT's `KeyError: 'DISEL'` or `KeyError: 'QUERYABLE'` means disel "
    "was not imported), and evaluate it with `disel lm-eval` instead of `lm_eval`"
)


class PeftTypeName(str):
    """The name of a PEFT type that PEFT's ``PeftType`` enum does not list, behaving like that enum's members.

    PEFT and transformers read ``config.peft_type.value`` (transformers' ``load_adapter``, PEFT's error
    messages); a plain ``str`` has no ``.value``. This one has ``.value`` and ``.name`` (both the name),
    equals and hashes as the plain string (so PEFT's mappings find it under either, and ``== "DISEL"``
    holds), and is written by ``json`` as that string (adapter_config.json: ``"peft_type": "DISEL"``).
    """

    __slots__ = ()

    @property
    def value(self) -> str:
        return str(self)

    @property
    def name(self) -> str:
        return str(self)

    def __repr__(self) -> str:
        return f"PeftTypeName({str(self)!r})"

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (type(self), (str(self),))


CARD = "README.md"
BEGIN = "<!-- disel-card:begin (regenerated on save; edit outside these markers) -->"
END = "<!-- disel-card:end -->"
_RECIPE_BEGIN = "<!-- disel-recipe:begin -->"
_RECIPE_END = "<!-- disel-recipe:end -->"
# peft_type -> (method name, what it is)
_METHODS = {
    "DISEL": (
        "disel",
        "DISeL (Dynamic Input-Sensitive LoRA): LoRA whose rank-one components are each scaled by an "
        "input-dependent sigmoid gate, delta(x) = scaling * U (g(x) * (D x)), g(x) = sigmoid(W_g x + b_g)",
    ),
    "QUERYABLE": (
        "queryable",
        "Queryable LoRA: per-layer LoRA factors around an r x r operator routed, per block of layers and per "
        "sequence, from update atoms shared by all layers",
    ),
}
_DISEL_TYPES = frozenset(_METHODS)
_PEFT_TEMPLATE_MARKS = ("# Model Card for Model ID", "[More Information Needed]")
_FRONT_MATTER = re.compile(r"\A---\n(.*?)\n---\n?", re.DOTALL)


def write_model_card(
    adapter_dir: str | Path, *, method: str | None = None, recipe: dict | None = None
) -> Path:
    """Write (atomically) ``adapter_dir/README.md`` from its ``adapter_config.json``; the card's path.

    ``method``: the registry method that trained the adapter (default: from ``peft_type``, e.g. "disel");
    ``recipe``: the training data and recipe (any JSON-like mapping: data sources, steps, learning rates...),
    shown as YAML; without one, a recipe an earlier write put in the card is kept."""
    d = Path(adapter_dir)
    cfg = json.loads((d / "adapter_config.json").read_text(encoding="utf-8"))
    if not isinstance(cfg, dict):
        raise ValueError(f"{d / 'adapter_config.json'} does not hold a mapping of adapter settings.")
    path = d / CARD
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    meta, body = _split_front_matter(old)
    old_recipe = _between(body, _RECIPE_BEGIN, _RECIPE_END)
    section = _section(cfg, method, _recipe_block(recipe) if recipe is not None else old_recipe)
    if BEGIN in body and END in body:
        head, _, rest = body.partition(BEGIN)
        _, _, tail = rest.partition(END)
        body = f"{head}{section}{tail}"
    elif not body.strip() or all(m in body for m in _PEFT_TEMPLATE_MARKS):
        body = section + "\n"  # PEFT's untouched template: nothing a person wrote
    else:
        body = f"{section}\n\n{body.lstrip()}"
    return atomic_write_text(path, _front_matter(meta, cfg) + "\n" + body.lstrip("\n"))


# --------------------------------------------------------------------------------------------------


def _split_front_matter(text: str) -> tuple[dict[str, Any], str]:
    m = _FRONT_MATTER.match(text)
    if not m:
        return {}, text
    import yaml

    try:
        meta = yaml.safe_load(m.group(1)) or {}
    except yaml.YAMLError:
        meta = {}
    return (meta if isinstance(meta, dict) else {}), text[m.end() :]


def _front_matter(meta: dict[str, Any], cfg: dict[str, Any]) -> str:
    import yaml

    peft_type = str(cfg.get("peft_type") or "")
    base = cfg.get("base_model_name_or_path")
    meta = dict(meta)
    if peft_type in _DISEL_TYPES:
        # not "peft": the hub's PEFT snippet and inference providers would load it without disel and fail
        meta["library_name"] = "disel"
    else:
        meta.setdefault("library_name", "peft")
    if base:
        meta["base_model"] = base
    tags = {str(t) for t in (meta.get("tags") or [])}
    tags |= {"peft", "disel"}
    if peft_type in _METHODS:
        tags.add(_METHODS[peft_type][0])
    if base:
        tags.add(f"base_model:adapter:{base}")
    meta["tags"] = sorted(tags)
    if cfg.get("task_type") == "CAUSAL_LM" or str(
        (cfg.get("auto_mapping") or {}).get("base_model_class", "")
    ).endswith("ForCausalLM"):
        meta.setdefault("pipeline_tag", "text-generation")
    return "---\n" + yaml.safe_dump(meta, sort_keys=True, allow_unicode=True) + "---\n"


def _between(text: str, begin: str, end: str) -> str | None:
    if begin not in text or end not in text:
        return None
    inner = text.partition(begin)[2].partition(end)[0]
    return f"{begin}{inner}{end}"


def _recipe_block(recipe: dict) -> str:
    import yaml

    text = yaml.safe_dump(_plain(recipe), sort_keys=False, allow_unicode=True).rstrip()
    return f"{_RECIPE_BEGIN}\n## Training data and recipe\n\n```yaml\n{text}\n```\n{_RECIPE_END}"


def _plain(x: Any) -> Any:
    """JSON-like values for YAML: mappings, lists, numbers, strings; anything else as its str."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple | set | frozenset):
        return [_plain(v) for v in (sorted(x, key=str) if isinstance(x, set | frozenset) else x)]
    if x is None or isinstance(x, bool | int | float):
        return x
    return str(x)


def _section(cfg: dict[str, Any], method: str | None, recipe: str | None) -> str:
    peft_type = str(cfg.get("peft_type") or "")
    default_method, what = _METHODS.get(
        peft_type, (peft_type.lower() or "unknown", f"a PEFT {peft_type} adapter")
    )
    method = method or default_method
    base = cfg.get("base_model_name_or_path") or "BASE_MODEL"
    causal = cfg.get("task_type") in (None, "CAUSAL_LM") and not str(
        (cfg.get("auto_mapping") or {}).get("base_model_class", "")
    ).endswith(("SequenceClassification", "MaskedLM"))
    auto = "AutoModelForCausalLM" if causal else _auto_class(cfg)
    needs_disel = peft_type in _DISEL_TYPES
    title = {"DISEL": "DISeL adapter", "QUERYABLE": "Queryable LoRA adapter"}.get(peft_type, "Adapter")
    lines = [
        BEGIN,
        f"# {title} for `{base}`",
        "",
        f"A `{method}` adapter made with the `disel` library: {what}.",
    ]
    if needs_disel:
        lines += [
            "",
            f"Its `peft_type` is `{peft_type}`, which is not built into PEFT: **install disel and import it "
            "before loading** (`import disel` registers the type with PEFT). Without it PEFT fails with "
            f"`KeyError: '{peft_type}'`.",
        ]
    lines += [
        "",
        "## How to load",
        "",
        "```bash",
        "pip install disel" if needs_disel else "pip install peft transformers",
        "```",
        "",
        "```python",
        *(
            ["import disel  # registers the DISEL and QUERYABLE adapter types with PEFT"]
            if needs_disel
            else []
        ),
        "from peft import PeftModel",
        f"from transformers import {auto}",
        "",
        f'base = {auto}.from_pretrained("{base}")',
        'model = PeftModel.from_pretrained(base, "ADAPTER_DIR_OR_HUB_ID").eval()',
        "```",
    ]
    if needs_disel:
        lines += [
            "",
            "After `import disel`, transformers loads it alone too: "
            f'`{auto}.from_pretrained("ADAPTER_DIR_OR_HUB_ID")` or '
            '`model.load_adapter("ADAPTER_DIR_OR_HUB_ID")`.',
        ]
    if needs_disel and causal:
        lines += [
            "Evaluate it with lm-evaluation-harness through disel, which imports disel in lm-eval's process "
            "(the plain `lm_eval` script fails with the `KeyError` above):",
            "",
            "```bash",
            "disel lm-eval --model hf --model_args "
            f"pretrained={base},peft=ADAPTER_DIR_OR_HUB_ID --tasks TASK",
            "```",
        ]
    if needs_disel:
        lines += [
            "",
            "The update depends on the input, so there is no fixed weight delta to merge: LoRA kernels of "
            "vLLM or TGI cannot serve it; serve it with transformers (`disel compact --merge-static` merges "
            "the always-open components into the base and drops the closed ones).",
        ]
    lines += ["", "## Adapter", "", "| setting | value |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in _settings(cfg, method)]
    if recipe:
        lines += ["", recipe]
    lines.append(END)
    return "\n".join(lines)


def _auto_class(cfg: dict[str, Any]) -> str:
    cls = str((cfg.get("auto_mapping") or {}).get("base_model_class", ""))
    if cfg.get("task_type") == "SEQ_CLS" or cls.endswith("SequenceClassification"):
        return "AutoModelForSequenceClassification"
    if cls.endswith("MaskedLM"):
        return "AutoModelForMaskedLM"
    return "AutoModel"


def _code(x: Any) -> str:
    return f"`{x}`"


def _settings(cfg: dict[str, Any], method: str) -> list[tuple[str, str]]:
    peft_type = str(cfg.get("peft_type") or "")
    rows: list[tuple[str, str]] = [
        ("method", f"{_code(method)} (peft_type {_code(peft_type)})"),
        ("base model", _code(cfg.get("base_model_name_or_path"))),
        ("rank r", _code(cfg.get("r"))),
        ("lora_alpha", _code(cfg.get("lora_alpha"))),
    ]
    if cfg.get("rank_pattern"):
        rows.append(("rank_pattern", _code(json.dumps(cfg["rank_pattern"], sort_keys=True))))
    if cfg.get("lora_dropout"):
        rows.append(("lora_dropout", _code(cfg.get("lora_dropout"))))
    if peft_type == "DISEL":
        bias = cfg.get("gate_bias_init")
        start = ""
        if isinstance(bias, int | float):
            import math

            start = f" (gates start at sigmoid = {1 / (1 + math.exp(-bias)):.3f})"
        bottleneck = cfg.get("gate_bottleneck")
        static = cfg.get("static_rank_pattern") or {}
        rows += [
            ("gate_bias_init", f"{_code(bias)}{start}"),
            ("gate_lr_multiplier", _code(cfg.get("gate_lr_multiplier"))),
            (
                "gate_bottleneck",
                _code(bottleneck) if bottleneck else "none (a full r x d_in gate per adapted layer)",
            ),
            ("gate_weight_init", _code(cfg.get("gate_weight_init"))),
            ("gate_logit_scale", _code(cfg.get("gate_logit_scale"))),
            (
                "static ranks",
                _code(json.dumps(static, sort_keys=True))
                + " (leading components left ungated by `disel compact`)"
                if static
                else "none (every component is gated)",
            ),
        ]
    elif peft_type == "QUERYABLE":
        rows += [
            (k, _code(cfg.get(k)))
            for k in ("num_atoms", "top_k", "block_size", "key_dim", "use_block_summary", "prior_dim")
        ]
    rows.append(("target modules", _targets(cfg.get("target_modules"))))
    if cfg.get("modules_to_save"):
        rows.append(("modules_to_save", _code(cfg["modules_to_save"])))
    if cfg.get("task_type"):
        rows.append(("task type", _code(cfg["task_type"])))
    if cfg.get("peft_version"):
        rows.append(("saved with", f"PEFT {_code(cfg['peft_version'])}"))
    return rows


def _targets(targets: Any) -> str:
    """Target modules, short: a pattern as it is; a list by leaf name with counts (14 names of 7 kinds...)."""
    if targets is None:
        return "none"
    if isinstance(targets, str):
        return _code(targets)
    names = [str(t) for t in targets]
    leaves: dict[str, int] = {}
    for n in names:
        leaf = n.rsplit(".", 1)[-1]
        leaves[leaf] = leaves.get(leaf, 0) + 1
    kinds = ", ".join(f"{_code(k)} x{c}" if c > 1 else _code(k) for k, c in sorted(leaves.items()))
    return f"{len(names)} module{'s' if len(names) != 1 else ''}: {kinds}"
