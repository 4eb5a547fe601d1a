"""The embedded task: deterministic rows, a strict gold gap, and a gold function that does what it says."""

from __future__ import annotations

import pandas as pd
import pytest

from workflow.data import embedded_task as et
from workflow.data.chat import last_user_text
from workflow.data.embedded_task import generate_split, gold_prefers, gold_score

P = "Tell me about the garden."


def _texts(df: pd.DataFrame, column: str) -> list[str]:
    return [m[0]["content"] for m in df[column]]


def test_columns_and_messages(embedded_frames):
    df = embedded_frames["train"]
    assert list(df.columns) == ["prompt", "chosen", "rejected"]
    assert len(df) == 64 and len(embedded_frames["test"]) == 32
    for prompt, chosen, rejected in df.itertuples(index=False):
        assert [m["role"] for m in prompt] == ["user"]
        assert [m["role"] for m in chosen] == ["assistant"] == [m["role"] for m in rejected]


def test_deterministic_per_seed_and_split():
    a, b = generate_split("train", 40, 3), generate_split("train", 40, 3)
    pd.testing.assert_frame_equal(a, b)
    assert _texts(a, "chosen") != _texts(generate_split("train", 40, 4), "chosen")
    test = generate_split("test", 40, 3)
    assert _texts(a, "chosen") != _texts(test, "chosen")
    # the first rows of a longer split are the same rows
    assert _texts(generate_split("train", 80, 3), "chosen")[:40] == _texts(a, "chosen")


def test_chosen_strictly_better_in_every_row():
    df = generate_split("train", 500, 0)
    for prompt, chosen, rejected in df.itertuples(index=False):
        p, c, r = last_user_text(prompt), chosen[0]["content"], rejected[0]["content"]
        assert gold_score(p, c) - gold_score(p, r) >= et.MIN_GAP
        assert gold_prefers(p, c, r) == 0 and gold_prefers(p, r, c) == 1


def test_chosen_is_imperfect_and_in_the_middle():
    df = generate_split("train", 500, 0)
    scores = [gold_score(last_user_text(p), c[0]["content"]) for p, c in zip(df["prompt"], df["chosen"])]
    mean = sum(scores) / len(scores)
    assert 0.4 < mean < 0.8  # room for RL to improve towards 1.0
    assert sum(s >= 1.0 for s in scores) < 0.3 * len(scores)


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("The garden is lovely and bright.", 1.0),  # optimum
        ("The garden is big and old.", 0.5),  # on topic, neutral
        ("The garden is dull and ugly.", 0.0),  # on topic, negative
        ("The river is lovely and bright.", 0.5),  # off topic
        ("the garden is lovely and bright", 0.75),  # two form flaws
    ],
)
def test_gold_score_handcrafted(answer, expected):
    assert gold_score(P, answer) == pytest.approx(expected)


def test_gold_score_ordering_and_bounds():
    good = gold_score(P, "The garden is lovely and calm.")
    mixed = gold_score(P, "The garden is lovely and dull.")
    off = gold_score(P, "The city is lovely and calm.")
    bad = gold_score(P, "the city is dull dull dull")
    assert good > mixed > bad and good > off > bad
    assert gold_score(P, "the city " + "awful " * 20) == -1.0  # off topic, negative, every form check failed
    for answer in ["", "!!!", "x" * 500, "The garden is " + "lovely " * 200 + ".", "garden " * 50]:
        assert -1.0 <= gold_score(P, answer) <= 1.0


def test_gold_cannot_be_gamed_by_repetition_or_length():
    base = gold_score(P, "The garden is lovely and bright.")
    assert gold_score(P, "The garden is lovely lovely lovely and bright.") < base
    long = "The garden is " + ", ".join(et.POSITIVE) + "."
    assert gold_score(P, long) < base


def test_gold_prefers_tie_break():
    a, b = "The garden is lovely.", "The garden is bright and lovely."
    assert gold_score(P, a) == gold_score(P, b)
    assert gold_prefers(P, a, b) == 0 and gold_prefers(P, b, a) == 1  # shorter wins
    assert gold_prefers(P, a, a) == 0
    c, d = "The garden is calm.", "The garden is kind."
    assert gold_prefers(P, c, d) == 0 and gold_prefers(P, d, c) == 1  # then lexicographic


def test_split_parquet_round_trip(embedded_parquet, embedded_frames):
    df = pd.read_parquet(embedded_parquet["test"])
    assert _texts(df, "chosen") == _texts(embedded_frames["test"], "chosen")
    assert [list(p)[0]["content"] for p in df["prompt"]] == [p[0]["content"] for p in embedded_frames["test"]["prompt"]]
