"""The code sandbox, HumanEval pass@1, target metrics and the tiny test tokenizer.

The hostile completions, isolation levels and signal handling have their own files: test_sandbox_*.py.
"""

from __future__ import annotations

import json
import math

import pytest

from disel.cli import main
from disel.errors import UserError
from disel.evaluation import sandbox
from disel.evaluation.humaneval import load_problems, score_completions
from disel.evaluation.sandbox import Task, run_program, run_programs
from disel.evaluation.targets import exact_match, gsm8k_correct, gsm8k_extract, matthews_corrcoef

LIMITS = {"timeout": 5.0, "memory_mb": 256}


def test_unjudged_program_reports_exit_and_output_but_never_passes():
    r = run_program("import sys\nprint('out')\nraise ValueError('boom')", **LIMITS)
    assert r.status == "exited" and r.returncode == 1 and not r.passed
    assert "boom" in r.stderr_tail and "out" in r.stdout_tail
    ok = run_program("print('done')", **LIMITS)
    assert ok.status == "exited" and ok.returncode == 0 and not ok.passed  # exit 0 proves nothing


def test_judged_task_passes_only_when_check_returns():
    tests = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
    good, bad, crash = run_programs(
        [
            Task("def add(a, b):\n    return a + b\n", tests, "add"),
            Task("def add(a, b):\n    return a - b\n", tests, "add"),
            Task("def add(a, b):\n    return 1 / 0\n", tests, "add"),
        ],
        **LIMITS,
    )
    assert good.passed and good.reason == "check returned"
    assert bad.status == "failed" and bad.reason.startswith("AssertionError at tests.py:2")
    assert crash.status == "failed" and "ZeroDivisionError" in crash.reason


def test_plain_data_codec_round_trips_and_rejects_the_rest():
    codec = sandbox._codec
    values = [
        None,
        True,
        False,
        0,
        -(10**5000),
        2**70,
        1.5,
        -0.0,
        float("inf"),
        complex(1, -2),
        "",
        "h\u00e9\U0001f600\ud800",
        b"\x00\xff",
        [1, [2, (3, "x")]],
        (),
        {"a": 1, 2: [3], (4, 5): None},
        {1, 2},
        frozenset({"z"}),
    ]
    for v in values:
        out: list[bytes] = []
        codec["_enc"](v, out)
        back = codec["_dec"](b"".join(out))
        assert back == v and type(back) is type(v), v
    nan: list[bytes] = []
    codec["_enc"](float("nan"), nan)
    assert math.isnan(codec["_dec"](b"".join(nan)))

    class Sneaky(int):
        def __eq__(self, other):
            return True

        __hash__ = int.__hash__

    out = []
    codec["_enc"](Sneaky(7), out)
    back = codec["_dec"](b"".join(out))
    assert type(back) is int and back == 7 and back != 8  # subclasses arrive as their plain value
    with pytest.raises(TypeError, match="not plain data"):
        codec["_enc"](object(), [])
    for bad in (b"", b"x", b"i\x00\x00\x00\x09ff", b"l\x00\x00\x00\x02n", b"nn", b"s\xff\xff\xff\xff"):
        with pytest.raises(ValueError):
            codec["_dec"](bad)


def test_humaneval_canonical_pass_and_trivial_fail():
    probs = load_problems(12)
    good = score_completions(
        [{"task_id": p["task_id"], "completion": p["canonical_solution"]} for p in probs]
    )
    assert good["pass@1"] == 1.0 and good["n"] == 12 and good["isolation"] in ("userns", "rootns")
    bad = score_completions([{"task_id": p["task_id"], "completion": "    pass\n"} for p in probs])
    assert bad["pass@1"] == 0.0


@pytest.mark.slow
def test_humaneval_all_164_canonical_solutions_pass():
    probs = load_problems()
    res = score_completions(
        [{"task_id": p["task_id"], "completion": p["canonical_solution"]} for p in probs], workers=2
    )
    assert res["n"] == 164
    assert {t: s for t, s in res["results"].items() if s != "passed"} == {}


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
    assert out["isolation"] in ("userns", "rootns")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task_id": "HumanEval/0"}\n')
    assert main(["eval-code", str(bad)]) == 2
    assert "completion" in capsys.readouterr().err
    assert main(["eval-code", str(samples), "--disk-mb", "0"]) == 2
    assert "--disk-mb >= 1" in capsys.readouterr().err


def test_bad_sandbox_arguments_are_user_errors():
    with pytest.raises(UserError, match="isolation 'chroot' is unknown"):
        run_program("pass", isolation="chroot")
    with pytest.raises(UserError, match="memory_mb >= 64"):
        run_program("pass", memory_mb=8)


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
