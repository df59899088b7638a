"""What the package ships besides code: the small stdlib-pretrained demo model.

``disel:demo-model`` names it wherever a model name is read (``model.name`` of a training config,
``disel demo --model``); :func:`demo_model_dir` finds it inside the installed package (editable or wheel).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

DEMO_MODEL = "disel:demo-model"  # the alias of the shipped model wherever a model name is read


def demo_model_dir() -> Path:
    """The shipped model's directory inside the installed package (editable or wheel)."""
    path = Path(str(resources.files("disel") / "assets" / "demo_model"))
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"The demo model is missing at {path}: reinstall disel, or rebuild it with "
            "`python scripts/pretrain_demo_model.py`."
        )
    return path


def resolve_model_name(name: str) -> str:
    """``disel:demo-model`` -> the shipped model's directory; any other name unchanged."""
    return str(demo_model_dir()) if name == DEMO_MODEL else name


def load_demo_model(path: str | Path | None = None) -> tuple[Any, Any]:
    """(causal LM in eval mode, tokenizer) of the shipped model, or of another local model directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path) if path is not None else demo_model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)
    model.eval()
    return model, tok
