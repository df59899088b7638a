"""Training data: rows from local files or `datasets`, turned into tokenized examples.

Three formats:

- ``instruction``: a prompt template around the instruction, the loss on the response tokens only (the
  prompt's labels are -100), as in the paper's math and code runs;
- ``classification``: one or two text fields and a label (GLUE style), for a fresh classification head;
- ``text``: raw text for causal-LM training (loss on every token).

Every row is checked as it is read; a malformed row raises a :class:`UserError` that names the row
(``file:line`` for JSON lines and CSV, ``file[index]`` otherwise) and the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..data.sources import Row, read_rows
from ..data.templates import prompt_template
from ..errors import UserError
from .config import Config, DataConfig


def _field(row: Row, name: str, *, kind: str = "text") -> Any:
    if name not in row.data:
        raise UserError(
            f"{row.where} has no field {name!r} (fields: {', '.join(map(str, row.data)) or 'none'}): "
            f"fix the row or set the data config's field name."
        )
    value = row.data[name]
    if kind == "text" and not isinstance(value, str):
        raise UserError(f"{row.where} field {name!r} must be text, got {type(value).__name__} {value!r}.")
    if kind == "label" and (value is None or isinstance(value, (float, list, dict)) and not _int_like(value)):
        raise UserError(f"{row.where} field {name!r} must be an integer or a string label, got {value!r}.")
    return value


def _int_like(v: Any) -> bool:
    return isinstance(v, float) and v.is_integer()


def _norm_label(v: Any) -> Any:
    """Integral floats and digit strings (CSV cells) are integer labels; other strings are names."""
    if _int_like(v):
        return int(v)
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        return int(v.strip())
    return v


# --------------------------------------------------------------------------------------------------
# Tokenized examples


class ExampleDataset(torch.utils.data.Dataset):
    """A list of tokenized examples (dicts of int lists), what the Trainer's dataloader indexes."""

    def __init__(self, examples: list[dict[str, Any]]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.examples[i]


@dataclass
class PreparedData:
    train: ExampleDataset
    validation: ExampleDataset | None
    num_labels: int | None = None
    label_names: list[str] | None = None
    dropped: int = 0  # instruction rows whose response was cut away entirely by max_length


def ensure_pad_token(tokenizer: Any) -> None:
    """Causal LMs often ship without a pad token; padding with EOS is the usual fix (labels mask it)."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        elif tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})


def with_bos(ids: list[int], tok: Any) -> list[int]:
    """Start with BOS whenever the tokenizer has one, as generation and scoring do (``disel.evaluation.lm``).

    Llama-style tokenizers add it themselves; others (GPT-2's, the shipped demo model's) do not, and a model
    trained without it but evaluated with it sees a context it never saw in training.
    """
    bos = getattr(tok, "bos_token_id", None)
    return ids if bos is None or (ids and ids[0] == bos) else [bos, *ids]


def _instruction_example(row: Row, d: DataConfig, tok: Any, template: str) -> dict[str, Any] | None:
    instruction = _field(row, d.instruction_field)
    if d.input_field and d.input_field in row.data and row.data[d.input_field]:
        extra = _field(row, d.input_field)
        instruction = f"{instruction}\n\n{extra}"
    response = _field(row, d.response_field)
    try:
        prompt = template.format(instruction=instruction)
    except (KeyError, IndexError) as e:
        raise UserError(f"data.template has a placeholder other than {{instruction}}: {e}.") from e
    prompt_ids = with_bos(tok(prompt, add_special_tokens=True)["input_ids"], tok)
    resp_ids = tok(response, add_special_tokens=False)["input_ids"]
    if tok.eos_token_id is not None:
        resp_ids = resp_ids + [tok.eos_token_id]
    ids = (prompt_ids + resp_ids)[: d.max_length]
    labels = ([-100] * len(prompt_ids) + resp_ids)[: d.max_length]
    if all(lab == -100 for lab in labels):
        return None
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def _text_example(row: Row, d: DataConfig, tok: Any) -> dict[str, Any] | None:
    text = _field(row, d.text_field)
    ids = tok(text, add_special_tokens=True, truncation=True, max_length=d.max_length)["input_ids"]
    ids = with_bos(ids, tok)[: d.max_length]
    if len(ids) < 2:
        return None
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)}


def _classification_example(row: Row, d: DataConfig, tok: Any, label_id: int) -> dict[str, Any]:
    texts = [_field(row, f) for f in d.text_fields]
    enc = tok(*texts, truncation=True, max_length=d.max_length)
    out = {k: list(v) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    out["labels"] = label_id
    return out


def _label_mapping(
    rows: list[Row], d: DataConfig, num_labels: int | None
) -> tuple[dict[Any, int], list[str]]:
    """Integer labels are used as they are; string labels are numbered in sorted order."""
    values = [_field(r, d.label_field, kind="label") for r in rows]
    values = [_norm_label(v) for v in values]
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        n = num_labels or (max(values) + 1 if values else 2)
        for r, v in zip(rows, values):
            if not 0 <= v < n:
                raise UserError(f"{r.where} field {d.label_field!r}={v} is outside [0, {n}): fix the label.")
        return {i: i for i in range(n)}, [str(i) for i in range(n)]
    names = sorted({str(v) for v in values})
    return {name: i for i, name in enumerate(names)}, names


def prepare_data(cfg: Config, tokenizer: Any) -> PreparedData:
    """Read and tokenize the train (and optional validation) data of ``cfg``."""
    d = cfg.data
    train_rows = read_rows(d.train, d.split, d.dataset_config, d.max_samples)
    if not train_rows:
        raise UserError(f"data.train={d.train!r} has no rows: point it at a non-empty data set.")
    val_rows: list[Row] = []
    if d.validation or d.validation_split:
        src = d.validation or d.train
        val_rows = read_rows(src, d.validation_split or "validation", d.dataset_config, d.max_samples)

    num_labels = label_names = None
    dropped = 0

    def convert(rows: list[Row]) -> list[dict[str, Any]]:
        nonlocal dropped
        out = []
        for r in rows:
            if d.format == "instruction":
                ex = _instruction_example(r, d, tokenizer, prompt_template(d.template))
            elif d.format == "text":
                ex = _text_example(r, d, tokenizer)
            else:
                raw = _field(r, d.label_field, kind="label")
                raw = _norm_label(raw)
                key = raw if isinstance(raw, int) else str(raw)
                if key not in mapping:
                    raise UserError(f"{r.where} field {d.label_field!r}={raw!r} is not a training label.")
                ex = _classification_example(r, d, tokenizer, mapping[key])
            if ex is None:
                dropped += 1
            else:
                out.append(ex)
        return out

    if d.format == "instruction" or d.format == "text":
        ensure_pad_token(tokenizer)
    if d.format == "classification":
        mapping, label_names = _label_mapping(train_rows, d, cfg.model.num_labels)
        num_labels = len(label_names)
    train = convert(train_rows)
    if not train:
        raise UserError(
            f"No training example is left after tokenizing {d.train!r} with max_length={d.max_length}: "
            "raise data.max_length."
        )
    val = ExampleDataset(convert(val_rows)) if val_rows else None
    return PreparedData(ExampleDataset(train), val, num_labels, label_names, dropped)


class PadCollator:
    """Right-pads ``input_ids`` (pad id), ``attention_mask`` (0), ``token_type_ids`` (0) and ``labels`` (-100)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = int(pad_token_id)

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(ex["input_ids"]) for ex in batch)
        out: dict[str, torch.Tensor] = {}
        pads = {"input_ids": self.pad_token_id, "attention_mask": 0, "token_type_ids": 0, "labels": -100}
        for key, pad in pads.items():
            if key not in batch[0]:
                continue
            if key == "labels" and not isinstance(batch[0]["labels"], list):
                out[key] = torch.tensor([ex["labels"] for ex in batch], dtype=torch.long)
                continue
            out[key] = torch.tensor(
                [ex[key] + [pad] * (width - len(ex[key])) for ex in batch], dtype=torch.long
            )
        return out
