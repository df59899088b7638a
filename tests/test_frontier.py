"""The frontier maths on synthetic paths: interpolation, matched accuracy, seed aggregation, the sentence."""

from __future__ import annotations

import math

import pytest

from disel.experiments import frontier


def test_retention_at_interpolates_on_the_first_crossing():
    path = [(0.0, 1.0), (0.4, 0.8), (0.8, 0.4), (0.6, 0.3), (1.0, 0.1)]
    assert frontier.retention_at(path, 0.2) == pytest.approx(0.9)
    assert frontier.retention_at(path, 0.4) == pytest.approx(0.8)  # exactly on a checkpoint
    assert frontier.retention_at(path, 0.6) == pytest.approx(0.6)  # first crossing (0.4->0.8), not the dip
    assert frontier.retention_at(path, 0.9) == pytest.approx(0.15)  # after the dip: 0.6 -> 1.0
    assert frontier.retention_at(path, 0.0) == pytest.approx(1.0)
    assert frontier.max_accuracy(path) == 1.0


def test_unreachable_accuracy_is_none_and_empty_paths_are_handled():
    assert frontier.retention_at([(0.0, 1.0), (0.5, 0.7)], 0.6) is None
    assert frontier.retention_at([], 0.1) is None
    with pytest.raises(ValueError):
        frontier.matched_accuracy([[]])


def test_matched_accuracy_is_the_largest_reached_by_all_unless_fixed():
    a = [(0.0, 1.0), (0.9, 0.5)]
    b = [(0.0, 1.0), (0.7, 0.8), (0.6, 0.8)]
    assert frontier.matched_accuracy([a, b]) == (0.7, "largest reached by all")
    assert frontier.matched_accuracy([a, b], target=0.5) == (0.5, "fixed")


def test_stats():
    st = frontier.stats([1.0, 2.0, 3.0])
    assert st == {"mean": 2.0, "std": 1.0, "min": 1.0, "max": 3.0, "n": 3}
    assert frontier.stats([4.0])["std"] == 0.0
    assert math.isnan(frontier.stats([])["mean"]) and frontier.stats([])["n"] == 0


def _paths():
    # base retention 1.0; both reach 0.6 on both seeds; at 0.6 lora keeps 0.4/0.5, disel 0.8/0.7
    return {
        "lora": {0: [(0.0, 1.0), (0.6, 0.4), (0.8, 0.2)], 1: [(0.0, 1.0), (0.3, 0.75), (0.9, 0.25)]},
        "disel": {0: [(0.0, 1.0), (0.6, 0.8)], 1: [(0.0, 1.0), (1.0, 0.5)]},
    }


def test_summarize_known_answer():
    s = frontier.summarize(_paths(), base_retention=1.0)
    assert s["accuracy"] == pytest.approx(0.6) and s["how"] == "largest reached by all"
    assert s["methods"]["lora"]["by_seed"] == {0: pytest.approx(0.4), 1: pytest.approx(0.5)}
    assert s["methods"]["disel"]["by_seed"] == {0: pytest.approx(0.8), 1: pytest.approx(0.7)}
    assert s["methods"]["disel"]["retention"]["mean"] == pytest.approx(0.75)
    assert s["methods"]["lora"]["loss"] == pytest.approx(0.55)
    v = s["versus"]["disel"]
    assert v["wins"] == 2 and v["paired"] == 2
    assert v["loss_ratio"] == pytest.approx(0.25 / 0.55)
    # the sentence is computed from these numbers: 1 - 0.25/0.55 = 55% less retention loss
    assert s["sentence"] == (
        "At matched accuracy 0.60 (largest reached by all), disel keeps retention 0.7500 (0.7000–0.8000) "
        "against lora's 0.4500 (0.4000–0.5000): 55% less retention loss (base − retention), higher on 2 of "
        "2 paired seeds."
    )


def test_summarize_fixed_accuracy_that_one_seed_never_reaches():
    s = frontier.summarize(_paths(), base_retention=1.0, target=0.85)
    assert s["how"] == "fixed"
    assert s["methods"]["lora"]["by_seed"][0] is None  # seed 0's lora tops out at 0.8
    assert s["methods"]["disel"]["by_seed"][0] is None
    assert s["methods"]["lora"]["retention"]["n"] == 1
    assert s["versus"]["disel"]["paired"] == 1
    assert "1 of 1 paired seed (of 2 run)" not in s["sentence"]  # each method reached it on one seed
    assert s["sentence"].endswith("higher on 1 of 1 paired seed.")
    nobody = frontier.summarize(_paths(), base_retention=1.0, target=0.99)
    assert nobody["methods"]["lora"]["retention"]["n"] == 0
    assert "never reach" in nobody["sentence"] and "no paired comparison" in nobody["sentence"]


def test_summarize_when_a_method_never_learns_is_degenerate():
    paths = {"lora": {0: [(0.0, 1.0), (0.5, 0.6)]}, "disel": {0: [(0.0, 1.0), (0.0, 0.99)]}}
    s = frontier.summarize(paths, base_retention=1.0)
    assert s["accuracy"] == 0.0 and s["degenerate"]
    assert "cannot be compared" in s["sentence"]


def test_sentence_says_more_when_the_other_method_forgets_more():
    paths = {"lora": {0: [(0.0, 1.0), (1.0, 0.8)]}, "dora": {0: [(0.0, 1.0), (1.0, 0.6)]}}
    s = frontier.summarize(paths, base_retention=1.0, target=0.5)
    assert "dora keeps retention 0.8000 against lora's 0.9000: 100% more retention loss" in s["sentence"]
    assert "higher on 0 of 1 paired seed" in s["sentence"]
