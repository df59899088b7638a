"""Bad input ends in exit code 2 with one sentence naming the bad value and the fix, and leaves nothing behind:
data files that are not UTF-8, broken adapters (truncated weights, a garbage adapter_config.json, a base of
another width) in `disel eval`, `disel gates` and `disel compact`."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from disel.cli import main
from disel.data.sources import load_items, read_rows, read_texts
from disel.errors import UserError
from disel.testing import tiny_model
from disel.testing_tokenizers import tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def one_sentence(msg: str) -> str:
    """The message without the CLI's prefix, checked to be one sentence."""
    msg = msg.strip()
    assert "\n" not in msg, msg
    msg = re.sub(r"^disel [a-z-]+: error: ", "", msg)
    assert msg.endswith("."), msg
    assert not re.search(r"[.!?]\s+[A-Z]", msg[:-1]), f"more than one sentence: {msg}"
    return msg


def cli_error(capsys, argv: list[str]) -> str:
    """Run the CLI, expect exit 2 and one error line (progress bars aside) of one sentence."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if re.match(r"disel [a-z-]+: error: ", ln)]
    assert len(lines) == 1, err
    return one_sentence(lines[0])


def listing(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*")}


# -- data files that are not UTF-8 ------------------------------------------------------------------


def test_non_utf8_data_files_name_file_and_line(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    csv = tmp_path / "d.csv"
    csv.write_bytes(b"text,label\nok,1\nna\xefve,0\n")
    js = tmp_path / "d.json"
    js.write_bytes(b'[\n{"text": "a"},\n{"text": "\xff"}\n]\n')
    txt = tmp_path / "d.txt"
    txt.write_bytes(b"first paragraph\n\nsecond \x92 one\n")
    cases = [
        (lambda: read_rows(str(jsonl)), f"{jsonl}:2"),
        (lambda: read_rows(str(csv)), f"{csv}:3"),
        (lambda: read_rows(str(js)), f"{js}:3"),
        (lambda: load_items(str(jsonl)), f"{jsonl}:2"),
        (lambda: load_items(str(txt)), f"{txt}:3"),
        (lambda: read_texts(str(txt), 5), f"{txt}:3"),
        (lambda: read_texts(str(jsonl), 5), f"{jsonl}:2"),
    ]
    for call, where in cases:
        with pytest.raises(UserError) as e:
            call()
        msg = one_sentence(str(e.value))
        assert msg.startswith(where + " ") and "not UTF-8" in msg and "re-encode the file as UTF-8" in msg
    # a byte-order mark is not an error
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b'\xef\xbb\xbf{"text": "x"}\n')
    assert read_rows(str(bom))[0].data == {"text": "x"}


def test_non_utf8_target_data_fails_before_anything_is_written(tmp_path, capsys):
    bad = tmp_path / "qa.jsonl"
    bad.write_bytes(b'{"prompt": "1+1=", "answer": "2"}\n{"prompt": "\xe9", "answer": "3"}\n')
    store = tmp_path / "store"
    msg = cli_error(
        capsys,
        [
            "eval",
            "gpt2-never-loaded",
            "--target",
            "exact_match",
            "--target-path",
            str(bad),
            "--store",
            str(store),
        ],
    )
    assert msg.startswith(f"{bad}:2 holds the byte 0xe9") and "re-encode" in msg
    assert not store.exists()


# -- broken adapters --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny base, a base of another width, and a DISeL adapter of the first (base path recorded)."""
    import peft

    import disel

    root = tmp_path_factory.mktemp("models")
    tok = tiny_tokenizer(128)
    for name, width in (("base", 32), ("wide", 48)):
        tiny_model("llama", vocab_size=128, hidden_size=width).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    pm = peft.get_peft_model(
        tiny_model("llama", vocab_size=128), disel.DiselConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    pm.peft_config["default"].base_model_name_or_path = str(root / "base")
    pm.save_pretrained(root / "adapter")
    data = root / "data.txt"
    data.write_text("def add(a, b):\n    return a + b\n\nprint('hello world')\n", encoding="utf-8")
    return root


def _break(adapter: Path, how: str, models: Path) -> str:
    """Break a copy of the adapter; returns the file the message must name."""
    cfg_path = adapter / "adapter_config.json"
    weights = adapter / "adapter_model.safetensors"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        return str(weights)
    if how == "not-json":
        cfg_path.write_text("{peft_type: DISEL", encoding="utf-8")
    elif how == "not-mapping":
        cfg_path.write_text("[1, 2]", encoding="utf-8")
    elif how == "unknown-type":
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        cfg["peft_type"] = "NO_SUCH_TYPE"
        cfg_path.write_text(json.dumps(cfg), encoding="utf-8")
    elif how == "other-width":
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        cfg["base_model_name_or_path"] = str(models / "wide")
        cfg_path.write_text(json.dumps(cfg), encoding="utf-8")
        return str(adapter)
    return str(cfg_path)


EXPECTED = {
    "truncated": r"is truncated or corrupt \(.+\): copy the adapter again, or save it anew with save_pretrained\.$",
    "not-json": r"is not valid JSON \(.+\): restore the adapter_config\.json that save_pretrained wrote",
    "not-mapping": r"holds a JSON list, not a mapping of adapter settings: restore the adapter_config\.json",
    "unknown-type": r"has peft_type 'NO_SUCH_TYPE', which no installed method knows: set it to the adapter's "
    r"PEFT type",
    "other-width": r"does not fit the base model .*wide \(model\.layers\.0\.self_attn\.q_proj\.lora_A\.default"
    r"\.weight is \[4, 32\] in the adapter but \[4, 48\] in the model, a base of another width\): ",
}


@pytest.mark.parametrize("how", list(EXPECTED))
@pytest.mark.parametrize("command", ["eval", "gates", "compact"])
def test_broken_adapter_is_one_sentence_and_leaves_nothing(tmp_path, capsys, models, how, command):
    adapter = tmp_path / "adapter"
    shutil.copytree(models / "adapter", adapter)
    named = _break(adapter, how, models)
    work = tmp_path / "work"
    work.mkdir()
    before = listing(tmp_path)
    data = str(models / "data.txt")
    argv = {
        "eval": ["eval", str(adapter), "--retention", "stdlib-ppl", "--limit", "1", "--store", str(work / "s")],
        "gates": ["gates", str(adapter), "--domain", f"code={data}", "--out", str(work / "gates")],
        "compact": [
            "compact", str(adapter), "--calibration", data, "--out", str(work / "compact"),
            "--timing-repeats", "0",
        ],
    }[command]  # fmt: skip
    msg = cli_error(capsys, argv)
    assert msg.startswith(named + " "), msg
    assert re.search(EXPECTED[how], msg), msg
    if how == "other-width":
        assert ("pass --base" in msg) if command != "eval" else ("set base_model_name_or_path" in msg)
    assert listing(tmp_path) == before  # no store, no output folder, no temporary files


def test_broken_checkpoint_of_a_run_dir_fails_before_anything_is_written(tmp_path, capsys, models):
    run = tmp_path / "runs" / "r1"
    shutil.copytree(models / "adapter", run / "checkpoint-1")
    shutil.copytree(models / "adapter", run / "final")
    (run / "run.json").write_text(
        json.dumps(
            {"run_id": "r1", "method": "disel", "rank": 4, "model": str(models / "base"), "config": {}}
        )
    )
    named = _break(run / "final", "truncated", models)
    before = listing(tmp_path)
    msg = cli_error(capsys, ["eval", str(run), "--retention", "stdlib-ppl", "--limit", "1"])
    assert msg.startswith(named + " is truncated or corrupt")
    assert listing(tmp_path) == before  # the run's store (runs/results.sqlite) was not created


def test_missing_inputs_leave_no_store_or_folder(tmp_path, capsys, models):
    store = tmp_path / "store"
    msg = cli_error(capsys, ["eval", str(tmp_path / "missing"), "--store", str(store)])
    assert "does not exist" in msg and not store.exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "\xff"}\n')
    out = tmp_path / "gates"
    msg = cli_error(capsys, ["gates", str(models / "adapter"), "--domain", f"x={bad}", "--out", str(out)])
    assert msg.startswith(f"{bad}:1 holds the byte 0xff") and not out.exists()
    out = tmp_path / "compact"
    argv = ["compact", str(models / "adapter"), "--calibration", str(bad), "--out", str(out)]
    msg = cli_error(capsys, argv)
    assert msg.startswith(f"{bad}:1 holds the byte 0xff") and not out.exists()


def test_gates_and_compact_write_their_folders_in_one_piece(tmp_path, models):
    data = str(models / "data.txt")
    out = tmp_path / "g"
    argv = [
        "gates",
        str(models / "adapter"),
        "--domain",
        f"a={data}",
        "--domain",
        f"b={data}",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    assert {"gates.json", "fig_domains.png", "fig_modules.png"} <= listing(out)
    (out / "mine.txt").write_text("kept")
    assert main(argv) == 0  # into an existing folder: its other files stay
    assert (out / "mine.txt").read_text() == "kept"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    merged = tmp_path / "m"
    argv = ["compact", str(models / "adapter"), "--calibration", data, "--out", str(merged), "--merge-static"]
    assert main([*argv, "--timing-repeats", "0"]) == 0
    assert (merged / "compaction.json").is_file() and (merged / "config.json").is_file()
    if (merged / "adapter").is_dir():  # the gated rest points at the merged base's final place
        cfg = json.loads((merged / "adapter" / "adapter_config.json").read_text())
        assert cfg["base_model_name_or_path"] == str(merged.resolve())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_queryable_and_disel_adapters_load_through_the_registration(tmp_path):
    import peft

    from disel.loading import load_model
    from disel.methods.queryable.config import QueryableConfig

    tok = tiny_tokenizer(128)
    base = tmp_path / "base"
    tiny_model("llama", vocab_size=128).save_pretrained(base)
    tok.save_pretrained(base)
    q = peft.get_peft_model(
        tiny_model("llama", vocab_size=128),
        QueryableConfig(r=4, target_modules=["q_proj"], num_atoms=3, top_k=1),
    )
    q.peft_config["default"].base_model_name_or_path = str(base)
    q.save_pretrained(tmp_path / "q")
    model, _, info = load_model(tmp_path / "q")
    assert info["method"] == "queryable" and info["rank"] == 4
    assert type(model.peft_config["default"]).__name__ == "QueryableConfig"
