"""The training config: a tree of dataclasses (model, method, data, training, eval, output) read from YAML.

Every field can be set from the command line (``--set training.lr=1e-4`` or ``--training.lr 1e-4``); values
are parsed as YAML scalars, so ``true``, ``1e-4`` and ``[q_proj, v_proj]`` mean what they look like. Unknown
keys and bad values raise :class:`~disel.errors.UserError` naming the field, so a typo in a config never
silently trains with a default.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..assets import DEMO_MODEL, resolve_model_name
from ..errors import UserError
from ..utils.typed import build_dataclass

DATA_FORMATS = ("instruction", "classification", "text")
TASKS = ("causal_lm", "seq_cls")


@dataclass
class ModelConfig:
    """The base model: a hub id, a local directory that ``transformers`` loads, or ``disel:demo-model``."""

    name: str = ""
    tokenizer: str | None = None  # defaults to ``name``
    task: str | None = None  # causal_lm | seq_cls; inferred from data.format when unset
    dtype: str = "float32"  # weights dtype at load: float32 | bfloat16 | float16 | auto
    num_labels: int | None = None  # seq_cls: inferred from the labels when unset
    trust_remote_code: bool = False


@dataclass
class MethodConfig:
    """The fine-tuning method: the options every method reads, and the method's own ``options``."""

    name: str = "disel"
    rank: int = 8
    alpha: float | None = None  # default 2 * rank
    dropout: float = 0.0
    target_modules: str | list[str] | None = "all-linear"
    modules_to_save: list[str] | None = None
    # The method's own options, checked against its option dataclasses (DiselConfig's fields for DISeL, e.g.
    # gate_bias_init, gate_lr_multiplier; LaLoRAOptions, CordaOptions, ...): flat keys for this method, and/or
    # sections named after methods ({disel: {...}, adalora: {...}}) that apply only when that method runs.
    options: dict[str, Any] = field(default_factory=dict)
    # Calibration / source-domain text for methods that need data at build time (LaLoRA's curvature,
    # CorDA's covariance): a local text/JSON/JSONL/CSV/parquet file (field `text`), a `datasets` name, or
    # `stdlib:docstrings` / `stdlib:source` (held-out standard-library text, offline).
    calibration: str | None = None
    calibration_samples: int = 64
    calibration_max_length: int = 256
    calibration_batch_size: int = 4


@dataclass
class DataConfig:
    """Where the data comes from and how a row becomes a training example."""

    format: str = "instruction"  # instruction | classification | text
    train: str = ""  # local .json/.jsonl/.csv/.parquet file or a `datasets` name
    validation: str | None = None  # same kinds of source; optional
    dataset_config: str | None = None  # `datasets` configuration name (e.g. "sst2" for "glue")
    split: str = "train"
    validation_split: str | None = None
    template: str = "alpaca"  # alpaca | magicoder | a string containing {instruction}
    instruction_field: str = "instruction"
    input_field: str | None = "input"  # optional extra context appended to the instruction when present
    response_field: str = "output"
    text_fields: list[str] = field(default_factory=lambda: ["sentence"])  # classification: 1 or 2 fields
    label_field: str = "label"
    text_field: str = "text"  # raw text
    max_length: int = 512
    max_samples: int | None = None


@dataclass
class TrainingConfig:
    """Optimiser, schedule and loop settings (the paper's recipe is in configs/*.yaml)."""

    seed: int = 0
    epochs: float = 3.0
    max_steps: int = -1  # > 0 overrides epochs
    lr: float = 2e-4
    gate_lr: float | None = None  # default: lr * the adapter's gate_lr_multiplier (before rank scaling)
    rank_scaled_lr: bool = False  # lr * (rank_scaled_lr_reference / rank) ** rank_scaled_lr_power
    rank_scaled_lr_reference: int = 8
    rank_scaled_lr_power: float = 0.5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    scheduler: str = "cosine"
    warmup_ratio: float = 0.02
    warmup_steps: int | None = None  # a number of warmup steps; when set, it replaces warmup_ratio
    per_device_batch_size: int = 8
    gradient_accumulation_steps: int | None = None  # derived from effective_batch_size when unset
    effective_batch_size: int | None = None  # per_device * accumulation * world size
    max_grad_norm: float = 1.0
    bf16: bool | str = "auto"  # auto: on where the hardware supports it
    gradient_checkpointing: bool = False
    save_steps: int | None = None  # checkpoint every N optimizer steps; None: every epoch
    save_total_limit: int | None = None
    logging_steps: int = 10
    dataloader_num_workers: int = 0
    ddp_backend: str | None = None
    fsdp: str = ""  # passed to TrainingArguments (prefer an accelerate config file)
    deepspeed: str | None = None  # DeepSpeed JSON config path
    report_to: str | list[str] = "none"  # a tracker name, a list of them, "all" or "none"
    optim: str = (
        "adamw_torch"  # any TrainingArguments optim (sgd, adafactor, adamw_torch_fused, paged_adamw_8bit...)
    )
    optim_args: str | None = None
    torch_compile: bool = False
    push_to_hub: bool = False  # push the final adapter (or model) to the hub when the run finishes
    hub_model_id: str | None = None  # default: the run id
    # Any other ``transformers.TrainingArguments`` field, passed through as is (checked against its fields).
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class OutputConfig:
    dir: str = "runs"  # parent of the run directories
    run_id: str | None = None  # default "<method>-r<rank>-s<seed>"
    run_dir: str | None = None  # default <dir>/<run_id>
    results: str | None = None  # results store; default <dir>/results.sqlite
    overwrite: bool = False  # start over instead of resuming an unfinished run


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    eval: dict[str, Any] | None = None  # evaluation spec, passed to disel.evaluation.evaluate_run
    output: OutputConfig = field(default_factory=OutputConfig)
    # used by `disel sweep` only: a mapping of lists (their product), or a list of such mappings (the union of
    # their products; in a list, a key with a single value that is not a list is a setting of that block's
    # runs, not an axis). See disel.experiments.sweep.
    grid: dict[str, list[Any]] | list[dict[str, Any]] | None = None

    # -- derived values --------------------------------------------------------------------------
    @property
    def task(self) -> str:
        if self.model.task:
            return self.model.task
        return "seq_cls" if self.data.format == "classification" else "causal_lm"

    @property
    def run_id(self) -> str:
        return self.output.run_id or f"{self.method.name}-r{self.method.rank}-s{self.training.seed}"

    @property
    def run_dir(self) -> Path:
        return Path(self.output.run_dir) if self.output.run_dir else Path(self.output.dir) / self.run_id

    @property
    def results_path(self) -> Path:
        return Path(self.output.results) if self.output.results else Path(self.output.dir) / "results.sqlite"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def fingerprint(self) -> str:
        """sha256 of what determines the run's result (see :func:`fingerprint`)."""
        return fingerprint(self)


# Short keys accepted on the command line and in sweep grids.
ALIASES = {
    "method": "method.name",
    "rank": "method.rank",
    "seed": "training.seed",
    "lr": "training.lr",
    "gate_lr": "training.gate_lr",
}


def canonical_key(key: str) -> str:
    """``method_options.rank`` -> ``method.rank``; ``rank`` -> ``method.rank``."""
    key = key.strip()
    if key.startswith("method_options."):
        key = "method." + key[len("method_options.") :]
    if key in TRAINING_ALIASES:
        key = f"training.{key}"
    head, _, tail = key.partition(".")
    if head == "training" and tail in TRAINING_ALIASES:
        key = f"training.{TRAINING_ALIASES[tail]}"
    return ALIASES.get(key, key)


# --------------------------------------------------------------------------------------------------
# Building and validating


# transformers' names for training fields, accepted everywhere (YAML, --set, sweep grids) beside disel's
TRAINING_ALIASES = {
    "learning_rate": "lr",
    "per_device_train_batch_size": "per_device_batch_size",
    "num_train_epochs": "epochs",
    "lr_scheduler_type": "scheduler",
}
# TrainingArguments fields disel sets itself from its own config: not for ``training.args``
_MANAGED_ARGS = {
    "output_dir",
    "seed",
    "data_seed",
    "remove_unused_columns",
    "label_names",
    "disable_tqdm",
    "save_strategy",
    "max_steps",
    "gradient_accumulation_steps",
    "bf16",
    "learning_rate",
    "per_device_train_batch_size",
    "num_train_epochs",
    "lr_scheduler_type",
    "warmup_steps",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "save_steps",
    "save_total_limit",
    "logging_steps",
    "report_to",
    "optim",
    "optim_args",
    "torch_compile",
    "push_to_hub",
    "hub_model_id",
    "ddp_backend",
    "fsdp",
    "deepspeed",
    "dataloader_num_workers",
    "gradient_checkpointing",
    "gradient_checkpointing_kwargs",
}
# report_to name -> the package it needs
TRACKERS = {
    "wandb": "wandb",
    "tensorboard": "tensorboard",
    "mlflow": "mlflow",
    "comet_ml": "comet_ml",
    "neptune": "neptune",
    "clearml": "clearml",
    "dvclive": "dvclive",
    "codecarbon": "codecarbon",
    "aim": "aim",
    "swanlab": "swanlab",
    "trackio": "trackio",
    "azure_ml": "azureml",
}


def _training_aliases(section: Any) -> Any:
    if not isinstance(section, dict):
        return section
    out = dict(section)
    for alias, name in TRAINING_ALIASES.items():
        if alias in out:
            if name in out:
                raise UserError(
                    f"training.{alias} and training.{name} are the same setting: keep one of them."
                )
            out[name] = out.pop(alias)
    return out


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config`; ``method: lora`` is short for ``method: {name: lora}``;
    transformers' training names (``learning_rate``, ``per_device_train_batch_size``, ...) are accepted."""
    data = copy.deepcopy(data or {})
    if isinstance(data.get("method"), str):
        data["method"] = {"name": data["method"]}
    if "training" in data:
        data["training"] = _training_aliases(data["training"])
    cfg = build_dataclass(Config, data, "")
    validate(cfg)
    return cfg


def shipped_configs() -> dict[str, Path]:
    """The configs that ship inside the package (``src/disel/configs``), by name without ``.yaml``."""
    from importlib import resources

    root = Path(str(resources.files("disel") / "configs"))
    return {p.stem: p for p in sorted(root.glob("*.yaml"))} if root.is_dir() else {}


def resolve_config_path(path: str | Path) -> Path:
    """A YAML file path, or the name of a shipped config (``llama2-7b-metamathqa``, with or without .yaml)."""
    p = Path(path)
    if p.is_file():
        return p
    shipped = shipped_configs()
    name = p.name.removesuffix(".yaml").removesuffix(".yml")
    if str(p.parent) in (".", "configs") and name in shipped:
        return shipped[name]
    raise UserError(
        f"Config file {str(p)!r} does not exist: pass the path of a YAML file or a shipped config name "
        f"({', '.join(shipped) or 'none installed'})."
    )


def load_config(path: str | Path, overrides: list[tuple[str, Any]] | None = None) -> Config:
    """Read a YAML config, apply ``overrides`` (dotted key, value) and validate."""
    p = resolve_config_path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise UserError(f"Config file {str(p)!r} is not valid YAML ({e}): fix the syntax.") from e
    if not isinstance(data, dict):
        raise UserError(f"Config file {str(p)!r} must hold a mapping (model:, method:, data:, ...).")
    data = apply_overrides(data, overrides or [])
    return config_from_dict(data)


def apply_overrides(data: dict[str, Any], overrides: list[tuple[str, Any]]) -> dict[str, Any]:
    """Set dotted keys in a plain config dict (before validation, so unknown keys are still caught)."""
    data = copy.deepcopy(data)
    if isinstance(data.get("method"), str):
        data["method"] = {"name": data["method"]}
    for key, value in overrides:
        parts = canonical_key(key).split(".")
        node = data
        for part in parts[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise UserError(f"Cannot set {key!r}: {part!r} is a value, not a section.")
            node = nxt
        node[parts[-1]] = value
    return data


def with_overrides(cfg: Config, overrides: list[tuple[str, Any]]) -> Config:
    """A new validated config: ``cfg`` with dotted-key overrides."""
    return config_from_dict(apply_overrides(cfg.to_dict(), overrides))


def parse_value(text: str) -> Any:
    """A command-line value as YAML (``1e-4`` -> 0.0001, ``true`` -> True, ``[a, b]`` -> list)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value  # numbers YAML keeps as strings ("1e-4") are converted by the field's type


def parse_override_args(tokens: list[str]) -> tuple[list[tuple[str, Any]], list[str]]:
    """Split ``--set a.b=v``, ``--a.b=v`` and ``--a.b v`` overrides from other tokens (returned as is)."""
    overrides: list[tuple[str, Any]] = []
    rest: list[str] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok == "--set":
            if i + 1 >= len(tokens) or "=" not in tokens[i + 1]:
                raise UserError("--set needs KEY=VALUE, e.g. --set training.lr=1e-4.")
            k, v = tokens[i + 1].split("=", 1)
            overrides.append((k, parse_value(v)))
            i += 2
        elif tok.startswith("--set="):
            k, v = tok[len("--set=") :].split("=", 1) if "=" in tok[6:] else (tok[6:], "")
            if not v and "=" not in tok[6:]:
                raise UserError("--set needs KEY=VALUE, e.g. --set training.lr=1e-4.")
            overrides.append((k, parse_value(v)))
            i += 1
        elif tok.startswith("--") and ("." in tok.split("=", 1)[0] or tok[2:].split("=", 1)[0] in ALIASES):
            if "=" in tok:
                k, v = tok[2:].split("=", 1)
                i += 1
            else:
                if i + 1 >= len(tokens):
                    raise UserError(f"{tok} needs a value, e.g. {tok} 1e-4.")
                k, v = tok[2:], tokens[i + 1]
                i += 2
            overrides.append((k, parse_value(v)))
        else:
            rest.append(tok)
            i += 1
    return overrides, rest


def validate(cfg: Config) -> None:
    """Cross-field checks; each error names the field and the fix."""
    m, d, t, o = cfg.method, cfg.data, cfg.training, cfg.output
    if not cfg.model.name:
        raise UserError("model.name is empty: set it to a hub id or a local model directory.")
    if DEMO_MODEL in (cfg.model.name, cfg.model.tokenizer):  # the small model that ships inside the package
        cfg.model.name = resolve_model_name(cfg.model.name)
        cfg.model.tokenizer = cfg.model.tokenizer and resolve_model_name(cfg.model.tokenizer)
    if cfg.model.task is not None and cfg.model.task not in TASKS:
        raise UserError(f"model.task={cfg.model.task!r} is invalid: use one of {', '.join(TASKS)}.")
    if cfg.model.dtype not in ("float32", "bfloat16", "float16", "auto"):
        raise UserError(
            f"model.dtype={cfg.model.dtype!r} is invalid: use float32, bfloat16, float16 or auto."
        )
    if not m.name:
        raise UserError(
            "method.name is empty: name a method, e.g. disel or lora (`disel methods` lists them)."
        )
    from ..methods.registry import resolve_options

    resolve_options(m.name, m.options, "method.options")  # unknown method / option: one sentence naming it
    if m.rank < 1:
        raise UserError(f"method.rank={m.rank} is invalid: use a positive integer such as 8.")
    if not 0.0 <= m.dropout < 1.0:
        raise UserError(f"method.dropout={m.dropout} is invalid: use a value in [0, 1).")
    if d.format not in DATA_FORMATS:
        raise UserError(f"data.format={d.format!r} is invalid: use one of {', '.join(DATA_FORMATS)}.")
    if not d.train:
        raise UserError("data.train is empty: set it to a local data file or a `datasets` name.")
    if (
        d.format == "instruction"
        and d.template not in ("alpaca", "magicoder")
        and "{instruction}" not in d.template
    ):
        raise UserError(
            f"data.template={d.template!r} is invalid: use alpaca, magicoder or a string with {{instruction}}."
        )
    if d.format == "classification" and not 1 <= len(d.text_fields) <= 2:
        raise UserError(f"data.text_fields={d.text_fields!r} is invalid: list one or two text fields.")
    if d.max_length < 8:
        raise UserError(f"data.max_length={d.max_length} is too small: use at least 8 (the paper uses 512).")
    if d.max_samples is not None and d.max_samples < 1:
        raise UserError(f"data.max_samples={d.max_samples} is invalid: use a positive integer or null.")
    if t.lr <= 0:
        raise UserError(f"training.lr={t.lr} is invalid: use a positive learning rate such as 2e-4.")
    if t.gate_lr is not None and t.gate_lr <= 0:
        raise UserError(f"training.gate_lr={t.gate_lr} is invalid: use a positive value or null.")
    if t.rank_scaled_lr_reference < 1:
        raise UserError(f"training.rank_scaled_lr_reference={t.rank_scaled_lr_reference} must be >= 1.")
    if t.max_steps == 0 or t.max_steps < -1:
        raise UserError(
            f"training.max_steps={t.max_steps} is invalid: use a positive number of steps, or -1 to train "
            "for training.epochs."
        )
    if t.epochs <= 0 and t.max_steps <= 0:
        raise UserError("training.epochs and training.max_steps are both <= 0: set one of them.")
    if not 0.0 <= t.warmup_ratio < 1.0:
        raise UserError(f"training.warmup_ratio={t.warmup_ratio} is invalid: use a value in [0, 1).")
    if t.warmup_steps is not None and t.warmup_steps < 0:
        raise UserError(f"training.warmup_steps={t.warmup_steps} is invalid: use 0 or more steps, or null.")
    if t.per_device_batch_size < 1:
        raise UserError(f"training.per_device_batch_size={t.per_device_batch_size} must be >= 1.")
    if t.gradient_accumulation_steps is not None and t.gradient_accumulation_steps < 1:
        raise UserError(f"training.gradient_accumulation_steps={t.gradient_accumulation_steps} must be >= 1.")
    if t.effective_batch_size is not None and t.effective_batch_size < 1:
        raise UserError(f"training.effective_batch_size={t.effective_batch_size} must be >= 1.")
    if t.max_grad_norm < 0:
        raise UserError(
            f"training.max_grad_norm={t.max_grad_norm} is invalid: use 0 (off) or a positive value."
        )
    if t.weight_decay < 0:
        raise UserError(f"training.weight_decay={t.weight_decay} is invalid: use a value >= 0.")
    if not (isinstance(t.bf16, bool) or t.bf16 == "auto"):
        raise UserError(f"training.bf16={t.bf16!r} is invalid: use true, false or auto.")
    if t.save_steps is not None and t.save_steps < 1:
        raise UserError(f"training.save_steps={t.save_steps} is invalid: use a positive integer or null.")
    _validate_trainer_args(t)
    if t.logging_steps < 1:
        raise UserError(f"training.logging_steps={t.logging_steps} must be >= 1.")
    if cfg.eval is not None and not isinstance(cfg.eval, dict):
        raise UserError("eval must be a mapping (the evaluation spec) or absent.")
    if o.run_id is not None and ("/" in o.run_id or o.run_id in ("", ".", "..")):
        raise UserError(f"output.run_id={o.run_id!r} is invalid: use a name without '/'.")
    if isinstance(cfg.grid, dict):
        for k, v in cfg.grid.items():
            if not isinstance(v, list) or not v:
                raise UserError(f"grid.{k}={v!r} is invalid: give a non-empty list of values.")
    elif cfg.grid is not None:
        if not cfg.grid:
            raise UserError("grid is an empty list: list one or more mappings of grid values.")
        for i, block in enumerate(cfg.grid):
            if not isinstance(block, dict) or not block:
                raise UserError(f"grid[{i}]={block!r} is invalid: each block is a non-empty mapping.")
            for k, v in block.items():
                if isinstance(v, list) and not v:
                    raise UserError(f"grid[{i}].{k} is an empty list: give one or more values.")


def _validate_trainer_args(t: TrainingConfig) -> None:
    """``training.args`` names TrainingArguments fields disel does not set itself; trackers are installed."""
    import importlib.util

    if t.args:
        import dataclasses as _dc

        from transformers import TrainingArguments

        fields_ = {f.name for f in _dc.fields(TrainingArguments)}
        for key in t.args:
            if key in _MANAGED_ARGS:
                own = TRAINING_ALIASES.get(key, key)
                raise UserError(
                    f"training.args.{key} is set by disel from its own config: use training.{own} instead."
                )
            if key not in fields_:
                import difflib

                close = difflib.get_close_matches(key, sorted(fields_), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise UserError(
                    f"training.args.{key} is not a transformers TrainingArguments field{hint}: fix the name."
                )
    names = [t.report_to] if isinstance(t.report_to, str) else list(t.report_to)
    for name in names:
        if name in ("none", "all"):
            continue
        pkg = TRACKERS.get(name)
        if pkg is None:
            raise UserError(
                f"training.report_to={name!r} is not a tracker transformers knows: use one of "
                f"{', '.join(sorted(TRACKERS))}, all or none."
            )
        if importlib.util.find_spec(pkg) is None:
            raise UserError(
                f"training.report_to={name!r} needs the {pkg!r} package, which is not installed: "
                f"pip install {pkg}, or drop it from training.report_to."
            )


def effective_lr(cfg: Config) -> float:
    """The LoRA-path learning rate, rank-scaled when ``training.rank_scaled_lr`` is on.

    Formula: ``lr * (reference / rank) ** power`` (reference 8, power 0.5 by default), applied to LoRA, DoRA
    and DISeL's LoRA factors only (the methods registered with ``rank_scaled_lr``); the gate learning rate and
    other methods keep their learning rate.
    """
    from ..methods.registry import get_method

    t = cfg.training
    if t.rank_scaled_lr and get_method(cfg.method.name).rank_scaled_lr:
        return t.lr * (t.rank_scaled_lr_reference / cfg.method.rank) ** t.rank_scaled_lr_power
    return t.lr


# Training fields that change how a run is watched, not what it computes: left out of the fingerprint.
_NOT_RESULT_FIELDS = {
    "logging_steps",
    "report_to",
    "dataloader_num_workers",
    "save_total_limit",
    "push_to_hub",
    "hub_model_id",
}
# Training fields added after runs were made: left out of the fingerprint while they have this value, so the
# run dirs made before them keep their fingerprints (and are not trained again).
_UNSET_LATER_FIELDS: dict[str, Any] = {"warmup_steps": None}


def fingerprint(cfg: Config) -> str:
    """sha256 of what determines a run's result: the resolved model (and a local model's config and weight
    files), the method and its options, the data config and the content of its local files (and of a local
    calibration file), the training settings and the seed. Output paths, logging and evaluation are left
    out: the same training in another run dir has the same fingerprint (the run key adds the dir)."""
    import hashlib
    import json

    training = {
        k: v
        for k, v in asdict(cfg.training).items()
        if k not in _NOT_RESULT_FIELDS and not (k in _UNSET_LATER_FIELDS and v == _UNSET_LATER_FIELDS[k])
    }
    ident = {
        "model": asdict(cfg.model),
        "model_files": _model_files(cfg.model.name),
        "tokenizer_files": _model_files(cfg.model.tokenizer) if cfg.model.tokenizer else None,
        "task": cfg.task,
        "method": asdict(cfg.method),
        "calibration_file": _content_hash(cfg.method.calibration),
        "data": asdict(cfg.data),
        "data_files": [_content_hash(cfg.data.train), _content_hash(cfg.data.validation)],
        "training": training,
    }
    text = json.dumps(ident, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def run_key(cfg: Config, run_dir: Path | None = None) -> str:
    """The results store's key of a run: its name, and a hash of its fingerprint and absolute run dir."""
    import hashlib

    where = str(Path(run_dir or cfg.run_dir).resolve())
    digest = hashlib.sha256(f"{fingerprint(cfg)}|{where}".encode()).hexdigest()[:12]
    return f"{cfg.run_id}#{digest}"


def _content_hash(source: str | None) -> str | None:
    """sha256 of a local file's bytes (cached by path, size and mtime); None for non-files (hub names)."""
    if not source:
        return None
    p = Path(source).expanduser()
    if not p.is_file():
        return None
    st = p.stat()
    return _file_sha256(str(p.resolve()), st.st_size, st.st_mtime_ns)


def _model_files(name: str | None) -> dict[str, Any] | None:
    """A local model dir's config files by content and its weight files by size (hashing GBs is not needed
    to tell two models apart); None for hub ids."""
    if not name:
        return None
    d = Path(name).expanduser()
    if not d.is_dir():
        return None
    out: dict[str, Any] = {}
    for f in sorted(d.iterdir()):
        if f.suffix == ".json" and f.is_file():
            out[f.name] = _content_hash(str(f))
        elif f.suffix in (".safetensors", ".bin", ".model") and f.is_file():
            out[f.name] = f.stat().st_size
    return out


_HASHES: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    import hashlib

    key = (path, size, mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
