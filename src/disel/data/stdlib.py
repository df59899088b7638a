"""Real English and Python text that every Python install has: the standard library's docstrings and source.

Texts are split into ``train`` and ``heldout`` by a hash of the module name, so a model pretrained on the
train split is evaluated on modules it never saw. The order is deterministic for a given Python version.
"""

from __future__ import annotations

import ast
import hashlib
import sysconfig
from functools import lru_cache
from pathlib import Path
from typing import Literal

Split = Literal["train", "heldout", "all"]

# Packages skipped: tests, vendored or generated code, and platform-specific modules.
_SKIP_PARTS = {
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "ensurepip",
}


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@lru_cache(maxsize=1)
def _module_files() -> tuple[Path, ...]:
    root = _stdlib_dir()
    files = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if any(part in _SKIP_PARTS or part.startswith("_") and part != "__init__.py" for part in rel.parts):
            continue
        files.append(p)
    return tuple(files)


def _module_name(path: Path) -> str:
    rel = path.relative_to(_stdlib_dir()).with_suffix("")
    return ".".join(rel.parts).removesuffix(".__init__")


def _split_of(module: str, heldout_fraction: float) -> str:
    h = int(hashlib.sha1(module.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "heldout" if h < heldout_fraction else "train"


def _files(split: Split, heldout_fraction: float) -> list[Path]:
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split={split!r} is invalid: use 'train', 'heldout' or 'all'.")
    out = []
    for p in _module_files():
        if split == "all" or _split_of(_module_name(p), heldout_fraction) == split:
            out.append(p)
    return out


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def stdlib_docstrings(
    split: Split = "all", min_chars: int = 80, max_chars: int = 2000, heldout_fraction: float = 0.2
) -> list[str]:
    """Module, class and function docstrings of the standard library (English prose), cleaned."""
    return [doc for _, doc in stdlib_docstrings_by_module(split, min_chars, max_chars, heldout_fraction)]


def stdlib_docstrings_by_module(
    split: Split = "all", min_chars: int = 80, max_chars: int = 2000, heldout_fraction: float = 0.2
) -> list[tuple[str, str]]:
    """``(module name, docstring)`` for every docstring :func:`stdlib_docstrings` yields, in its order."""
    out: list[tuple[str, str]] = []
    for p in _files(split, heldout_fraction):
        src = _read(p)
        if src is None:
            continue
        try:
            tree = ast.parse(src)
        except (SyntaxError, ValueError):
            continue
        name = _module_name(p)
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node, clean=True)
                if doc and len(doc) >= min_chars and doc.isascii():
                    out.append((name, doc[:max_chars]))
    return out


def stdlib_source_chunks(
    split: Split = "all", lines_per_chunk: int = 24, min_chars: int = 200, heldout_fraction: float = 0.2
) -> list[str]:
    """Consecutive blocks of standard-library source lines (Python code), ASCII only."""
    out: list[str] = []
    for p in _files(split, heldout_fraction):
        src = _read(p)
        if src is None or not src.isascii():
            continue
        lines = src.splitlines()
        for i in range(0, len(lines), lines_per_chunk):
            chunk = "\n".join(lines[i : i + lines_per_chunk]).strip("\n")
            if len(chunk) >= min_chars:
                out.append(chunk)
    return out


def stdlib_spec_texts(spec: str) -> list[str]:
    """Held-out texts of a ``stdlib:docstrings`` / ``stdlib:source`` data spec (used by CLI options)."""
    kind = spec.split(":", 1)[1] if spec.startswith("stdlib:") else ""
    if kind == "docstrings":
        return stdlib_docstrings("heldout")
    if kind == "source":
        return stdlib_source_chunks("heldout")
    from ..errors import UserError

    raise UserError(f"{spec!r} is not a standard-library source: use stdlib:docstrings or stdlib:source.")
