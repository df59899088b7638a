"""`disel train`: one fine-tuning run from a :class:`~disel.training.config.Config`.

The run goes through the method registry (``disel.methods.build_model``) and ``transformers.Trainer`` with
DISeL's optimizer groups (:mod:`disel.training.trainer`); the run directory is described in
:mod:`disel.rundir`.

Integrity: a run is identified by its fingerprint (what determines its result) and its run dir; one process
works in a run dir at a time (its lock); a run that was interrupted resumes from its newest complete,
readable checkpoint (each one fsync'd and marked complete last), never trains past ``max_steps``, and ends
with the same final adapter and train loss as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.sources import read_texts
from ..errors import UserError
from ..methods.model_card import write_model_card
from ..methods.registry import get_method
from ..rundir import (
    CHECKPOINT_STATE,
    EXPORT_DIR,
    FINAL_DIR,
    LOCK_FILE,
    RUN_FILE,
    RunBusy,
    checkpoints,
    read_run_file,
    remove_incomplete_checkpoints,
    remove_stale_temp_files,
    run_lock,
)
from ..utils.io import atomic_write_json, fsync_tree
from .config import Config, effective_lr, run_key
from .data import PadCollator, PreparedData, ensure_pad_token, prepare_data, with_bos
from .distributed import barrier, check_launch, is_main_process, trainable_hash, world_size
from .trainer import (
    LossTally,
    checkpoint_state_callback,
    gate_learning_rate,
    make_trainer_class,
    method_callbacks,
)


def log(msg: str) -> None:
    if is_main_process():
        print(f"[disel] {msg}", file=sys.stderr, flush=True)


@dataclass
class TrainResult:
    run_id: str
    run_dir: Path
    status: str  # "finished" | "skipped" (already finished)
    train_loss: float | None = None
    wall_seconds: float = 0.0
    global_step: int = 0
    resumed_from: str | None = None
    model: nn.Module | None = None


# --------------------------------------------------------------------------------------------------
# The run file


def _model_ref(name: str) -> str:
    """Local model paths are stored absolute so the run dir can be read from anywhere."""
    p = Path(name).expanduser()
    return str(p.resolve()) if p.exists() else name


# --------------------------------------------------------------------------------------------------
# Trainer pieces


def resolve_bf16(setting: bool | str) -> bool:
    available = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if setting == "auto":
        return available
    if setting and not available:
        log("training.bf16 is on but this machine has no bf16-capable GPU: training in float32.")
        return False
    return bool(setting)


def accumulation_steps(cfg: Config, world: int) -> int:
    t = cfg.training
    if t.gradient_accumulation_steps is not None:
        return t.gradient_accumulation_steps
    if t.effective_batch_size is None:
        return 1
    per_step = t.per_device_batch_size * world
    accum = max(1, round(t.effective_batch_size / per_step))
    if accum * per_step != t.effective_batch_size:
        log(
            f"effective batch {t.effective_batch_size} is not a multiple of {per_step} "
            f"(batch x processes): using {accum * per_step}."
        )
    return accum


def total_optimizer_steps(cfg: Config, n_examples: int, world: int, accum: int) -> int:
    """The number of optimizer steps the Trainer will take (AdaLoRA's schedule needs it up front)."""
    t = cfg.training
    if t.max_steps > 0:
        return t.max_steps
    per_rank = math.ceil(n_examples / world)
    batches = math.ceil(per_rank / t.per_device_batch_size)
    per_epoch = batches // accum + int(batches % accum > 0)
    return max(1, math.ceil(t.epochs * per_epoch))


def load_tokenizer(cfg: Config) -> Any:
    from transformers import AutoTokenizer

    name = cfg.model.tokenizer or cfg.model.name
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=cfg.model.trust_remote_code)
    except OSError as e:
        raise UserError(
            f"Could not load the tokenizer {name!r} ({e}): check model.name / model.tokenizer."
        ) from e


def load_base_model(cfg: Config, data: PreparedData, tokenizer: Any) -> nn.Module:
    from ..loading import load_base

    kw: dict[str, Any] = {}
    if cfg.task == "seq_cls":
        labels = data.label_names or [str(i) for i in range(data.num_labels or 2)]
        kw.update(
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={n: i for i, n in enumerate(labels)},
        )
    model = load_base(cfg.model.name, cfg.task, cfg.model.dtype, cfg.model.trust_remote_code, **kw)
    emb = model.get_input_embeddings()
    if emb is not None and len(tokenizer) > emb.num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.training.gradient_checkpointing and hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return model


def calibration_batches(cfg: Config, tokenizer: Any) -> Callable[[], list[dict[str, torch.Tensor]]]:
    """A zero-argument callable giving model-ready padded batches of the calibration text."""
    m = cfg.method

    def make() -> list[dict[str, torch.Tensor]]:
        texts = read_texts(str(m.calibration), m.calibration_samples)
        ensure_pad_token(tokenizer)
        examples = []
        for t in texts:
            # BOS first, as in training and evaluation (disel.training.data.with_bos), within the max length
            ids = tokenizer(t, truncation=True, max_length=m.calibration_max_length)["input_ids"]
            ids = with_bos(ids, tokenizer)[: m.calibration_max_length]
            if len(ids) >= 2:
                examples.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)})
        if not examples:
            raise UserError(f"method.calibration={m.calibration!r} gave no text of two or more tokens.")
        collate = PadCollator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        bs = m.calibration_batch_size
        return [collate(examples[i : i + bs]) for i in range(0, len(examples), bs)]

    return make


def task_calibration_batches(
    cfg: Config, train_set: Any, tokenizer: Any
) -> Callable[[], list[dict[str, torch.Tensor]]]:
    """The first ``method.calibration_samples`` training examples as padded batches (CorDA-IPM previews the task)."""
    m = cfg.method

    def make() -> list[dict[str, torch.Tensor]]:
        examples = [train_set[i] for i in range(min(len(train_set), m.calibration_samples))]
        if not examples:
            raise UserError("The training set is empty: CorDA's mode 'ipm' needs task examples.")
        collate = PadCollator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        bs = m.calibration_batch_size
        return [collate(examples[i : i + bs]) for i in range(0, len(examples), bs)]

    return make


def adapt_model(
    cfg: Config,
    model: nn.Module,
    total_steps: int,
    tokenizer: Any = None,
    train_set: Any = None,
    resume: str | None = None,
) -> nn.Module:
    """``model`` adapted with the config's method; ``resume`` (a checkpoint dir) lets the method restore
    state saved beside it instead of recomputing it."""
    from ..methods.registry import MethodOptions, build_model, resolve_options

    m = cfg.method
    spec = get_method(m.name)
    options = resolve_options(m.name, m.options, "method.options")
    if resume and spec.resume is not None:
        options = spec.resume(options, Path(resume))
    modules_to_save = list(m.modules_to_save or [])
    task_type = "SEQ_CLS" if cfg.task == "seq_cls" else "CAUSAL_LM"
    opts = MethodOptions(
        rank=m.rank,
        alpha=m.alpha,
        dropout=m.dropout,
        target_modules=m.target_modules,
        task_type=task_type,
        modules_to_save=modules_to_save or None,
        total_steps=total_steps,
        options=options,
        calibration=calibration_batches(cfg, tokenizer) if m.calibration and tokenizer is not None else None,
        task_calibration=task_calibration_batches(cfg, train_set, tokenizer)
        if train_set is not None and tokenizer is not None
        else None,
    )
    adapted = build_model(model, m.name, opts)
    if cfg.task == "seq_cls":
        # The classification head is new: PEFT's SEQ_CLS task type trains it and saves it with the adapter.
        heads = [
            p for n, p in adapted.named_parameters() if ".classifier." in f".{n}" or ".score." in f".{n}"
        ]
        if heads and not any(p.requires_grad for p in heads):
            raise UserError(
                f"method {m.name!r} leaves the new classification head frozen: add it to method.modules_to_save."
            )
    return adapted


def _checkpointing_args(on: bool) -> dict[str, Any]:
    """Gradient (activation) checkpointing; non-reentrant, which works with frozen inputs (adapters)."""
    import inspect

    from transformers import TrainingArguments

    params = inspect.signature(TrainingArguments.__init__).parameters
    name = "activation_checkpointing" if "activation_checkpointing" in params else "gradient_checkpointing"
    if not on:
        return {}
    return {name: True, f"{name}_kwargs": {"use_reentrant": False}}


def training_arguments(cfg: Config, run_dir: Path, accum: int, progress: bool) -> Any:
    from transformers import TrainingArguments

    t = cfg.training
    save: dict[str, Any] = (
        {"save_strategy": "steps", "save_steps": t.save_steps} if t.save_steps else {"save_strategy": "epoch"}
    )
    return TrainingArguments(
        output_dir=str(run_dir),
        per_device_train_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=accum,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        learning_rate=effective_lr(cfg),
        lr_scheduler_type=t.scheduler,
        # a float in [0, 1) is a ratio of the total steps, an int a number of steps
        warmup_steps=t.warmup_steps if t.warmup_steps is not None else t.warmup_ratio,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_epsilon=t.adam_epsilon,
        max_grad_norm=t.max_grad_norm,
        bf16=resolve_bf16(t.bf16),
        **_checkpointing_args(t.gradient_checkpointing),
        save_total_limit=t.save_total_limit,
        logging_steps=t.logging_steps,
        seed=t.seed,
        data_seed=t.seed,
        report_to=t.report_to,
        optim=t.optim,
        optim_args=t.optim_args,
        torch_compile=t.torch_compile,
        remove_unused_columns=False,
        label_names=["labels"],
        disable_tqdm=not progress,
        dataloader_num_workers=t.dataloader_num_workers,
        dataloader_pin_memory=torch.cuda.is_available(),
        # on CPU the Trainer joins the launcher's process group only with use_cpu (gloo)
        use_cpu=not torch.cuda.is_available(),
        ddp_backend=t.ddp_backend or ("gloo" if world_size() > 1 and not torch.cuda.is_available() else None),
        fsdp=t.fsdp,
        deepspeed=t.deepspeed,
        **save,
        **t.args,
    )


# --------------------------------------------------------------------------------------------------
# The run


def run_record(cfg: Config, run_dir: Path, status: str, **extra: Any) -> dict[str, Any]:
    return {
        "run_id": cfg.run_id,
        "run_key": run_key(cfg, run_dir),
        "fingerprint": cfg.fingerprint(),
        "method": cfg.method.name,
        "rank": cfg.method.rank,
        "seed": cfg.training.seed,
        "model": _model_ref(cfg.model.name),
        "task": cfg.task,
        "status": status,
        "config": cfg.to_dict(),
        **extra,
    }


def store_record(cfg: Config, info: dict[str, Any], sweep: str | None = None) -> dict[str, Any]:
    """The ``kind="run"`` record of a finished run, from its run.json."""
    keys = ("train_loss", "wall_seconds", "global_step", "resumed_from", "trainable_sha256", "fingerprint")
    return {
        "run_id": cfg.run_id,
        "method": cfg.method.name,
        "rank": cfg.method.rank,
        "seed": cfg.training.seed,
        "run_dir": str(cfg.run_dir.resolve()),
        "sweep": sweep,
        "status": "finished",
        "config": cfg.to_dict(),
        **{k: info.get(k) for k in keys},
    }


def claim_run_dir(cfg: Config) -> Config:
    """The config whose run dir holds this run: its own dir when that is new or holds the same run (same
    fingerprint), else ``NAME-<fingerprint[:8]>`` beside it, so a run of other settings never counts as
    "already finished" nor overwrites it. An explicit ``output.run_dir`` that holds another run is an error."""
    if cfg.output.overwrite:
        return cfg
    fp = cfg.fingerprint()
    info = read_run_file(cfg.run_dir)
    if info is None or info.get("fingerprint") == fp:
        return cfg
    if cfg.output.run_dir:
        raise UserError(
            f"output.run_dir={cfg.output.run_dir!r} holds a run with other settings (fingerprint "
            f"{str(info.get('fingerprint'))[:8]}, this one {fp[:8]}): choose another output.run_dir, or set "
            "output.overwrite=true to replace it."
        )
    other = copy.deepcopy(cfg)
    other.output.run_id = f"{cfg.run_id}-{fp[:8]}"
    log(f"{cfg.run_dir} holds a run with other settings: this one runs in {other.run_dir}.")
    return other


def train(
    cfg: Config,
    *,
    callbacks: list[Any] | None = None,
    store: Any | None = None,
    progress: bool = True,
    trainer_base: type | None = None,
    sweep: str | None = None,
) -> TrainResult:
    """Train one run; resume it if it was interrupted; skip it if it finished.

    One process per run dir: the main process holds the run dir's lock (``rundir.run_lock``) for the whole
    run; a second one gets a :class:`UserError`. ``store`` (a :class:`disel.results.ResultsStore`, default
    ``output.results``) gets one ``kind="run"`` record, keyed by the run key, when the run finishes.
    """
    check_launch()
    if (cfg.training.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true") and not (
        torch.cuda.is_available()
    ):
        raise UserError(
            "FSDP needs GPUs and this machine has none (on CPU accelerate would silently train plain DDP): "
            "drop training.fsdp / the FSDP accelerate config, or train on CPU with torchrun or "
            "`accelerate launch --multi_gpu` (gloo DDP), or with the DeepSpeed accelerate config."
        )
    cfg = claim_run_dir(cfg)
    with contextlib.ExitStack() as stack:
        if is_main_process():
            try:
                stack.enter_context(run_lock(cfg.run_dir, log=log))
            except RunBusy as e:
                raise UserError(
                    f"run {cfg.run_id}: {cfg.run_dir} is in use by {e.owner}: wait for it to finish "
                    "(or stop it), then start again."
                ) from None
            info = read_run_file(cfg.run_dir)
            if (
                info is not None
                and info.get("fingerprint") not in (None, cfg.fingerprint())
                and not (cfg.output.overwrite)
            ):
                stack.close()  # another process claimed the dir meanwhile: go beside it
                return train(
                    cfg,
                    callbacks=callbacks,
                    store=store,
                    progress=progress,
                    trainer_base=trainer_base,
                    sweep=sweep,
                )
        return _train_locked(cfg, callbacks, store, progress, trainer_base, sweep)


def _train_locked(
    cfg: Config,
    callbacks: list[Any] | None,
    store: Any | None,
    progress: bool,
    trainer_base: type | None,
    sweep: str | None,
) -> TrainResult:
    from transformers import set_seed

    run_dir = cfg.run_dir
    main = is_main_process()
    world = world_size()
    accum = accumulation_steps(cfg, world)
    # the process group is up from here on (TrainingArguments joins it): the barriers below really wait
    args = training_arguments(cfg, run_dir, accum, progress)
    info = read_run_file(run_dir)
    if cfg.output.overwrite:
        if main and run_dir.exists():
            for p in run_dir.iterdir():
                if p.name != LOCK_FILE:
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        barrier()
        info = None
    elif info is not None and info.get("status") == "finished":
        if main:
            _record(cfg, info, store, sweep)  # killed between run.json and the store: record it now
        log(
            f"run {cfg.run_id} already finished in {run_dir}: skipping (set output.overwrite=true to redo it)."
        )
        return TrainResult(cfg.run_id, run_dir, "skipped", global_step=int(info.get("global_step") or 0))

    if main:
        for p in remove_stale_temp_files(run_dir):
            log(f"removed {p.name}, left by a killed write.")
    complete = checkpoints(run_dir, log=log if main else None)
    resume = str(complete[-1][1]) if complete else None
    resume_step = complete[-1][0] if complete else 0
    if main:
        for p in remove_incomplete_checkpoints(run_dir):
            log(f"removed the incomplete checkpoint {p.name} (cut short by a crash).")
    if resume:
        log(f"resuming run {cfg.run_id} from {Path(resume).name}.")
    started = info.get("started") if info else None
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(
            run_dir / RUN_FILE,
            run_record(
                cfg, run_dir, "running", started=started or time.time(), world_size=world, sweep=sweep
            ),
        )

    set_seed(cfg.training.seed)
    tokenizer = load_tokenizer(cfg)
    with args.main_process_first(desc="reading the data"):  # downloads and caches once, then every rank
        data = prepare_data(cfg, tokenizer)
    if data.dropped:
        log(f"{data.dropped} example(s) dropped: nothing of the response was left within data.max_length.")
    total = total_optimizer_steps(cfg, len(data.train), world, accum)
    base = load_base_model(cfg, data, tokenizer)
    set_seed(cfg.training.seed)  # the adapter's initialisation depends on the seed only
    model = adapt_model(cfg, base, total, tokenizer, data.train, resume=resume)
    spec = get_method(cfg.method.name)
    tally = LossTally(_checkpoint_loss_sum(resume) if resume else 0.0)
    cbs = [*(callbacks or []), *method_callbacks(spec, model), checkpoint_state_callback(tally)]
    trainer_cls = make_trainer_class(trainer_base)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # every gated method (disel, disel+lalora, disel+corda, ...) gets the gates' own learning rate
    gates_lr = gate_learning_rate(model, cfg.training.lr, cfg.training.gate_lr)
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.validation,
        data_collator=PadCollator(pad_id),
        processing_class=tokenizer,
        callbacks=cbs,
        gate_lr=gates_lr,
    )
    trainer.loss_tally = tally
    if trainer.args.world_size != world:
        raise UserError(
            f"The launcher started {world} processes but the Trainer sees world size {trainer.args.world_size}: "
            "they would train as independent copies; launch with torchrun or accelerate launch (on CPU with "
            "training.ddp_backend: gloo)."
        )
    t0 = time.time()
    if resume and resume_step >= total:
        # killed after the last checkpoint: nothing is left to train (resuming the Trainer would take a step
        # past max_steps); the final adapter is that checkpoint's
        trainer._load_from_checkpoint(resume)
        global_step = resume_step
    else:
        trainer.train(resume_from_checkpoint=resume)
        global_step = trainer.state.global_step
    train_loss = tally.mean(global_step)
    wall = time.time() - t0
    final_tmp = run_dir / f".{FINAL_DIR}.tmp"
    if main and final_tmp.exists():
        shutil.rmtree(final_tmp)
    barrier()
    trainer.save_model(str(final_tmp))  # every rank calls it: FSDP/DeepSpeed gather the weights here
    digest = trainable_hash(trainer.model)
    if main and spec.export is not None:
        spec.export(trainer.model, final_tmp / EXPORT_DIR)
    if main:
        tokenizer.save_pretrained(str(final_tmp))
        if (final_tmp / "adapter_config.json").is_file():  # the card says which recipe made the adapter
            write_model_card(final_tmp, method=cfg.method.name, recipe=_recipe(cfg, global_step))
        fsync_tree(final_tmp)
        final = run_dir / FINAL_DIR
        if final.exists():
            shutil.rmtree(final)
        os.replace(final_tmp, final)
        extra = dict(
            started=started or t0,
            num_labels=data.num_labels,
            label_names=data.label_names,
            world_size=world,
            global_step=global_step,
            train_loss=train_loss,
            wall_seconds=wall,
            resumed_from=Path(resume).name if resume else None,
            lr=effective_lr(cfg),
            gate_lr=gates_lr,
            trainable_sha256=digest,
            sweep=sweep,
        )
        finished = run_record(cfg, run_dir, "finished", **extra)
        atomic_write_json(run_dir / RUN_FILE, finished)
        _record(cfg, finished, store, sweep)
        log(f"run {cfg.run_id} finished: {global_step} steps, loss {train_loss:.4f}.")
        if cfg.training.push_to_hub:
            repo = cfg.training.hub_model_id or cfg.run_id
            log(f"pushing {final} to the hub as {repo}.")
            trainer.model.push_to_hub(repo)
            tokenizer.push_to_hub(repo)
    barrier()
    return TrainResult(
        cfg.run_id,
        run_dir,
        "finished",
        train_loss,
        wall,
        global_step,
        Path(resume).name if resume else None,
        trainer.model,
    )


def _record(cfg: Config, info: dict[str, Any], store: Any | None, sweep: str | None) -> None:
    if store is None:
        from ..results import ResultsStore

        store = ResultsStore(cfg.results_path)
    store.put("run", run_key(cfg), store_record(cfg, info, sweep or info.get("sweep")))


def _recipe(cfg: Config, steps: int) -> dict[str, Any]:
    """What the model card shows of the run: its data and training recipe, and its fingerprint."""
    d, t = cfg.data, cfg.training
    return {
        "data": {"train": d.train, "format": d.format, "template": d.template, "max_length": d.max_length},
        "training": {
            "steps": steps,
            "lr": effective_lr(cfg),
            "gate_lr": t.gate_lr,
            "scheduler": t.scheduler,
            "warmup_ratio": t.warmup_ratio,
            "warmup_steps": t.warmup_steps,
            "per_device_batch_size": t.per_device_batch_size,
            "weight_decay": t.weight_decay,
            "seed": t.seed,
        },
        "method_options": cfg.method.options,
        "fingerprint": cfg.fingerprint(),
    }


def _checkpoint_loss_sum(checkpoint: str) -> float:
    from ..utils.io import read_json

    return float(read_json(Path(checkpoint) / CHECKPOINT_STATE).get("loss_sum") or 0.0)
