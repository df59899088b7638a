"""The paper's configs ship inside the package and are found by name from any directory."""

from __future__ import annotations

import pytest

from disel.errors import UserError
from disel.training.config import load_config, resolve_config_path, shipped_configs


def test_shipped_configs_are_package_data_and_found_by_name(tmp_path, monkeypatch):
    names = shipped_configs()
    assert {"llama2-7b-metamathqa", "mistral-7b-magicoder", "roberta-base-glue", "demo-arith-sweep"} <= set(
        names
    )
    assert all("disel/configs" in str(p).replace("\\", "/") for p in names.values())
    monkeypatch.chdir(tmp_path)  # nowhere near the checkout
    for spelling in (
        "llama2-7b-metamathqa",
        "llama2-7b-metamathqa.yaml",
        "configs/llama2-7b-metamathqa.yaml",
    ):
        assert resolve_config_path(spelling) == names["llama2-7b-metamathqa"]
    assert load_config("roberta-base-glue").method.name == "disel"
    (tmp_path / "mine.yaml").write_text("model: {name: m}\ndata: {train: x}\n")
    assert resolve_config_path("mine.yaml").name == "mine.yaml"  # a real file wins


def test_unknown_config_name_lists_the_shipped_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"'llama-7b' does not exist.*llama2-7b-metamathqa"):
        resolve_config_path("llama-7b")
