"""The code sandbox, HumanEval pass@1, target metrics and the tiny test tokenizer."""

from __future__ import annotations

import json
import os

import pytest

from disel.cli import main
from disel.evaluation.humaneval import load_problems, score_completions
from disel.evaluation.sandbox import run_program, run_programs
from disel.evaluation.targets import exact_match, gsm8k_correct, gsm8k_extract, matthews_corrcoef

LIMITS = {"timeout": 2.0, "memory_mb": 256}


def test_sandbox_contains_hostile_programs(tmp_path):
    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("keep me")
    hostile = {
        "hang": "while True:\n    pass\n",
        "fork": "import os\nwhile True:\n    try:\n        os.fork()\n    except Exception:\n        pass\n",
        "memory": "x = []\nwhile True:\n    x.append(bytearray(10**7))\n",
        "delete": f"import os, shutil\nos.remove({str(sentinel)!r})\nshutil.rmtree({str(tmp_path)!r})\n",
    }
    ok = "import os\nopen('scratch.txt', 'w').write('x')\nassert os.path.exists('scratch.txt')\nprint('done')\n"
    for guard in (True, False):  # the OS limits alone (guard=False) must contain them too
        names = list(hostile) + ["ok"]
        res = run_programs([*hostile.values(), ok], workers=2, guard=guard, **LIMITS)
        by = dict(zip(names, res))
        assert by["ok"].status == "passed" and "done" in by["ok"].stdout_tail
        assert by["hang"].status == "timeout"
        assert by["fork"].status in ("timeout", "failed")
        assert by["memory"].status == "failed" and "MemoryError" in by["memory"].stderr_tail
        assert by["delete"].status == "failed"
        assert sentinel.read_text() == "keep me"
    # no process of the fork bomb survives its group's kill
    out = os.popen("ps -eo pgid,args | grep -c 'disel-sandbox-' ").read().strip()
    assert int(out) <= 2  # the grep itself and its shell


def test_sandbox_failing_program_reports_stderr():
    r = run_program("raise ValueError('boom')", **LIMITS)
    assert r.status == "failed" and r.returncode == 1 and "boom" in r.stderr_tail


def test_humaneval_canonical_pass_and_trivial_fail():
    probs = load_problems(12)
    good = score_completions(
        [{"task_id": p["task_id"], "completion": p["canonical_solution"]} for p in probs]
    )
    assert good["pass@1"] == 1.0 and good["n"] == 12
    bad = score_completions([{"task_id": p["task_id"], "completion": "    pass\n"} for p in probs])
    assert bad["pass@1"] == 0.0


def test_eval_code_cli_json_output(tmp_path, capsys):
    probs = load_problems(4)
    samples = tmp_path / "s.jsonl"
    samples.write_text(
        "".join(
            json.dumps({"task_id": p["task_id"], "completion": p["canonical_solution"]}) + "\n"
            for p in probs[:3]
        )
        + json.dumps({"task_id": probs[3]["task_id"], "completion": "  return None\n"})
        + "\n"
    )
    assert main(["eval-code", str(samples), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 4 and out["passed"] == 3 and out["pass@1"] == pytest.approx(0.75)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task_id": "HumanEval/0"}\n')
    assert main(["eval-code", str(bad)]) == 2
    assert "completion" in capsys.readouterr().err


def test_gsm8k_strict_match_agrees_with_lm_eval():
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    ref = "Natalia sold 48/2 = 24 clips in May.\n48+24 = 72\n#### 72"
    gens = [
        " She sold 72.\n#### 72",
        " #### 72.",
        " #### 7,2",
        "The answer is 72",
        " #### -72",
        " #### $72",
        " #### 72\n#### 5",
        " ####72",
        " #### 72.0",
        " #### 1,000",
    ]
    filt = RegexFilter(regex_pattern=r"#### (\-?[0-9\.\,]+)", group_select=0)
    extracted = [x[0] for x in filt.apply([[g] for g in gens], [{}] * len(gens))]
    assert [gsm8k_extract(g) for g in gens] == extracted
    for g, e in zip(gens, extracted):
        lm = exact_match_hf_evaluate(
            [e], [ref], regexes_to_ignore=[",", "\\$", "(?s).*#### ", "\\.$"], ignore_case=True
        )
        assert gsm8k_correct(g, ref) == bool(lm["exact_match"]), g
    assert exact_match(gens[:3], [ref] * 3, extract="gsm8k") == pytest.approx(1.0)
    assert exact_match(["Paris ", "london"], ["Paris", "London"]) == 0.5
    assert exact_match(["Paris ", "london"], ["Paris", "London"], ignore_case=True) == 1.0


def test_matthews_corrcoef_known_values():
    assert matthews_corrcoef([1, 1, 0, 0], [1, 1, 0, 0]) == pytest.approx(1.0)
    assert matthews_corrcoef([1, 1, 0, 0], [0, 0, 1, 1]) == pytest.approx(-1.0)
    assert matthews_corrcoef([1, 0, 1, 0], [1, 1, 1, 1]) == 0.0
    # scikit-learn's value for this confusion (tp=3, tn=2, fp=1, fn=1): (6-1)/sqrt(4*3*4*3) = 5/12
    assert matthews_corrcoef([1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0, 1]) == pytest.approx(5 / 12)


def test_tiny_tokenizer_round_trip_and_save(tmp_path):
    from transformers import AutoTokenizer

    from disel.testing_tokenizers import tiny_tokenizer

    tok = tiny_tokenizer(128)
    assert len(tok) == 128
    text = 'def f(x):\n    """Square."""\n\treturn x ** 2  # ~`{}|'
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text and len(ids) < len(text)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.mask_token_id) == (0, 1, 2, 4)
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text)["input_ids"] == ids
    assert tiny_tokenizer(300)(text)["input_ids"] != ids
    with pytest.raises(ValueError, match="vocab_size"):
        tiny_tokenizer(50)
