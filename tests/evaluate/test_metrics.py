"""Metric functions and statistics against hand-worked numbers."""

from __future__ import annotations

import math

import pytest

from finetrace.evaluate import metrics as M
from finetrace.evaluate import stats as S


def test_normalize_and_exact_match():
    assert M.normalize("  The Cat, sat!  ") == "cat sat"
    assert M.exact_match("The answer: Paris.", "answer paris") == 1.0
    assert M.exact_match("Paris", "London") == 0.0


@pytest.mark.parametrize(
    "text,label",
    [
        ("billing", "billing"),
        ("Billing.", "billing"),
        ("  BILLING  ", "billing"),
        ("Label: technical", "technical"),
        ("I think it is account related", "account"),
        ("billing issue, not technical", "billing issue"),
        ("technical, then billing", "technical"),
        ("xyz", None),
        ("", None),
        ("rebilling", None),
    ],
)
def test_parse_label(text, label):
    assert M.parse_label(text, ["billing", "technical", "account", "billing issue"]) == label


def test_accuracy_and_macro_f1_hand_worked():
    golds = ["a", "a", "a", "b", "b", "c"]
    preds = ["a", "a", "b", "b", None, "a"]
    assert M.accuracy(preds, golds) == pytest.approx(3 / 6)
    # a: tp2 fp1 fn1 -> 4/6; b: tp1 fp1 fn1 -> 2/4; c: tp0 -> 0
    assert M.macro_f1(preds, golds, ["a", "b", "c"]) == pytest.approx((4 / 6 + 2 / 4 + 0) / 3)
    assert M.macro_f1(["a", "b"], ["a", "b"]) == 1.0


def test_token_f1_and_rouge_l_hand_worked():
    # pred tokens: cat sat on mat (the removed); gold: cat lay on mat -> common 3; P=R=3/4
    assert M.token_f1("the cat sat on the mat", "a cat lay on the mat") == pytest.approx(0.75)
    assert M.token_f1("", "") == 1.0 and M.token_f1("x", "y") == 0.0
    # LCS("police killed gunman", "police kill gunman") = 2 -> P=R=2/3
    assert M.lcs_length("abcbdab", "bdcaba") == 4
    assert M.rouge_l("police killed the gunman", "the police kill the gunman") == pytest.approx(2 / 3)
    # order matters for ROUGE-L, not for token F1
    assert M.rouge_l("w x y z", "z y x w") == pytest.approx(0.25)
    assert M.token_f1("b c d e", "e d c b") == 1.0


def test_perplexity():
    assert M.perplexity(0.0, 5) == 1.0
    assert M.perplexity(10 * math.log(4), 10) == pytest.approx(4.0)


def test_scored_metric_on_subsets():
    s = M.Scored(
        ["billing", "Technical!", "no idea"], ["billing", "technical", "account"], ["billing", "technical", "account"]
    )
    assert s.preds == ["billing", "technical", None]
    assert s.metric("accuracy") == pytest.approx(2 / 3)
    assert s.metric("accuracy", [0, 0, 2]) == pytest.approx(2 / 3)
    assert s.metric("exact_match", [2]) == 0.0
    with pytest.raises(ValueError):
        M.Scored(["x"], ["y"]).metric("accuracy")


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    per = [1.0] * 30 + [0.0] * 10
    fn = lambda idx: sum(per[i] for i in idx) / len(idx)
    ci = S.bootstrap_ci(fn, len(per), samples=500, seed=7)
    assert ci == S.bootstrap_ci(fn, len(per), samples=500, seed=7)
    assert ci != S.bootstrap_ci(fn, len(per), samples=500, seed=8)
    assert ci[0] < 0.75 < ci[1] and 0.55 < ci[0] and ci[1] < 0.92
    const = lambda idx: 1.0
    assert S.bootstrap_ci(const, 10) == (1.0, 1.0)


def test_paired_bootstrap_and_mcnemar():
    a = [1.0] * 10 + [0.0] * 30
    b = [1.0] * 35 + [0.0] * 5
    fa = lambda idx: sum(a[i] for i in idx) / len(idx)
    fb = lambda idx: sum(b[i] for i in idx) / len(idx)
    res = S.paired_bootstrap(fa, fb, 40, samples=500, seed=0)
    assert res["delta"] == pytest.approx(25 / 40)
    assert res["p_value"] == pytest.approx(2 / 501) and res["ci"][0] > 0.4
    same = S.paired_bootstrap(fa, fa, 40, samples=200)
    assert same["delta"] == 0 and same["p_value"] == 1.0
    # b=1 (only A right), c=5 (only B right): p = 2 * (C(6,0) + C(6,1)) / 2^6 = 14/64
    ca = [True, False, False, False, False, False, True]
    cb = [False, True, True, True, True, True, True]
    m = S.mcnemar_exact(ca, cb)
    assert (m["b"], m["c"]) == (1, 5) and m["p_value"] == pytest.approx(14 / 64)
    assert S.mcnemar_exact([True], [True])["p_value"] == 1.0


def test_group_metrics_and_fairness_differences_hand_worked():
    golds = ["pos", "pos", "neg", "neg", "pos", "pos", "neg", "neg"]
    preds = ["pos", "pos", "pos", "neg", "pos", "neg", "neg", "neg"]
    groups = ["x", "x", "x", "x", "y", "y", "y", "y"]
    acc = lambda idx: M.accuracy([preds[i] for i in idx], [golds[i] for i in idx])
    bg = S.by_group(acc, groups)
    assert bg["groups"] == {"x": {"value": 0.75, "n": 4}, "y": {"value": 0.75, "n": 4}} and bg["gap"] == 0
    # selection rate of pos: x 3/4, y 1/4 -> 0.5 (fairlearn demographic_parity_difference, pos_label=pos)
    assert S.demographic_parity_difference(preds, golds, groups, positive="pos") == pytest.approx(0.5)
    # TPR: x 2/2, y 1/2 -> 0.5; FPR: x 1/2, y 0/2 -> 0.5; EOD = max = 0.5
    assert S.equalized_odds_difference(preds, golds, groups, positive="pos") == pytest.approx(0.5)
    # one-vs-rest over both classes gives the same here (binary, complementary)
    assert S.demographic_parity_difference(preds, golds, groups) == pytest.approx(0.5)
    assert S.demographic_parity_difference(preds, golds, ["x"] * 8) == 0.0
