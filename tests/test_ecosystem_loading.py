"""A saved DISeL / Queryable adapter loads wherever a PEFT adapter loads, with the same outputs.

transformers' ``AutoModelForCausalLM.from_pretrained(ADAPTER_DIR)`` and ``model.load_adapter(ADAPTER_DIR)``
(after ``import disel``, also in a fresh process where transformers imports PEFT itself), lm-eval's command
line through ``disel lm-eval`` (the score equals lm-eval's ``simple_evaluate`` on the model
``disel.loading.load_model`` loads),
PeftMixedModel refused in one sentence, a plain PEFT process (no disel) told by the adapter's files what to
install, and the model card every save writes.
"""

from __future__ import annotations

import copy
import json
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import PeftConfig, PeftMixedModel, PeftModel, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import disel
from disel.loading import load_model
from disel.methods import peft_registration
from disel.methods.model_card import BEGIN, END, write_model_card
from disel.methods.queryable import QueryableConfig
from disel.methods.registry import option_fields
from disel.testing import tiny_model
from disel.testing_tokenizers import tiny_tokenizer

ATOL = 1e-5
IDS = torch.randint(3, 120, (2, 9), generator=torch.Generator().manual_seed(1))


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-zero U and spread gate biases, so the adapter changes the output and every gate matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif "lora_gate" in name:  # bias, weight and bottleneck projection
                p.copy_(torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """A tiny base (with tokenizer) and DISeL and Queryable adapters on it, each saved once."""
    root = tmp_path_factory.mktemp("eco")
    base_dir = root / "base"
    tiny_model("llama", layers=2).save_pretrained(base_dir)
    tiny_tokenizer(128).save_pretrained(base_dir)
    out = {"base": base_dir}
    configs = {
        "disel": disel.DiselConfig(r=4, lora_alpha=8, target_modules="all-linear", gate_bias_init=-1.0),
        # a gate with a bottleneck projection (and Queryable's atom memory): modules nested in containers
        "bottleneck": disel.DiselConfig(r=4, lora_alpha=8, target_modules="all-linear", gate_bottleneck=3),
        "queryable": QueryableConfig(
            r=4, lora_alpha=8, target_modules="all-linear", num_atoms=4, top_k=2, block_size=1
        ),
    }
    for name, cfg in configs.items():
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), cfg)
        _randomize(model)
        model.save_pretrained(root / name)
        out[name] = root / name
    return out


def _logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _reference(saved: dict[str, Path], kind: str) -> torch.Tensor:
    base = AutoModelForCausalLM.from_pretrained(saved["base"])
    return _logits(PeftModel.from_pretrained(base, str(saved[kind])))


@pytest.fixture(scope="module")
def base_logits(saved) -> torch.Tensor:
    return _logits(AutoModelForCausalLM.from_pretrained(saved["base"]))


# -- the peft_type -----------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg_cls,name", [(disel.DiselConfig, "DISEL"), (QueryableConfig, "QUERYABLE")])
def test_peft_type_behaves_like_a_peft_enum_member(cfg_cls, name):
    t = cfg_cls(r=4, target_modules=["q_proj"]).peft_type
    assert t == name and t.value == name and t.name == name and hash(t) == hash(name)
    assert type(t.value) is str and f"{t}" == name and t.lower() == name.lower()
    assert json.dumps({"peft_type": t}) == f'{{"peft_type": "{name}"}}'
    assert type(copy.deepcopy(t)) is type(t) and type(pickle.loads(pickle.dumps(t))) is type(t)
    assert PEFT_TYPE_TO_CONFIG_MAPPING[name] is cfg_cls  # a plain str, as read from adapter_config.json
    assert PEFT_TYPE_TO_TUNER_MAPPING[t] is PEFT_TYPE_TO_TUNER_MAPPING[name]
    # peft 0.21's register_peft_method takes only names of its own PeftType enum: the shim fell back
    assert peft_registration.REGISTERED_VIA[name] in ("register_peft_method", "mappings")


def test_saved_config_round_trips_and_carries_the_install_hint(saved):
    raw = json.loads((saved["disel"] / "adapter_config.json").read_text())
    assert raw["peft_type"] == "DISEL" and "pip install disel" in raw["requires"]
    assert "import disel" in raw["requires"]
    cfg = PeftConfig.from_pretrained(str(saved["disel"]))
    assert (
        isinstance(cfg, disel.DiselConfig) and cfg.peft_type.value == "DISEL" and cfg.gate_bias_init == -1.0
    )
    assert disel.DiselConfig(**cfg.to_dict()).to_dict() == cfg.to_dict()
    assert "requires" not in option_fields(disel.DiselConfig)  # not a method option
    assert "requires" not in option_fields(QueryableConfig)


# -- transformers ------------------------------------------------------------------------------------


KINDS = ["disel", "bottleneck", "queryable"]


@pytest.mark.parametrize("kind", KINDS)
def test_transformers_from_pretrained_adapter_dir(saved, base_logits, kind):
    ref = _reference(saved, kind)
    assert (ref - base_logits).abs().max() > 1e-3  # the adapter changes the output
    model = AutoModelForCausalLM.from_pretrained(saved[kind])
    got = _logits(model)
    assert (got - ref).abs().max() <= ATOL
    assert model.peft_config["default"].peft_type.value == ("QUERYABLE" if kind == "queryable" else "DISEL")


@pytest.mark.parametrize("kind", KINDS)
def test_transformers_load_adapter(saved, base_logits, kind):
    model = AutoModelForCausalLM.from_pretrained(saved["base"])
    model.load_adapter(str(saved[kind]))
    got = _logits(model)
    assert (got - _reference(saved, kind)).abs().max() <= ATOL
    assert (got - base_logits).abs().max() > 1e-3
    # (transformers 5.24's disable_adapters/enable_adapters ask for peft >= 0.22, unreleased at the time)


def test_nested_adapter_modules_saved_without_the_adapter_name(saved):
    """transformers' loader puts the adapter name right after the lora_* component: the saved keys match."""
    keys = set(load_file(saved["bottleneck"] / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_gate.proj.weight" in keys
    assert not any(".default" in k for k in keys)
    qkeys = set(load_file(saved["queryable"] / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_memory.query.weight" in qkeys
    assert not any(".default" in k for k in qkeys)


def test_adapter_saved_with_the_older_nested_keys_still_loads_with_peft(saved, tmp_path):
    """Before, PEFT's default kept ``default`` in nested keys (``lora_gate.default.proj.weight``)."""
    old = tmp_path / "old"
    shutil.copytree(saved["bottleneck"], old)
    sd = load_file(old / "adapter_model.safetensors")
    sd = {k.replace(".lora_gate.proj.", ".lora_gate.default.proj."): v for k, v in sd.items()}
    save_file(sd, old / "adapter_model.safetensors", metadata={"format": "pt"})
    base = AutoModelForCausalLM.from_pretrained(saved["base"])
    assert (
        _logits(PeftModel.from_pretrained(base, str(old))) - _reference(saved, "bottleneck")
    ).abs().max() <= ATOL


def test_disel_loading_equals_peft(saved):
    model, _tok, info = load_model(saved["disel"])
    assert info["method"] == "disel"
    assert (_logits(model) - _reference(saved, "disel")).abs().max() <= ATOL


def test_transformers_load_in_a_fresh_process_after_import_disel(saved, tmp_path):
    """``import disel`` alone (PEFT imported later, by transformers) is enough for transformers' loader."""
    out = tmp_path / "logits.pt"
    code = textwrap.dedent(
        f"""
        import sys, torch
        import disel
        assert "peft" not in sys.modules
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(saved["disel"])!r}).eval()
        with torch.no_grad():
            torch.save(model(input_ids=torch.load({str(tmp_path / "ids.pt")!r})).logits, {str(out)!r})
        """
    )
    torch.save(IDS, tmp_path / "ids.pt")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (torch.load(out) - _reference(saved, "disel")).abs().max() <= ATOL


def test_queryable_config_imported_first_registers_both_types():
    """Importing a method's config first (before disel, before PEFT) leaves no module half-initialised: the
    shim imports both configs, and what they share lives in disel.methods.model_card, no method package."""
    code = (
        "import disel.methods.queryable.config, peft; print(sorted(peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "'DISEL'" in r.stdout and "'QUERYABLE'" in r.stdout


# -- PeftMixedModel: refused in one sentence ----------------------------------------------------------


def test_peft_mixed_model_refuses_disel(saved):
    base = AutoModelForCausalLM.from_pretrained(saved["base"])
    with pytest.raises(ValueError, match=r"^Adapter of type DISEL is not supported for mixed models\.$"):
        PeftMixedModel.from_pretrained(base, str(saved["disel"]))
    cfg = disel.DiselConfig(r=2, target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"peft_type` 'DISEL' is not compatible with the `PeftMixedModel`"):
        get_peft_model(base, cfg, mixed=True)


# -- a process without disel ---------------------------------------------------------------------------


def test_plain_peft_without_disel_fails_and_the_adapter_says_why(saved):
    code = textwrap.dedent(
        f"""
        import sys
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        base = AutoModelForCausalLM.from_pretrained({str(saved["base"])!r})
        try:
            PeftModel.from_pretrained(base, {str(saved["disel"])!r})
        except KeyError as e:
            print("KeyError", repr(e.args[0]))
        assert not any(m == "disel" or m.startswith("disel.") for m in sys.modules)
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "KeyError 'DISEL'" in r.stdout  # the error docs/serving.md and the model card name
    card = (saved["disel"] / "README.md").read_text()
    assert "pip install disel" in card and "import disel" in card and "KeyError: 'DISEL'" in card


# -- the model card ---------------------------------------------------------------------------------------


def test_model_card_written_on_every_save(saved):
    card = (saved["disel"] / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: disel" in card
    assert f"base_model: {saved['base']}" in card and "pipeline_tag: text-generation" in card
    for text in (
        "import disel",
        "PeftModel.from_pretrained",
        "| method | `disel` (peft_type `DISEL`) |",
        "| rank r | `4` |",
        "| gate_bias_init | `-1.0` (gates start at sigmoid = 0.269) |",
        "| gate_lr_multiplier | `5.0` |",
        "| gate_bottleneck | none",
        "| static ranks | none",
        "`q_proj` x2",
        "disel lm-eval --model hf",
    ):
        assert text in card, text
    assert "[More Information Needed]" not in card  # PEFT's empty template replaced
    qcard = (saved["queryable"] / "README.md").read_text()
    assert "| method | `queryable` (peft_type `QUERYABLE`) |" in qcard and "| num_atoms | `4` |" in qcard


def test_model_card_recipe_kept_and_user_text_kept(saved, tmp_path):
    d = tmp_path / "adapter"
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(saved["base"]), str(saved["disel"])
    )
    model.save_pretrained(d)
    recipe = {"data": {"train": "alpaca.jsonl", "rows": 512}, "lr": 2e-4, "steps": 100, "targets": ("a", "b")}
    write_model_card(d, method="disel+lalora", recipe=recipe)
    card = (d / "README.md").read_text()
    assert "| method | `disel+lalora` (peft_type `DISEL`) |" in card
    assert "train: alpaca.jsonl" in card and "lr: 0.0002" in card and "- a" in card
    text = (d / "README.md").read_text().replace(END, END + "\n\nWritten by a person.\n")
    (d / "README.md").write_text(text)
    model.save_pretrained(d)  # a later save without a recipe: PEFT's card update, then disel's
    card = (d / "README.md").read_text()
    assert card.count(BEGIN) == 1 and "train: alpaca.jsonl" in card and "Written by a person." in card
    assert "| method | `disel` (peft_type `DISEL`) |" in card


# -- lm-eval through `disel lm-eval` ------------------------------------------------------------------------


def test_disel_lm_eval_cli_scores_the_adapter(saved, tmp_path, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from disel.cli import main

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from disel.evaluation.retention import write_rolling_likelihood_task

    tasks = tmp_path / "tasks"
    texts = ["def f(x):\n    return x + 1\n", "the quick brown fox jumps over the lazy dog", "import os, sys"]
    write_rolling_likelihood_task(tasks, "eco_tiny_ppl", [{"text": t} for t in texts])
    out = tmp_path / "out"
    rc = main(
        [
            "lm-eval",
            "--model",
            "hf",
            "--model_args",
            f"pretrained={saved['base']},peft={saved['disel']}",
            "--tasks",
            "eco_tiny_ppl",
            "--include_path",
            str(tasks),
            "--batch_size",
            "1",
            "--output_path",
            str(out),
        ]
    )
    assert rc == 0
    (results_file,) = out.rglob("results_*.json")
    cli = json.loads(results_file.read_text())["results"]["eco_tiny_ppl"]

    tm = TaskManager(include_path=str(tasks), include_defaults=False)

    def in_process(model, tok):
        res = simple_evaluate(
            model=HFLM(pretrained=model, tokenizer=tok, batch_size=1),
            tasks=["eco_tiny_ppl"],
            task_manager=tm,
            bootstrap_iters=0,
            verbosity="ERROR",
        )
        return res["results"]["eco_tiny_ppl"]

    model, tok, _ = load_model(saved["disel"])
    ref = in_process(model, tok)
    base, base_tok, _ = load_model(saved["base"])
    plain = in_process(base, base_tok)
    for key in ("bits_per_byte,none", "word_perplexity,none"):
        assert cli[key] == pytest.approx(ref[key], rel=1e-6), key
    assert abs(cli["bits_per_byte,none"] - plain["bits_per_byte,none"]) > 1e-3  # the adapter was applied


def test_disel_lm_eval_passes_lm_eval_subcommands_through(capsys):
    from disel.cli import main

    assert main(["lm-eval", "run", "--help"]) == 0
    assert "--model_args" in capsys.readouterr().out
