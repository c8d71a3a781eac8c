"""The dev-set diagnostic benchmarks/stop_rule_ceiling.py: its rule evaluation on hand-made depth tables."""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
src = pytest.importorskip("stop_rule_ceiling")


def test_apply_rules_stops_at_the_first_confident_state():
    # 3 samples, T = 2: depth k = 0, 1, 2
    cor = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 1]], dtype=float)
    conf = np.array([[0.95, 0.5, 0.5], [0.6, 0.85, 0.9], [0.2, 0.3, 0.4]])
    fl = np.array([[1.0, 11.0, 21.0]] * 3)
    rules = np.array([[0.95, 0.85],  # ties stop (>=): 0, 1, 2 -> correct 1, 1, 1
                      [0.9, 0.8],    # stops: 0, 1, 2 -> 1, 1, 1
                      [1.01, 1.01],  # never stops early: 0, 1, 1
                      [0.5, 0.5]])   # stops: 0, 0, 2 -> 1, 0, 1
    acc, f = src.apply_rules(cor, conf, fl, rules)
    np.testing.assert_allclose(acc, [1.0, 1.0, 2 / 3, 2 / 3])
    np.testing.assert_allclose(f, [(1 + 11 + 21) / 3, (1 + 11 + 21) / 3, 21.0, (1 + 1 + 21) / 3])
    acc3, f3 = src.apply_rules(cor, conf, fl, rules, batch=3)  # rules split over two batches
    np.testing.assert_array_equal(acc3, acc)
    np.testing.assert_array_equal(f3, f)


def test_envelope_is_the_running_maximum_interpolated():
    f = np.array([3.0, 1.0, 2.0])
    a = np.array([0.6, 0.5, 0.7])  # at f = 3 the curve dips: the envelope keeps 0.7
    assert src.envelope(f, a, 1.5) == pytest.approx(0.6)
    assert src.envelope(f, a, 2.5) == pytest.approx(0.7)
    assert src.envelope(f, a, 0.5) == pytest.approx(0.5)
