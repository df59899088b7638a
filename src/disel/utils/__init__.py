"""Small shared utilities (atomic file writes)."""

from .io import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json, save_figure

__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_write_text", "read_json", "save_figure"]
