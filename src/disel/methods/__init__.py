"""Fine-tuning methods and the registry that maps a name to each."""

from .registry import (
    METHODS,
    MethodOptions,
    MethodSpec,
    available_methods,
    build_model,
    get_method,
    register_method,
)

__all__ = [
    "METHODS",
    "MethodOptions",
    "MethodSpec",
    "available_methods",
    "build_model",
    "get_method",
    "register_method",
]
