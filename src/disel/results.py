"""The results store: one SQLite file that every stage appends to.

Why SQLite: each insert is a transaction, so a run killed mid-write leaves either the whole record or none
(no half-written JSON line), several processes (sweep workers, torchrun ranks, `disel eval`) can write to
the same file safely, and it is in the standard library. Records are plain JSON payloads keyed by
``kind`` (e.g. "run", "eval", "base_eval", "gates"), a run key and an optional checkpoint ``step``;
:func:`ResultsStore.to_jsonl` exports them for other tools.

A run's key is ``NAME#HASH`` (:func:`disel.training.config.run_key`: the hash covers what determines the
run's result and its run dir), so two runs of the same name (another sweep, other hyper-parameters, another
output dir) never share or overwrite each other's records; queries by ``run_id`` accept the name or the key.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    run_id TEXT NOT NULL,
    step INTEGER,
    created REAL NOT NULL,
    payload TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS records_kind_run ON records(kind, run_id, step);
"""

DEFAULT_NAME = "results.sqlite"


class ResultsStore:
    """``ResultsStore(path)``: ``path`` is a ``.sqlite`` file or a directory (``results.sqlite`` inside)."""

    def __init__(self, path: str | os.PathLike[str]):
        p = Path(path)
        if p.suffix not in (".sqlite", ".db"):
            p = p / DEFAULT_NAME
        self.path = p
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as con:
            con.executescript(SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        con = sqlite3.connect(self.path, timeout=60.0)
        try:
            con.execute("PRAGMA journal_mode=WAL")
            yield con
            con.commit()
        finally:
            con.close()

    def add(self, kind: str, run_id: str, payload: dict[str, Any], step: int | None = None) -> int:
        """Append one record atomically; returns its id."""
        text = json.dumps(payload, default=_default, sort_keys=True)
        with self._connect() as con:
            cur = con.execute(
                "INSERT INTO records(kind, run_id, step, created, payload) VALUES (?, ?, ?, ?, ?)",
                (kind, run_id, step, time.time(), text),
            )
            return int(cur.lastrowid)

    def put(self, kind: str, run_id: str, payload: dict[str, Any], step: int | None = None) -> int:
        """Replace the records of (kind, run_id, step) by this one, in one transaction."""
        text = json.dumps(payload, default=_default, sort_keys=True)
        with self._connect() as con:
            con.execute(
                "DELETE FROM records WHERE kind = ? AND run_id = ? AND step IS ?", (kind, run_id, step)
            )
            cur = con.execute(
                "INSERT INTO records(kind, run_id, step, created, payload) VALUES (?, ?, ?, ?, ?)",
                (kind, run_id, step, time.time(), text),
            )
            return int(cur.lastrowid)

    def records(
        self, kind: str | None = None, run_id: str | None = None, step: int | None | str = "any"
    ) -> list[dict[str, Any]]:
        """Records as dicts ``{"id", "kind", "run_id", "step", "created", **payload}``, oldest first."""
        q = "SELECT id, kind, run_id, step, created, payload FROM records WHERE 1=1"
        args: list[Any] = []
        if kind is not None:
            q += " AND kind = ?"
            args.append(kind)
        if run_id is not None:  # a run key, or a run name: every key of that name
            q += " AND (run_id = ? OR substr(run_id, 1, ?) = ?)"
            args += [run_id, len(run_id) + 1, run_id + "#"]
        if step != "any":
            q += " AND step IS ?"
            args.append(step)
        q += " ORDER BY id"
        with self._connect() as con:
            rows = con.execute(q, args).fetchall()
        out = []
        for rid, k, r, s, created, payload in rows:
            rec = json.loads(payload)
            rec.setdefault("run_id", r.partition("#")[0] if "#" in r else r)
            rec.update({"id": rid, "kind": k, "run_key": r, "step": s, "created": created})
            out.append(rec)
        return out

    def latest(self, kind: str, run_id: str, step: int | None | str = "any") -> dict[str, Any] | None:
        """The newest record of ``kind`` for that run key (or name) and step."""
        recs = self.records(kind=kind, run_id=run_id, step=step)
        return recs[-1] if recs else None

    def has(self, kind: str, run_id: str) -> bool:
        """Whether a record of ``kind`` exists for that run key exactly."""
        with self._connect() as con:
            row = con.execute(
                "SELECT 1 FROM records WHERE kind = ? AND run_id = ? LIMIT 1", (kind, run_id)
            ).fetchone()
        return row is not None

    def to_jsonl(self, path: str | os.PathLike[str]) -> Path:
        from .utils.io import atomic_write_text

        lines = [json.dumps(r, default=_default, sort_keys=True) for r in self.records()]
        return atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))


def _default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serialisable")
