"""Data the project generates or reads from every Python install (no network)."""

from .stdlib import stdlib_docstrings, stdlib_source_chunks, stdlib_spec_texts

__all__ = ["stdlib_docstrings", "stdlib_source_chunks", "stdlib_spec_texts"]
