"""Fine-tuning methods and the registry that maps a name to each."""

from .registry import (
    METHODS,
    MethodOptions,
    MethodSpec,
    add_plugin_module,
    available_methods,
    build_model,
    get_method,
    register_method,
)

__all__ = [
    "METHODS",
    "MethodOptions",
    "MethodSpec",
    "add_plugin_module",
    "available_methods",
    "build_model",
    "get_method",
    "register_method",
]
