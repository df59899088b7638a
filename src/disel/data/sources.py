"""Text and record sources: one grammar for every place that reads data by name.

A source is one of

* ``stdlib:docstrings`` / ``stdlib:source``: held-out standard-library docstrings / source chunks (offline,
  every Python install has them);
* a local file: ``.json`` / ``.jsonl`` / ``.csv`` / ``.parquet`` records, or raw text (``.txt``, ``.md``,
  ``.py`` or any other suffix);
* ``hf:NAME[:CONFIG][:SPLIT]``, or a bare ``datasets`` name where records are read (``data.train``): a
  ``datasets`` data set (needs the network or a local cache).

Three readers share it: :func:`read_rows` (records, for training data), :func:`load_items` (raw texts or
prompt/response pairs, for gate recording and compaction) and :func:`read_texts` (raw texts, for methods
that calibrate on data at build time). A malformed row raises a :class:`UserError` naming it (``file:line``
for JSON lines and CSV, ``file[index]`` otherwise) and the field; a byte that is not UTF-8 raises one naming
``file:line`` (every text file is read as UTF-8, a leading byte-order mark dropped).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from .stdlib import stdlib_spec_texts
from .templates import format_prompt

LOCAL_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
RAW_TEXT_SUFFIXES = (".txt", ".md", ".py")


@dataclass
class Row:
    where: str  # "file:line" or "name[split][index]", for error messages
    data: dict[str, Any]


# --------------------------------------------------------------------------------------------------
# Reading text: UTF-8 only, a bad byte is a UserError naming file:line


_BOM = b"\xef\xbb\xbf"


def _not_utf8(path: str | os.PathLike[str], line: int, byte: int, column: int) -> UserError:
    return UserError(
        f"{path}:{line} holds the byte {byte:#04x} (column {column}) that is not UTF-8: re-encode the file "
        "as UTF-8 (for instance with iconv -f latin1 -t utf-8)."
    )


def decode_utf8(data: bytes, path: str | os.PathLike[str]) -> str:
    """``data`` (the whole content of ``path``) as text; a :class:`UserError` naming the line of a bad byte."""
    body = data[len(_BOM) :] if data.startswith(_BOM) else data
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = body.rfind(b"\n", 0, e.start) + 1
        raise _not_utf8(
            path, body.count(b"\n", 0, e.start) + 1, body[e.start], e.start - line_start + 1
        ) from None


def read_text_file(path: str | os.PathLike[str]) -> str:
    """The text of a UTF-8 file; a :class:`UserError` naming ``file:line`` of a byte that is not UTF-8."""
    return decode_utf8(Path(path).read_bytes(), path)


def utf8_lines(lines: Iterable[bytes], path: str | os.PathLike[str]) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of the byte lines of a file opened in binary mode (line endings kept); a
    :class:`UserError` naming ``file:line`` of a byte that is not UTF-8."""
    for lineno, raw in enumerate(lines, 1):
        if lineno == 1 and raw.startswith(_BOM):
            raw = raw[len(_BOM) :]
        try:
            yield lineno, raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _not_utf8(path, lineno, raw[e.start], e.start + 1) from None


# --------------------------------------------------------------------------------------------------
# Reading rows


def _looks_local(source: str) -> bool:
    p = Path(source)
    return p.suffix.lower() in LOCAL_SUFFIXES or p.exists()


def read_rows(
    source: str, split: str = "train", dataset_config: str | None = None, max_rows: int | None = None
) -> list[Row]:
    """Rows of a local JSON/JSONL/CSV/parquet file or of a `datasets` name (needs the hub or its cache)."""
    if _looks_local(source):
        return list(_read_local(Path(source), max_rows))
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise UserError(f"Reading {source!r} needs the `datasets` package: pip install datasets.") from e
    try:
        ds = datasets.load_dataset(source, dataset_config, split=split)
    except Exception as e:
        raise UserError(
            f"Could not load the data set {source!r} (config {dataset_config!r}, split {split!r}): {e}; "
            "check the name, or point data.train at a local file."
        ) from e
    n = len(ds) if max_rows is None else min(max_rows, len(ds))
    return [Row(f"{source}[{split}][{i}]", dict(ds[i])) for i in range(n)]


def _read_local(path: Path, max_rows: int | None) -> Iterator[Row]:
    if not path.is_file():
        raise UserError(f"Data file {str(path)!r} does not exist: check data.train / data.validation.")
    suffix = path.suffix.lower()
    count = 0

    def done() -> bool:
        return max_rows is not None and count >= max_rows

    if suffix == ".jsonl" or (suffix == ".json" and _is_json_lines(path)):
        with path.open("rb") as f:
            for lineno, line in utf8_lines(f, path):
                if done():
                    return
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(
                        f"{path}:{lineno} is not valid JSON ({e.msg}): fix or remove that line."
                    ) from e
                if not isinstance(obj, dict):
                    raise UserError(
                        f"{path}:{lineno} is not a JSON object: each line must be {{field: value}}."
                    )
                count += 1
                yield Row(f"{path}:{lineno}", obj)
    elif suffix == ".json":
        try:
            obj = json.loads(read_text_file(path))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno} is not valid JSON ({e.msg}): fix the file.") from e
        if isinstance(obj, dict) and isinstance(obj.get("data"), list):
            obj = obj["data"]
        if not isinstance(obj, list):
            raise UserError(f"{path} must hold a JSON list of objects (or JSON lines).")
        for i, item in enumerate(obj):
            if done():
                return
            if not isinstance(item, dict):
                raise UserError(f"{path}[{i}] is not a JSON object: each item must be {{field: value}}.")
            count += 1
            yield Row(f"{path}[{i}]", item)
    elif suffix == ".csv":
        with path.open("rb") as f:
            reader = csv.DictReader(line for _, line in utf8_lines(f, path))
            for item in reader:
                if done():
                    return
                if None in item:
                    raise UserError(f"{path}:{reader.line_num} has more values than the header has columns.")
                count += 1
                yield Row(f"{path}:{reader.line_num}", dict(item))
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        for i, item in enumerate(table.to_pylist()):
            if done():
                return
            count += 1
            yield Row(f"{path}[{i}]", item)
    else:
        raise UserError(f"Data file {str(path)!r} has an unknown type: use .json, .jsonl, .csv or .parquet.")


def _is_json_lines(path: Path) -> bool:
    with path.open("rb") as f:
        for _, line in utf8_lines(f, path):
            if line.strip():
                return line.lstrip().startswith("{")
    return False


PROMPT_KEYS = ("prompt", "question", "instruction")
RESPONSE_KEYS = ("response", "output", "completion", "answer", "canonical_solution")
TEXT_KEYS = ("text", "content", "code")


@dataclass
class Item:
    """Raw text (``prompt`` None) or a prompt/response pair."""

    text: str
    prompt: str | None = None


def _record_to_item(rec: Any, where: str) -> Item:
    if isinstance(rec, str):
        return Item(rec)
    if not isinstance(rec, dict):
        raise UserError(
            f"{where} is a {type(rec).__name__}; use a JSON object with 'text' or prompt/response."
        )
    resp = next((rec[k] for k in RESPONSE_KEYS if isinstance(rec.get(k), str)), None)
    if resp is not None:
        if isinstance(rec.get("prompt"), str):
            return Item(resp, rec["prompt"])
        if isinstance(rec.get("question"), str):
            return Item(resp, rec["question"] + "\n")
        if isinstance(rec.get("instruction"), str):
            return Item(resp, format_prompt("alpaca", rec["instruction"], rec.get("input") or None))
    text = next((rec[k] for k in TEXT_KEYS if isinstance(rec.get(k), str)), None)
    if text is not None:
        return Item(text)
    raise UserError(
        f"{where} has fields {sorted(rec)}; give it 'text', or a prompt field ({', '.join(PROMPT_KEYS)}) and "
        f"a response field ({', '.join(RESPONSE_KEYS)})."
    )


def load_items(spec: str, limit: int | None = None) -> list[Item]:
    """The items of a domain spec (see the module docstring)."""
    if spec.startswith("stdlib:"):
        return [Item(t) for t in stdlib_spec_texts(spec)[:limit]]
    if spec.startswith("hf:"):
        return _load_hf(spec[3:], limit)
    path = Path(spec)
    if not path.exists():
        raise UserError(
            f"domain source {spec!r} does not exist; give a .txt/.jsonl file, stdlib:docstrings, "
            "stdlib:source or hf:NAME[:CONFIG][:SPLIT]."
        )
    if path.is_dir():
        raise UserError(f"domain source {spec!r} is a directory; give a .txt, .json or .jsonl file.")
    if path.suffix.lower() in (".jsonl", ".json", ".csv", ".parquet"):
        return [_record_to_item(row.data, row.where) for row in read_rows(str(path), max_rows=limit)]
    return [Item(read_text_file(path))]


def _load_hf(spec: str, limit: int | None) -> list[Item]:
    parts = spec.split(":")
    name = parts[0]
    config = parts[1] if len(parts) > 2 else None
    split = parts[-1] if len(parts) > 1 else "test"
    try:
        import datasets

        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # network, unknown name, missing config
        raise UserError(
            f"could not load the data set hf:{spec} ({type(e).__name__}); check the name."
        ) from None
    items = []
    for i, rec in enumerate(ds):
        if limit is not None and i >= limit:
            break
        items.append(_record_to_item(dict(rec), f"hf:{spec} row {i}"))
    return items


def read_texts(source: str, n: int, field: str = "text") -> list[str]:
    """Up to ``n`` raw texts of a source: stdlib texts, blank-line separated blocks of a text file, or the
    ``field`` of each record of a record file / data set."""
    if source.startswith("stdlib:"):
        return stdlib_spec_texts(source)[:n]
    path = Path(source)
    if path.suffix.lower() in RAW_TEXT_SUFFIXES and path.is_file():
        blocks = [b.strip() for b in read_text_file(path).split("\n\n")]
        texts = [b for b in blocks if b]
    else:
        texts = []
        for row in read_rows(source.removeprefix("hf:"), max_rows=n):
            value = row.data.get(field)
            if not isinstance(value, str):
                raise UserError(
                    f"{row.where} has no text field {field!r}: give each record a {field!r} field."
                )
            texts.append(value)
    if not texts:
        raise UserError(f"{source!r} holds no text: point it at a file with text rows.")
    return texts[:n]
