"""Task metrics against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from capscale.tasks import get_task
from capscale.tasks.metrics import accuracy, f1, matthews, pearson, spearman

BIN_PRED = np.array([1, 1, 0, 1, 0, 0])
BIN_GOLD = np.array([1, 0, 0, 1, 1, 0])  # TP 2, TN 2, FP 1, FN 1


def test_accuracy():
    assert accuracy(np.array([0, 1, 1, 0, 2]), np.array([0, 1, 0, 0, 2])) == 0.8


def test_f1_binary_and_macro():
    assert f1(BIN_PRED, BIN_GOLD, 2) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    # class 0: F1 1; class 1: tp 1 fp 1 fn 1 -> 0.5; class 2: the same -> 0.5
    pred, gold = np.array([0, 1, 2, 2, 1, 0]), np.array([0, 1, 1, 2, 2, 0])
    assert f1(pred, gold, 3) == pytest.approx((1 + 0.5 + 0.5) / 3)


def test_matthews_binary_and_multiclass():
    # (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (4 - 1) / 9
    assert matthews(BIN_PRED, BIN_GOLD, 2) == pytest.approx(1 / 3)
    # R_K: gold and predicted counts [2, 2, 2], 4 of 6 right: (4*6 - 12) / (36 - 12)
    pred, gold = np.array([0, 1, 2, 2, 1, 0]), np.array([0, 1, 1, 2, 2, 0])
    assert matthews(pred, gold, 3) == pytest.approx(0.5)
    assert matthews(gold, gold, 3) == pytest.approx(1.0)
    assert matthews(np.zeros(4, dtype=int), np.array([0, 1, 0, 1]), 2) == 0.0  # undefined


def test_pearson_and_spearman_with_ties():
    x, y = np.array([1.0, 2, 3, 4]), np.array([2.0, 4, 5, 9])
    assert pearson(x, y) == pytest.approx(11 / math.sqrt(5 * 26))
    # average ranks: x -> [0, 1.5, 1.5, 3], y -> [0, 1, 2.5, 2.5]; pearson of the ranks
    assert spearman(np.array([1.0, 2, 2, 3]), np.array([10.0, 20, 30, 30])) == \
        pytest.approx(3.75 / 4.5)
    assert spearman(x, y) == pytest.approx(1.0)
    assert pearson(np.ones(4), y) == 0.0


def test_task_metrics():
    logits = np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0], [5.0, 1.0],
                       [1.0, 2.0]])
    # argmax [0, 1, 0, 1, 0, 1]: 2 right
    got = get_task("classification").metrics(logits, BIN_GOLD, 2)
    assert got["accuracy"] == pytest.approx(2 / 6)
    assert set(got) == {"accuracy", "f1", "matthews"}
    reg = get_task("regression").metrics(np.array([[1.0], [2.0], [3.0], [4.0]]),
                                        np.array([2.0, 4, 5, 9]), 1)
    assert reg["pearson"] == pytest.approx(11 / math.sqrt(130)) and reg["spearman"] == 1.0
