"""The one shim between disel's PEFT types (DISEL, QUERYABLE) and PEFT's registries.

``import disel`` does not import PEFT (or torch): it installs an import hook, and the types are registered
the moment PEFT itself is imported, by anyone, or at once when PEFT already is. So ``import disel`` stays
cheap, and after it a DISeL adapter loads wherever a PEFT adapter loads: ``PeftModel.from_pretrained``,
transformers' ``AutoModelForCausalLM.from_pretrained(ADAPTER_DIR)`` and ``model.load_adapter(ADAPTER_DIR)``,
lm-eval's ``peft=`` model argument (through ``disel lm-eval``, whose process imports disel first).

Registration prefers PEFT's public ``peft.utils.register_peft_method`` and falls back to writing PEFT's
mappings (``PEFT_TYPE_TO_CONFIG_MAPPING``, ``_TUNER_``, ``_PREFIX_``) when that function is missing or refuses
the type: up to peft 0.21 it accepts only names of PEFT's own ``PeftType`` enum, which a package outside
PEFT cannot extend. :data:`REGISTERED_VIA` says which way each type went.

A type outside that enum is a :class:`~disel.methods.model_card.PeftTypeName`: a ``str`` with the
``.value`` and ``.name`` PEFT's enum members have, which PEFT and transformers read
(``config.peft_type.value``). And each tuner's checkpoint keys follow the convention transformers' adapter
loader assumes, nested adapter modules included (:func:`_use_transformers_checkpoint_keys`).

What no hook can change: a process that never imports disel (a plain ``lm_eval`` or ``python`` with only PEFT
imported) fails on a DISeL adapter with PEFT's ``KeyError: 'DISEL'``; neither PEFT nor transformers nor
lm-eval loads plugins (no entry-point group), and installing a ``.pth``/``sitecustomize`` that imports disel
into every Python process would be too invasive. So the saved ``adapter_config.json`` (key ``requires``) and
the model card say what to do: ``pip install disel`` and ``import disel`` (docs/serving.md).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import ModuleType

_state = "no"  # "no" | "busy" (the imports below run) | "yes"

# peft type -> "register_peft_method" or "mappings": how the last registration went
REGISTERED_VIA: dict[str, str] = {}


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
        REGISTERED_VIA[str(peft_type)] = _register_one(peft_type, config, tuner)


def _register_one(peft_type: str, config: type, tuner: type) -> str:
    """Register one type: PEFT's public function when it takes the type, else PEFT's mappings."""
    from peft import mapping

    _use_transformers_checkpoint_keys(tuner)

    try:
        from peft.utils.peft_types import register_peft_method
    except ImportError:  # a PEFT without the public function
        register_peft_method = None
    if register_peft_method is not None and peft_type not in mapping.PEFT_TYPE_TO_CONFIG_MAPPING:
        try:
            register_peft_method(
                name=peft_type.lower(), config_cls=config, model_cls=tuner, prefix=tuner.prefix
            )
        except (ValueError, KeyError):
            pass  # peft <= 0.21: "Unknown PEFT type ..., please add an entry to PeftType"
        else:
            if mapping.PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type) is config:
                return "register_peft_method"
    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = tuner
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = tuner.prefix
    return "mappings"


def _use_transformers_checkpoint_keys(tuner: type) -> None:
    """Give ``tuner`` checkpoint keys that transformers' adapter loader reads too, unless it defines its own.

    A checkpoint key is a model key with the adapter name dropped (``q_proj.lora_A.default.weight`` ->
    ``q_proj.lora_A.weight``). PEFT's default drops it only from the last two components, so a module nested
    in an adapter's container keeps it (``lora_gate.default.proj.weight``: DISeL's bottleneck projection;
    ``lora_memory.default.query.weight``: Queryable's query map). transformers' ``load_adapter`` (and
    ``from_pretrained(ADAPTER_DIR)``) inserts the adapter name right after the ``lora_*`` component instead,
    so it would look for ``lora_gate.default.default.proj.weight``, miss it and leave that module at its
    random init. Here the name is dropped right after the ``lora_*`` component at any depth, the convention
    both loaders then agree on (PEFT's loader inverts this same function). Keys without a nested module are
    unchanged; an adapter saved before, with ``default`` inside nested keys, still loads with
    ``PeftModel.from_pretrained`` (PEFT passes unknown keys through, and they equal the model's), and loads in
    transformers once saved again.
    """
    if "_remove_adapter_name_from_key" in vars(tuner) or not hasattr(tuner, "_remove_adapter_name_from_key"):
        return  # the tuner has its own mapping, or a PEFT older than the hook
    peft_default = tuner._remove_adapter_name_from_key
    prefix = tuner.prefix

    def checkpoint_key(cls: type, key: str, adapter_name: str) -> str:
        parts = key.split(".")
        for i in range(len(parts) - 2):
            if parts[i].startswith(prefix) and parts[i + 1] == adapter_name:
                return ".".join(parts[: i + 1] + parts[i + 2 :])
        return peft_default(key, adapter_name)

    checkpoint_key.__doc__ = _use_transformers_checkpoint_keys.__doc__
    tuner._remove_adapter_name_from_key = classmethod(checkpoint_key)  # type: ignore[attr-defined]


class _RegisterAfterLoad(importlib.abc.Loader):
    """Runs PEFT's own loader, then registers disel's types."""

    def __init__(self, inner: importlib.abc.Loader):
        self.inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.inner.exec_module(module)
        for finder in [f for f in sys.meta_path if isinstance(f, _PeftImportHook)]:
            sys.meta_path.remove(finder)  # PEFT is loaded: the hook has done its work
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
    """Wraps the loader of PEFT's spec, on every lookup until PEFT is loaded: a lookup that only asks whether
    PEFT is installed (transformers' ``is_peft_available`` calls ``importlib.util.find_spec("peft")``) loads
    nothing, so the hook stays until the import that does."""

    def __init__(self) -> None:
        self._looking = False

    def find_spec(self, name, path, target=None):  # type: ignore[no-untyped-def]
        if name != "peft" or self._looking:
            return None
        self._looking = True  # the real finders locate PEFT; this one steps aside meanwhile
        try:
            spec = importlib.util.find_spec("peft")
        finally:
            self._looking = False
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
