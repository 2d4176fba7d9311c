"""Fine-tuning on a new site's slices: which slices are corrected, which guard it, and the card's fingerprints."""

from __future__ import annotations

import numpy as np
import pytest

from relsegcore import finetune as ft
from relsegcore.errors import InputError


def test_the_guard_leaves_out_neighbours_of_corrected_slices():
    cases = ["a"] * 10 + ["b"] * 3
    orders = [*range(10), *range(3)]
    corrected = np.zeros(13, bool)
    corrected[5] = True  # a, order 5

    guard = ft.guard_candidates(cases, orders, corrected)

    assert [(cases[i], orders[i]) for i in guard] == [
        ("a", 0), ("a", 1), ("a", 2),  # 3 or more away: in
        ("a", 8), ("a", 9),  # a/3, a/4, a/6, a/7 are 1-2 away: out
        ("b", 0), ("b", 1), ("b", 2),  # another case: all in
    ]


def test_the_guard_needs_a_gap_from_every_corrected_slice_of_the_case():
    corrected = np.zeros(12, bool)
    corrected[[2, 9]] = True
    guard = ft.guard_candidates(["a"] * 12, range(12), corrected)
    assert guard.tolist() == [5, 6]  # 0 and 11 are 2 away from one of them; 5 and 6 are 3 from both


def test_another_series_of_a_corrected_patient_is_no_guard():
    cases = ["p1_s1", "p1_s1", "p1_s1", "p1_s1", "p1_s2", "p2"]
    patients = ["p1", "p1", "p1", "p1", "p1", "p2"]
    corrected = np.array([True, False, False, False, False, False])

    guard = ft.guard_candidates(cases, [0, 1, 2, 3, 0, 0], corrected, patients)

    assert guard.tolist() == [3, 5]  # p1_s2 has no order to compare with p1_s1: out


def test_corrections_and_guard_caps_the_guard_evenly_and_falls_back_to_whole_patients():
    cases = ["a"] * 4 + ["b"] * 100 + ["c"] * 100
    corrected = np.array([c == "a" for c in cases])
    trained, guard = ft.corrections_and_guard(cases, [*range(4), *range(100), *range(100)], corrected, limit=10)
    assert trained.tolist() == [0, 1, 2, 3]
    assert len(guard) == 10 and len(set(guard.tolist())) == 10
    assert {cases[i] for i in guard} == {"b", "c"} and not corrected[guard].any()

    every = ["p1_s1"] * 3 + ["p1_s2"] * 3 + ["p2"] * 3
    patients = [c.split("_")[0] for c in every]
    for seed in range(4):  # every slice corrected: whole patients held out, both series of p1 together
        trained, guard = ft.corrections_and_guard(every, [0, 1, 2] * 3, np.ones(9, bool), patients, seed=seed)
        held = {patients[i] for i in guard}
        assert len(held) == 1 and not held & {patients[i] for i in trained}
        assert sorted([*trained, *guard]) == list(range(9))
    with pytest.raises(InputError, match="no corrected slice"):
        ft.corrections_and_guard(["a"], [0], np.zeros(1, bool))
