"""Fine-tune with DISeL through transformers.Trainer, save, and reload in one call.

Runs offline on a tiny model built from a config; swap in `AutoModelForCausalLM.from_pretrained(...)`
and your own tokenizer and data for real use.

    python examples/trainer_example.py
"""

from __future__ import annotations

import tempfile

import torch
from peft import PeftModel, get_peft_model
from transformers import TrainingArguments

import disel
from disel.data import stdlib_docstrings
from disel.testing import tiny_model
from disel.testing_tokenizers import tiny_tokenizer


def main() -> None:
    tok = tiny_tokenizer(vocab_size=512)
    base = tiny_model("llama", vocab_size=len(tok))
    model = get_peft_model(base, disel.DiselConfig(r=8, target_modules="all-linear", gate_bias_init=-3.0))
    texts = stdlib_docstrings("train")[:64]
    enc = [tok(t, truncation=True, max_length=64)["input_ids"] for t in texts]
    data = [{"input_ids": torch.tensor(e), "labels": torch.tensor(e)} for e in enc if len(e) > 8]
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            learning_rate=2e-3,  # LoRA factors; gates get 5x (gate_lr_multiplier) and no weight decay
            weight_decay=0.01,
            per_device_train_batch_size=1,
            max_steps=20,
            lr_scheduler_type="cosine",
            warmup_steps=0.02,  # a float in [0, 1) is a ratio of the total steps
            max_grad_norm=1.0,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
        )
        disel.DiselTrainer(model=model, args=args, train_dataset=data).train()
        model.save_pretrained(f"{out}/adapter")
        reloaded = PeftModel.from_pretrained(tiny_model("llama", vocab_size=len(tok)), f"{out}/adapter")
        x = data[0]["input_ids"][None]
        with torch.no_grad():
            same = torch.allclose(model(x).logits, reloaded(x).logits, atol=1e-6)
        gates = [g(torch.zeros(1, g.in_features)).mean().item() for _, g in disel.iter_gates(reloaded)]
        print(f"reloaded adapter reproduces the logits: {same}; mean gate at x=0: {sum(gates) / len(gates):.3f}")


if __name__ == "__main__":
    main()
