"""Small tokenizers built offline, for tiny test models (which ship no tokenizer) and the demo.

``tiny_tokenizer(vocab_size)`` trains a character-seeded BPE with the ``tokenizers`` library on a fixed
handful of standard-library modules (English docstrings and Python source every install has). The alphabet
is all printable ASCII plus tab and newline, so any ASCII text round-trips exactly through encode/decode
(needed for lm-eval, which splits context and continuation at character positions). Training is seeded by
fixed data only, hence deterministic for a given Python version, and takes well under a second; results are
cached per process. The tokenizer is a ``PreTrainedTokenizerFast`` and saves with ``save_pretrained``.
"""

from __future__ import annotations

import string
import sysconfig
from functools import lru_cache
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<mask>")
# Printable ASCII without the vertical tab / form feed, which never occur in the texts we use.
ALPHABET = tuple(sorted(set(string.printable) - {"\x0b", "\x0c", "\r"}))
MIN_VOCAB = len(SPECIAL_TOKENS) + len(ALPHABET)

# Modules present in every CPython >= 3.11 (the training corpus of the tokenizer).
_CORPUS_MODULES = ("textwrap.py", "argparse.py", "functools.py", "string.py", "json/decoder.py", "shlex.py")


def _corpus() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for rel in _CORPUS_MODULES:
        p = root / rel
        if p.exists():
            text = p.read_text(encoding="utf-8", errors="replace")
            texts.extend(text[i : i + 4000] for i in range(0, len(text), 4000))
    return texts or [" ".join(ALPHABET)]


@lru_cache(maxsize=8)
def _tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # Words keep their leading space; runs of whitespace (indentation) form their own pieces.
    tok.pre_tokenizer = pre_tokenizers.Split(
        Regex(r" ?[A-Za-z_]+| ?[0-9]+| ?[^A-Za-z0-9_\s]+|\s+"), behavior="isolated"
    )
    tok.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=list(ALPHABET),
        limit_alphabet=len(ALPHABET),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(vocab_size: int = 128, model_max_length: int = 256) -> Any:
    """A deterministic BPE ``PreTrainedTokenizerFast`` with ``vocab_size`` entries (at least ``MIN_VOCAB``).

    Special tokens: ``<pad>``=0, ``<s>``=1 (bos/cls), ``</s>``=2 (eos/sep), ``<unk>``=3, ``<mask>``=4.
    Pair it with ``disel.testing.tiny_model(..., vocab_size=vocab_size)``.
    """
    if vocab_size < MIN_VOCAB:
        raise ValueError(
            f"vocab_size={vocab_size} is too small for the ASCII alphabet: use at least {MIN_VOCAB}."
        )
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(_tokenizer_json(vocab_size))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        mask_token="<mask>",
        cls_token="<s>",
        sep_token="</s>",
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
