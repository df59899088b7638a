"""The one shim between disel's PEFT types (DISEL, QUERYABLE) and PEFT's registries.

``import disel`` does not import PEFT (or torch): it installs an import hook, and the types are registered
the moment PEFT itself is imported, by anyone, or at once when PEFT already is. So ``import disel`` stays
cheap, and ``PeftModel.from_pretrained(model, DISEL_ADAPTER)`` works after it as for any PEFT adapter.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import ModuleType

_state = "no"  # "no" | "busy" (the imports below run) | "yes"


def ensure_registered() -> None:
    """Register every disel PEFT type with PEFT (idempotent; imports PEFT)."""
    global _state
    if _state != "no":
        return
    _state = "busy"
    try:
        _register()
    except BaseException:
        _state = "no"
        raise
    _state = "yes"


def _register() -> None:
    from peft import mapping

    from .gated_lora.config import PEFT_TYPE as DISEL
    from .gated_lora.config import DiselConfig
    from .gated_lora.model import DiselModel
    from .queryable.config import PEFT_TYPE as QUERYABLE
    from .queryable.config import QueryableConfig
    from .queryable.model import QueryableModel

    for peft_type, config, tuner in (
        (DISEL, DiselConfig, DiselModel),
        (QUERYABLE, QueryableConfig, QueryableModel),
    ):
        mapping.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config
        mapping.PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = tuner
        mapping.PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = tuner.prefix


class _RegisterAfterLoad(importlib.abc.Loader):
    """Runs PEFT's own loader, then registers disel's types."""

    def __init__(self, inner: importlib.abc.Loader):
        self.inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.inner.exec_module(module)
        if not _disel_method_importing():
            ensure_registered()
        # else: a disel method module is importing PEFT itself; its package registers once it is loaded


def _disel_method_importing() -> bool:
    """True while a module of ``disel.methods`` is half-initialised (its import is on the stack)."""
    return any(
        name.startswith("disel.methods.") and getattr(getattr(mod, "__spec__", None), "_initializing", False)
        for name, mod in list(sys.modules.items())
    )


class _PeftImportHook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):  # type: ignore[no-untyped-def]
        if name != "peft":
            return None
        sys.meta_path.remove(self)  # once: the real finders locate PEFT
        spec = importlib.util.find_spec("peft")
        if spec is None or spec.loader is None:
            return None
        spec.loader = _RegisterAfterLoad(spec.loader)
        return spec


def install() -> None:
    """Register now if PEFT is loaded, else as soon as it is imported."""
    if "peft" in sys.modules:
        ensure_registered()
    elif not any(isinstance(f, _PeftImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _PeftImportHook())
