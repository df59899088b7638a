"""Tiny randomly initialised models built from configs (no download), for tests, dry runs and benchmarks."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Arch = Literal["llama", "mistral", "qwen2", "gpt2", "roberta", "bert"]
Task = Literal["causal_lm", "seq_cls", "masked_lm"]

TINY_ARCHS: tuple[str, ...] = ("llama", "mistral", "qwen2", "gpt2", "roberta", "bert")
DECODERS = ("llama", "mistral", "qwen2", "gpt2")
ENCODERS = ("roberta", "bert")


def tiny_config(arch: str, vocab_size: int = 128, hidden: int = 32, layers: int = 2, **overrides):
    import transformers as tf

    common = dict(vocab_size=vocab_size)
    if arch in ("llama", "mistral", "qwen2"):
        cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}[arch]
        cfg = cls(
            **common,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=False,
        )
    elif arch == "gpt2":
        cfg = tf.GPT2Config(
            **common,
            n_embd=hidden,
            n_layer=layers,
            n_head=4,
            n_positions=256,
            bos_token_id=vocab_size - 1,
            eos_token_id=vocab_size - 1,
        )
    elif arch in ("roberta", "bert"):
        cls = tf.RobertaConfig if arch == "roberta" else tf.BertConfig
        cfg = cls(
            **common,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            max_position_embeddings=256 + 2,
            type_vocab_size=1 if arch == "roberta" else 2,
        )
    else:
        raise ValueError(f"arch={arch!r} is not a tiny architecture: choose one of {', '.join(TINY_ARCHS)}.")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def tiny_model(arch: str = "llama", task: Task | None = None, seed: int = 0, **config_overrides) -> nn.Module:
    """A tiny transformers model of ``arch``: causal LM for decoders, masked LM for encoders by default."""
    import transformers as tf

    task = task or ("causal_lm" if arch in DECODERS else "masked_lm")
    cfg = tiny_config(arch, **config_overrides)
    if task == "seq_cls":
        cfg.num_labels = getattr(cfg, "num_labels", 2) or 2
        if arch in DECODERS:
            cfg.pad_token_id = 0
    auto = {
        "causal_lm": tf.AutoModelForCausalLM,
        "seq_cls": tf.AutoModelForSequenceClassification,
        "masked_lm": tf.AutoModelForMaskedLM,
    }[task]
    torch.manual_seed(seed)
    model = auto.from_config(cfg)
    model.eval()
    return model


class TinyMLP(nn.Module):
    """A small custom (non-transformers) model, as in PEFT's custom-model tests."""

    def __init__(self, d_in: int = 16, hidden: int = 32, d_out: int = 4):
        super().__init__()
        self.lin0 = nn.Linear(d_in, hidden)
        self.act = nn.ReLU()
        self.lin1 = nn.Linear(hidden, hidden)
        self.lin2 = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(self.act(self.lin0(x)))))
