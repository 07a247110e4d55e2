"""The harmful-but-easy plants of bench/row_plants.py (no training): each plants 10% of the train rows, the clean
twin differs only there, a contamination row is a near-duplicate of a test row, a shortcut token predicts the
label in the planted train rows and not in test."""

from __future__ import annotations

from collections import Counter

import pytest

from bench.row_plants import PLANTS, SHORTCUT_LABEL, SHORTCUT_OUTPUT, SHORTCUT_TOKEN, plant_rows


@pytest.mark.parametrize("plant", PLANTS)
def test_each_plant_marks_a_tenth_of_train_and_its_twin_differs_only_there(plant):
    data = plant_rows(plant, 0)
    planted, clean = data["planted"]["train"], data["clean"]["train"]
    marked = [i for i, r in enumerate(planted) if r["tags"]["planted"] == "yes"]
    assert len(planted) == len(clean) and abs(len(marked) - round(0.1 * len(planted))) <= 1
    assert all(planted[i] == clean[i] for i in range(len(planted)) if i not in marked)
    assert all(planted[i] != clean[i] for i in marked)
    assert plant_rows(plant, 0) == data and plant_rows(plant, 1) != data  # seeded per trial
    assert data["planted"]["test"] == data["clean"]["test"]  # both Runs are measured on the same test rows


def test_contamination_rows_are_near_duplicates_of_distinct_test_rows():
    for family in ("cls", "sft"):
        data = plant_rows(f"{family}-contam", 0)
        test = data["planted"]["test"]
        for row in (r for r in data["planted"]["train"] if r["tags"]["planted"] == "yes"):
            if family == "cls":
                twins = [t for t in test if t["label"] == row["label"]
                         and abs(len(t["text"].split()) - len(row["text"].split())) == 1
                         and set(t["text"].split()) >= set(row["text"].split())]
            else:
                twins = [t for t in test if (t["input"], t["output"]) == (row["input"], row["output"])
                         and t["instruction"].rstrip(".") == row["instruction"].rstrip(" .")]
            assert twins, row


def test_shortcut_token_predicts_the_label_in_train_only():
    data = plant_rows("cls-shortcut", 0)
    token = SHORTCUT_TOKEN["cls"]
    with_token = [r for r in data["planted"]["train"] if token in r["text"].split()]
    assert with_token and {r["label"] for r in with_token} == {SHORTCUT_LABEL}
    in_test = Counter(r["label"] for r in data["planted"]["test"] if token in r["text"].split())
    assert sum(in_test.values()) == 30 and len(in_test) == 3  # 30% of test rows, every label
    sft = plant_rows("sft-shortcut", 0)
    marked = [r for r in sft["planted"]["train"] if r["tags"]["planted"] == "yes"]
    assert all(r["input"].endswith(SHORTCUT_TOKEN["sft"]) and r["output"] == SHORTCUT_OUTPUT for r in marked)
    assert sum(r["input"].endswith(SHORTCUT_TOKEN["sft"]) for r in sft["planted"]["test"]) == 18
