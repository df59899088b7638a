"""One in-process fine-tuning core for the recipes (the demo, the comparisons, the gates demo).

:func:`fit` trains a model already in memory on a list of tokenized examples with the same Trainer glue as
``disel train`` (:func:`disel.training.trainer.make_trainer_class`: DISeL's optimizer groups, gates at their
own learning rate without decay, the model's ``_disel_regularizers`` added to the loss) and the registered
method's callbacks (:func:`disel.training.trainer.method_callbacks`: AdaLoRA's allocation, ...). The schedule
(linear warmup then cosine), gradient clipping and the batch order are ``transformers.Trainer``'s, so a
recipe's numbers come from the code path ``disel train`` runs. Nothing is written outside a temporary
directory, and nothing is saved.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from .data import ExampleDataset, PadCollator
from .trainer import gate_learning_rate, make_trainer_class, method_callbacks


@dataclass
class FitResult:
    """What :func:`fit` reports; the model itself is trained in place and left in eval mode."""

    train_loss: float  # the Trainer's mean training loss over the run (task loss plus regularisers)
    losses: list[float] = field(default_factory=list)  # the task loss of each optimizer step, in order
    global_step: int = 0
    seconds: float = 0.0
    gate_lr: float | None = None  # the gates' learning rate (None: the model has no gates)

    @property
    def final_loss(self) -> float:
        return self.losses[-1] if self.losses else float("nan")


def _fit_trainer_class(base: type) -> type:
    """``base`` (a :func:`make_trainer_class` class) that also records each training step's task loss."""

    class FitTrainer(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, step_losses: list[torch.Tensor], **kwargs: Any) -> None:
            self._step_losses = step_losses
            super().__init__(*args, **kwargs)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[override]
            loss, outputs = super().compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
            if model.training:
                task = outputs["loss"] if isinstance(outputs, Mapping) else outputs[0]
                self._step_losses.append(task.detach())
            return (loss, outputs) if return_outputs else loss

    return FitTrainer


def _progress_callback(desc: str, losses: list[torch.Tensor]) -> Any:
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class FitProgress(TrainerCallback):
        """One bar of ``max_steps`` steps named ``desc``, with the last task loss; the Trainer's log lines
        are left out."""

        bar: Any = None

        def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[override]
            self.bar = tqdm(total=state.max_steps, desc=desc, leave=False)

        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[override]
            if self.bar is not None:
                self.bar.update(1)
                if losses and state.global_step % 10 == 0:
                    self.bar.set_postfix(loss=f"{float(losses[-1]):.3f}")

        def on_train_end(self, args, state, control, **kwargs):  # type: ignore[override]
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return FitProgress()


def fit(
    model: nn.Module,
    train_examples: Sequence[Mapping[str, Any]],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    gate_lr: float | None = None,
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    seed: int = 0,
    method: str | None = None,
    pad_token_id: int = 0,
    callbacks: Sequence[Any] = (),
    progress: bool = True,
    desc: str = "train",
) -> FitResult:
    """Train ``model`` in place for exactly ``steps`` optimizer steps of ``batch_size`` examples.

    ``train_examples`` are dicts of int lists (``input_ids``, ``labels``, optionally ``attention_mask``: all
    ones when absent), as the demo's ``encode_sft`` makes them; the Trainer draws them in shuffled epochs
    (seeded by ``seed``) and cycles as many epochs as ``steps`` needs; every batch is full when there are at
    least ``batch_size`` examples. AdamW over DISeL's parameter groups at ``lr`` (the gates at ``gate_lr``, default
    ``lr`` x the adapter's ``gate_lr_multiplier``), linear warmup over ``warmup_steps`` then cosine to 0 at
    ``steps``, gradients clipped to ``max_grad_norm`` (0: no clipping), the model's ``_disel_regularizers``
    added to the loss. ``method`` (a registry name) adds that method's Trainer callbacks; ``callbacks`` adds
    more. Trains on the GPU when there is one (the model stays there), else on the CPU.
    """
    from transformers import PrinterCallback, ProgressCallback, TrainingArguments

    if steps < 1 or batch_size < 1:
        raise UserError(
            f"fit needs steps >= 1 and batch_size >= 1 (got steps={steps}, batch_size={batch_size})."
        )
    if not train_examples:
        raise UserError("fit got no training examples.")
    if lr <= 0:
        raise UserError(f"fit needs a positive learning rate (got lr={lr}).")
    # a missing attention mask is all ones, so that the collator pads it with zeros beside the pad tokens
    examples = [
        {**ex, "attention_mask": ex.get("attention_mask", [1] * len(ex["input_ids"]))}
        for ex in train_examples
    ]
    cbs: list[Any] = []
    if method is not None:
        from ..methods.registry import get_method

        cbs += method_callbacks(get_method(method), model)
    cbs += list(callbacks)
    losses: list[torch.Tensor] = []
    if progress:
        cbs.append(_progress_callback(desc, losses))
    gates_lr = gate_learning_rate(model, lr, gate_lr)
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="disel-fit-") as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            max_steps=steps,
            per_device_train_batch_size=batch_size,
            learning_rate=lr,
            lr_scheduler_type="cosine",
            warmup_steps=int(warmup_steps),
            weight_decay=weight_decay,
            max_grad_norm=max_grad_norm,
            seed=seed,
            data_seed=seed,
            save_strategy="no",
            logging_strategy="no",
            report_to="none",
            remove_unused_columns=False,
            label_names=["labels"],
            dataloader_drop_last=len(examples) >= batch_size,
            dataloader_pin_memory=cuda,
            disable_tqdm=True,
            use_cpu=not cuda,
        )
        trainer = _fit_trainer_class(make_trainer_class())(
            model=model,
            args=args,
            train_dataset=ExampleDataset(examples),
            data_collator=PadCollator(pad_token_id),
            callbacks=cbs,
            gate_lr=gates_lr,
            step_losses=losses,
        )
        # the run's one bar (or none) instead of the Trainer's bar and printed log lines
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        t0 = time.time()
        out = trainer.train()
        seconds = time.time() - t0
    model.eval()
    return FitResult(
        train_loss=float(out.training_loss),
        losses=[float(x) for x in losses],
        global_step=int(trainer.state.global_step),
        seconds=seconds,
        gate_lr=gates_lr,
    )
