"""The Trainer glue shared by every training path (``disel train``, sweeps and the in-process recipes).

One ``transformers.Trainer`` subclass with DISeL's optimizer groups (gates at their own learning rate, no
decay) and the model's regularisers added to the loss, plus the callbacks of the method being trained
(from the registry: AdaLoRA's allocation, LaLoRA's curvature, an export for the original base beside every
checkpoint). Nothing here names a method.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..methods.gated_lora.layer import DiselGate
from ..methods.registry import MethodSpec
from ..rundir import EXPORT_DIR
from .optim import gate_lr_multiplier, with_disel_optimizer


def make_trainer_class(base: type | None = None) -> type:
    """DISeL's optimizer groups plus the ``_disel_regularizers`` extra losses, on ``base`` (Trainer)."""
    if base is None:
        from transformers import Trainer

        base = Trainer

    class RunTrainer(with_disel_optimizer(base)):  # type: ignore[misc]
        # the sum of every optimizer step's loss since step 0 (resumed runs start from the checkpoint's sum)
        loss_tally: LossTally | None = None

        def training_step(self, *args, **kwargs):  # type: ignore[override]
            loss = super().training_step(*args, **kwargs)
            if self.loss_tally is not None:
                self.loss_tally.add(float(loss.detach()))
            return loss

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[override]
            result = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
            regs = getattr(self.model, "_disel_regularizers", None)
            if not regs or not model.training:
                return result
            loss, outputs = result if return_outputs else (result, None)
            extra = sum(fn() for fn in regs)
            # When the task loss is already normalised over the whole accumulated batch, the Trainer does not
            # divide by the accumulation steps, so the regulariser (added once per micro-batch) must be.
            scaled = self.model_accepts_loss_kwargs and num_items_in_batch is not None
            if scaled:
                extra = extra / max(1, getattr(self, "current_gradient_accumulation_steps", 1))
            loss = loss + extra.to(loss.device)
            return (loss, outputs) if return_outputs else loss

    return RunTrainer


class LossTally:
    """The running sum of the training loss over the whole run, across resumes (what a resumed Trainer's own
    ``training_loss`` cannot give: it averages over the resumed steps only)."""

    def __init__(self, prior: float = 0.0):
        self.total = float(prior)

    def add(self, value: float) -> None:
        self.total += value

    def mean(self, steps: int) -> float:
        return self.total / max(1, steps)


def checkpoint_state_callback(tally: LossTally) -> Any:
    """Makes every checkpoint durable and marks it complete: fsync its files, then write
    ``rundir.CHECKPOINT_STATE`` (step and loss sum) last, atomically. A kill at any point of a checkpoint
    write leaves a checkpoint without the marker, which resume skips for the previous complete one."""
    from transformers import TrainerCallback

    from ..rundir import CHECKPOINT_STATE
    from ..utils.io import atomic_write_json, fsync_tree

    class CheckpointState(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):  # type: ignore[override]
            if state.is_world_process_zero:
                ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if ckpt.is_dir():
                    fsync_tree(ckpt)
                    atomic_write_json(
                        ckpt / CHECKPOINT_STATE, {"global_step": state.global_step, "loss_sum": tally.total}
                    )
            return control

    return CheckpointState()


def method_callbacks(spec: MethodSpec, model: nn.Module) -> list[Any]:
    """The method's own Trainer callbacks, and an export beside every checkpoint where it has one."""
    cbs = list(spec.callbacks(model) if spec.callbacks else [])
    if spec.export is not None:
        cbs.append(_export_callback(spec, model))
    return cbs


def _export_callback(spec: MethodSpec, model: nn.Module) -> Any:
    from transformers import TrainerCallback

    export = spec.export
    assert export is not None

    class ExportBesideCheckpoint(TrainerCallback):
        """Beside each checkpoint, what loads on the ORIGINAL base (``rundir.EXPORT_DIR``); the native
        checkpoint stays for resuming."""

        def on_save(self, args, state, control, **kwargs):  # type: ignore[override]
            if state.is_world_process_zero:
                ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if ckpt.is_dir():
                    export(model, ckpt / EXPORT_DIR)

    return ExportBesideCheckpoint()


def has_gates(model: nn.Module) -> bool:
    return any(isinstance(m, DiselGate) for m in model.modules())


def gate_learning_rate(model: nn.Module, lr: float, override: float | None = None) -> float | None:
    """The gates' learning rate: ``override``, else ``lr`` x the adapter's ``gate_lr_multiplier``; None when
    the model has no gates."""
    if not has_gates(model):
        return None
    return override if override is not None else lr * gate_lr_multiplier(model)
