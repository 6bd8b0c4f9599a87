"""Safety prompt sets: loaders, validation errors, stratified sampling (local files only)."""

from __future__ import annotations

import csv
import json
import sys
import types
import warnings
from collections import Counter
from pathlib import Path

import pytest

from mahals.data import (
    XSTEST_CONTRAST_GROUPS,
    SafetyDataError,
    SafetyDataset,
    load_litmus,
    load_xstest,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
XSTEST_CSV = SHARED_DATA / "xstest" / "xstest_prompts.csv"

needs_xstest = pytest.mark.skipif(
    not XSTEST_CSV.is_file(), reason=f"XSTest copy not found at {XSTEST_CSV}"
)


def litmus_rows(cells: dict[tuple[str, str], int]) -> list[dict[str, str]]:
    """LITMUS-shaped records, ``count`` rows per (axiom, label) cell, cells interleaved."""
    rows = []
    for (axiom, label), count in cells.items():
        rows += [
            {"input": f"{axiom} {label} prompt {i}", "axiom": axiom, "safety_label": label}
            for i in range(count)
        ]
    return sorted(rows, key=lambda row: row["input"][::-1])  # mix cells in source order


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def dataset_from_cells(cells: dict[tuple[str, str], int]) -> SafetyDataset:
    return SafetyDataset.from_rows(
        litmus_rows(cells), columns={"text": "input", "label": "safety_label"}
    )


# --- XSTest, the real file ---------------------------------------------------------------


@needs_xstest
def test_xstest_loads_all_rows_with_contrast_grouping():
    with XSTEST_CSV.open(newline="", encoding="utf-8") as handle:
        raw = list(csv.DictReader(handle))
    dataset = load_xstest(XSTEST_CSV)

    assert len(dataset) == len(raw) == 450
    assert dataset.texts == tuple(row["prompt"] for row in raw)
    assert dataset.labels == tuple(row["label"] for row in raw)
    # every unsafe type is a contrast type and every contrast type is unsafe
    assert {row["type"] for row in raw if row["label"] == "unsafe"} == {
        row["type"] for row in raw if row["type"].startswith("contrast_")
    }
    # the grouping puts each contrast type with the safe types it mirrors
    for contrast in (t for t in XSTEST_CONTRAST_GROUPS if t.startswith("contrast_")):
        mirrored = contrast.removeprefix("contrast_")
        if mirrored in XSTEST_CONTRAST_GROUPS:
            assert XSTEST_CONTRAST_GROUPS[contrast] == XSTEST_CONTRAST_GROUPS[mirrored]
    expected = Counter((XSTEST_CONTRAST_GROUPS[row["type"]], row["label"]) for row in raw)
    assert dataset.cells() == dict(sorted(expected.items()))
    assert dataset.cells()[("discrimination", "safe")] == 50
    assert dataset.cells()[("privacy", "unsafe")] == 25
    assert len(dataset.categories) == 8
    assert Counter(dataset.labels) == {"safe": 250, "unsafe": 200}


@needs_xstest
def test_xstest_raw_types_are_one_class_and_rejected():
    identity = {t: t for t in XSTEST_CONTRAST_GROUPS}
    with pytest.raises(SafetyDataError, match=r"\('homonyms', 'unsafe'\)"):
        load_xstest(XSTEST_CSV, type_to_axiom=identity)


@needs_xstest
def test_xstest_unmapped_type_is_named():
    partial = {t: a for t, a in XSTEST_CONTRAST_GROUPS.items() if t != "privacy_public"}
    with pytest.raises(SafetyDataError, match="privacy_public"):
        load_xstest(XSTEST_CSV, type_to_axiom=partial)


@needs_xstest
def test_xstest_sampling_per_cell():
    with pytest.warns(UserWarning, match="fewer than 30 rows"):
        dataset = load_xstest(XSTEST_CSV, per_cell=30, seed=3)
    assert set(dataset.cells().values()) == {25, 30}
    assert dataset.cells()[("privacy", "safe")] == 30


# --- LITMUS-shaped loaders --------------------------------------------------------------


def test_load_litmus_local_csv_default_columns_and_label_case(tmp_path):
    rows = litmus_rows({("Civility", "safe"): 3, ("Civility", "unsafe"): 2})
    rows[0]["safety_label"] = " SAFE "
    rows[1]["safety_label"] = rows[1]["safety_label"].capitalize()
    dataset = load_litmus(write_csv(tmp_path / "litmus.csv", rows))
    assert dataset.labels == tuple(row["safety_label"].strip().lower() for row in rows)
    assert dataset.texts == tuple(row["input"] for row in rows)
    assert dataset.cells() == {("Civility", "safe"): 3, ("Civility", "unsafe"): 2}
    assert dataset.name == "litmus"


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".json", ".parquet"])
def test_load_litmus_local_formats_with_custom_columns(tmp_path, suffix):
    records = [
        {"prompt": f"question {i}", "category": "A" if i % 2 else "B", "verdict": label}
        for i, label in enumerate(["safe", "unsafe", "unsafe", "safe", "Safe", "UNSAFE"])
    ]
    path = tmp_path / f"prompts{suffix}"
    if suffix == ".csv":
        write_csv(path, records)
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    elif suffix == ".json":
        path.write_text(json.dumps(records), encoding="utf-8")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    dataset = load_litmus(
        path, columns={"text": "prompt", "axiom": "category", "label": "verdict"}, name="mine"
    )
    assert dataset.texts == tuple(r["prompt"] for r in records)
    assert dataset.axioms == ("B", "A", "B", "A", "B", "A")
    assert dataset.labels == ("safe", "unsafe", "unsafe", "safe", "safe", "unsafe")
    assert dataset.name == "mine"


def test_load_litmus_hub_id_goes_through_datasets(monkeypatch):
    calls = []

    class FakeSplit:
        def to_dict(self):
            return {
                "input": ["p1", "p2"],
                "axiom": ["Wisdom", "Wisdom"],
                "safety_label": ["safe", "unsafe"],
                "extra": [1, 2],
            }

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return FakeSplit()

    monkeypatch.setitem(
        sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake_load_dataset)
    )
    dataset = load_litmus()
    assert calls == [("hasnat79/litmus", {"split": "train"})]
    assert dataset.texts == ("p1", "p2")


def test_unknown_labels_are_errors_naming_rows(tmp_path):
    rows = litmus_rows({("A", "safe"): 4, ("A", "unsafe"): 4})
    rows[2]["safety_label"] = "maybe"
    rows[5]["safety_label"] = "harmful"
    with pytest.raises(SafetyDataError) as error:
        load_litmus(write_csv(tmp_path / "bad.csv", rows))
    message = str(error.value)
    assert "'safety_label'" in message
    assert "2 value(s)" in message
    assert "row 2: 'maybe'" in message
    assert "row 5: 'harmful'" in message


def test_many_bad_labels_are_summarised():
    table = {"text": [f"t{i}" for i in range(9)], "axiom": ["A"] * 9, "label": [1] * 9}
    with pytest.raises(SafetyDataError, match=r"row 4: 1 \(\+4 more\)"):
        SafetyDataset.from_columns(table)


def test_missing_column_names_missing_and_available(tmp_path):
    rows = [{"prompt": "x", "axiom": "A", "safety_label": "safe"}]
    with pytest.raises(SafetyDataError) as error:
        load_litmus(write_csv(tmp_path / "m.csv", rows))
    message = str(error.value)
    assert "'input' (for text)" in message
    assert "available columns: ['prompt', 'axiom', 'safety_label']" in message


def test_empty_texts_are_errors_naming_rows(tmp_path):
    rows = litmus_rows({("A", "safe"): 3, ("A", "unsafe"): 3})
    rows[1]["input"] = "   "
    rows[4]["input"] = ""
    with pytest.raises(SafetyDataError, match=r"row 1: '   ', row 4: ''"):
        load_litmus(write_csv(tmp_path / "e.csv", rows))


def test_one_class_axiom_is_an_error_naming_the_cell(tmp_path):
    rows = litmus_rows({("A", "safe"): 2, ("A", "unsafe"): 2, ("B", "safe"): 3})
    with pytest.raises(SafetyDataError, match=r"\('B', 'unsafe'\)") as error:
        load_litmus(write_csv(tmp_path / "one.csv", rows))
    assert "('A'" not in str(error.value)


def test_constructor_checks_rows():
    with pytest.raises(SafetyDataError, match="lengths"):
        SafetyDataset(("a", "b"), ("A",), ("safe", "safe"))
    with pytest.raises(SafetyDataError, match="row 1: 'Safe'"):
        SafetyDataset(("a", "b"), ("A", "A"), ("safe", "Safe"))
    assert SafetyDataset(["a"], ["A"], ["safe"]).texts == ("a",)


def test_from_columns_accepts_a_dataframe_and_round_trips_to_dict():
    import pandas as pd

    dataset = dataset_from_cells({("A", "safe"): 2, ("A", "unsafe"): 1})
    again = SafetyDataset.from_columns(pd.DataFrame(dataset.to_dict()))
    assert again == dataset


def test_subset_keeps_order_and_rejects_unknown_axioms():
    dataset = dataset_from_cells({(a, label): 2 for a in "ABC" for label in ("safe", "unsafe")})
    subset = dataset.subset(["C", "A"])
    assert subset.categories == ["A", "C"]
    assert subset.texts == tuple(
        t for t, a in zip(dataset.texts, dataset.axioms, strict=True) if a in "AC"
    )
    with pytest.raises(SafetyDataError, match=r"unknown axioms \['Z'\]"):
        dataset.subset(["A", "Z"])


# --- stratified sampling --------------------------------------------------------------------

CELLS = {("A", "safe"): 30, ("A", "unsafe"): 40, ("B", "safe"): 25, ("B", "unsafe"): 50}


def test_stratified_counts_per_cell_and_source_order():
    dataset = dataset_from_cells(CELLS)
    sample = dataset.sample_stratified(10, seed=1)
    assert sample.cells() == {cell: 10 for cell in CELLS}
    positions = [dataset.texts.index(text) for text in sample.texts]
    assert positions == sorted(positions)


def test_stratified_is_deterministic_and_seed_dependent():
    dataset = dataset_from_cells(CELLS)
    first = dataset.sample_stratified(10, seed=7)
    assert dataset.sample_stratified(10, seed=7) == first
    other = dataset.sample_stratified(10, seed=8)
    assert other.cells() == first.cells()
    assert set(other.texts) != set(first.texts)


def test_a_cells_sample_does_not_depend_on_other_cells():
    dataset = dataset_from_cells(CELLS)
    whole_then_subset = dataset.sample_stratified(10, seed=5).subset(["B"])
    subset_then_sample = dataset.subset(["B"]).sample_stratified(10, seed=5)
    assert whole_then_subset == subset_then_sample


def test_short_cells_warn_or_raise_when_strict():
    dataset = dataset_from_cells(CELLS)
    with pytest.warns(UserWarning, match=r"\('B', 'safe'\) has 25") as record:
        sample = dataset.sample_stratified(35, seed=0)
    assert "('B', 'unsafe')" not in str(record[0].message)
    assert sample.cells() == {
        ("A", "safe"): 30,
        ("A", "unsafe"): 35,
        ("B", "safe"): 25,
        ("B", "unsafe"): 35,
    }
    with pytest.raises(SafetyDataError, match="fewer than 35"):
        dataset.sample_stratified(35, strict=True)


def test_modes_map_to_rows_per_cell(tmp_path):
    path = write_csv(tmp_path / "big.csv", litmus_rows({("A", "safe"): 120, ("A", "unsafe"): 130}))
    sanity = load_litmus(path, mode="sanity")
    assert sanity.cells() == {("A", "safe"): 100, ("A", "unsafe"): 100}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_litmus(path, per_cell=50).cells() == {("A", "safe"): 50, ("A", "unsafe"): 50}
    with pytest.warns(UserWarning, match="fewer than 500"):
        assert len(load_litmus(path, mode="full")) == 250
    with pytest.raises(ValueError, match="not both"):
        load_litmus(path, mode="sanity", per_cell=5)
    # The Literal annotation rejects it first under the test-time type checker.
    with pytest.raises((ValueError, TypeError), match="unknown mode|quick"):
        load_litmus(path, mode="quick")
