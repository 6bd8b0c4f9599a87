"""Row discipline: hashed, disjoint, deterministic splits of hh-rlhf rows and the overlap check."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from mahals.data import load_hh_rlhf, parse_hh_rlhf_rows
from mahals.data.splits import (
    SPLIT_NAMES,
    RowOverlapError,
    RowSplits,
    assert_disjoint,
    load_row_splits,
    row_hash,
    rows_sha256,
    split_rows,
)

HARMLESS_TEST = (
    Path(__file__).resolve().parents[1].parent / "shared/data/hh-rlhf/harmless-base/test.jsonl.gz"
)
needs_data = pytest.mark.skipif(
    not HARMLESS_TEST.is_file(), reason=f"hh-rlhf copy not found at {HARMLESS_TEST}"
)


def conversation(prompt: str, chosen: str, rejected: str) -> dict[str, str]:
    return {
        "chosen": f"\n\nHuman: {prompt}\n\nAssistant: {chosen}",
        "rejected": f"\n\nHuman: {prompt}\n\nAssistant: {rejected}",
    }


@pytest.fixture(scope="module")
def harmless():
    return load_hh_rlhf(HARMLESS_TEST, verbose=False)


def test_row_hash_is_sha256_of_the_canonical_content():
    pair = parse_hh_rlhf_rows([conversation("hi there", "hello", "go away")])[0]
    canonical = json.dumps(
        {"chosen": "hello", "prompt": [["user", "hi there"]], "rejected": "go away"},
        separators=(",", ":"),
    )
    assert row_hash(pair) == hashlib.sha256(canonical.encode()).hexdigest()
    swapped = parse_hh_rlhf_rows([conversation("hi there", "go away", "hello")])[0]
    assert row_hash(swapped) != row_hash(pair)


@needs_data
def test_splits_are_disjoint_cover_every_row_and_follow_the_fractions(harmless):
    splits = split_rows(harmless, seed=0)
    assert splits.names == SPLIT_NAMES
    all_hashes = [h for name in SPLIT_NAMES for h in splits.hashes[name]]
    assert len(all_hashes) == len(set(all_hashes)) == splits.n_distinct
    assert set(all_hashes) == {row_hash(pair) for pair in harmless}
    sizes = {name: len(splits.hashes[name]) for name in SPLIT_NAMES}
    assert abs(sizes["dpo_train"] - 0.5 * splits.n_distinct) <= 1
    assert abs(sizes["evaluation"] - 0.25 * splits.n_distinct) <= 1


@needs_data
def test_splits_depend_on_seed_and_content_only(harmless):
    first = split_rows(harmless, seed=3)
    again = split_rows(list(reversed(harmless.pairs)), seed=3)
    assert first.hashes == again.hashes
    other = split_rows(harmless, seed=4)
    assert set(other.hashes["evaluation"]) != set(first.hashes["evaluation"])


def test_duplicate_rows_count_once_and_stay_in_one_split():
    rows = [conversation(f"question {i}", f"answer {i}", f"rude {i}") for i in range(40)]
    rows += rows[:10]  # ten conversations repeated
    dataset = parse_hh_rlhf_rows(rows)
    splits = split_rows(dataset, {"a": 0.5, "b": 0.5}, seed=1)
    assert (splits.n_rows, splits.n_distinct) == (50, 40)
    assert set(splits.hashes["a"]).isdisjoint(splits.hashes["b"])
    selected = splits.select(dataset, "a") + splits.select(dataset, "b")
    assert len(selected) == 40


def test_bad_fractions_and_overlapping_splits_are_refused():
    dataset = parse_hh_rlhf_rows([conversation(f"q{i}", "a", "b") for i in range(4)])
    with pytest.raises(ValueError, match="sum to 1"):
        split_rows(dataset, {"a": 0.5, "b": 0.4})
    with pytest.raises(RowOverlapError, match="both split"):
        RowSplits({"a": ("x", "y"), "b": ("y",)}, 0, {"a": 0.5, "b": 0.5}, "t", 3, 2)


def test_assert_disjoint_names_the_overlap_count():
    dataset = parse_hh_rlhf_rows([conversation(f"q{i}", "a", "b") for i in range(10)])
    forbidden = {row_hash(dataset[i]) for i in (2, 5, 7)}
    assert_disjoint([dataset[i] for i in (0, 1, 3)], forbidden, what="evaluation")
    with pytest.raises(RowOverlapError, match=r"Phase 2\.2 evaluation: 3 of 10 rows"):
        assert_disjoint(dataset, forbidden, what="Phase 2.2 evaluation")
    with pytest.raises(RowOverlapError, match="1 of 2 rows"):
        assert_disjoint([row_hash(dataset[5]), row_hash(dataset[0])], forbidden, what="x")


def test_save_load_round_trip_and_rows_sha256(tmp_path):
    dataset = parse_hh_rlhf_rows([conversation(f"q{i}", "a", "b") for i in range(12)])
    splits = split_rows(dataset, seed=7)
    loaded = load_row_splits(splits.save(tmp_path / "splits.json"))
    assert loaded == splits
    assert loaded.all_except("evaluation") == loaded.split_of("dpo_train") | loaded.split_of(
        "vector_extraction"
    )
    lines = "".join(row_hash(pair) + "\n" for pair in dataset)
    assert rows_sha256(dataset) == hashlib.sha256(lines.encode()).hexdigest()
    with pytest.raises(KeyError, match="no split 'test'"):
        loaded.split_of("test")
