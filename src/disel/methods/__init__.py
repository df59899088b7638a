"""Fine-tuning methods and the registry that maps a name to each."""

from .registry import (
    METHODS,
    MethodOptions,
    MethodSpec,
    available_methods,
    build_model,
    get_method,
    register_method,
    resolve_options,
)

__all__ = [
    "METHODS",
    "MethodOptions",
    "MethodSpec",
    "available_methods",
    "build_model",
    "get_method",
    "register_method",
    "resolve_options",
]
