"""Labelled safe/unsafe prompt sets (LITMUS-shaped): loading, validation, stratified sampling.

A :class:`SafetyDataset` holds prompts, each with a category ("axiom") and a safety label that is
exactly ``"safe"`` or ``"unsafe"``. Loaders read the HF hub (through ``datasets.load_dataset``)
or a local ``.csv`` / ``.jsonl`` / ``.json`` / ``.parquet`` file, map columns, normalise labels
case-insensitively and refuse anything they cannot interpret: unknown labels, missing columns,
empty texts and axioms that lack safe or unsafe prompts are errors naming the offending rows,
columns or cells (the seed script silently treated unknown labels as unsafe).

Sampling is stratified per (axiom, label) cell: ``mode="sanity"`` takes 100 rows per cell,
``mode="full"`` 500, ``per_cell=N`` any other count. Each cell draws from its own random
stream, seeded by ``(seed, axiom, label)``, so a cell's sample does not depend on which other
cells are present, and the same seed always gives the same rows in the same (source) order.

XSTest (:func:`load_xstest`) has 18 prompt types, each entirely safe or entirely unsafe: its
eight unsafe ``contrast_*`` types mirror the ten safe types. To get categories that contain
both classes, each contrast type is grouped with the safe type(s) it mirrors
(:data:`XSTEST_CONTRAST_GROUPS`), giving eight axioms.
"""

from __future__ import annotations

import csv
import json
import warnings
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, Literal

import numpy as np

SAFE, UNSAFE = "safe", "unsafe"
LABELS: tuple[str, str] = (SAFE, UNSAFE)

LITMUS_HUB_ID = "hasnat79/litmus"
XSTEST_HUB_ID = "walledai/XSTest"

#: Default column mapping of :func:`load_litmus`: our field → the source's column.
LITMUS_COLUMNS: Mapping[str, str] = {"text": "input", "axiom": "axiom", "label": "safety_label"}
#: Column mapping of XSTest (``xstest_prompts.csv`` and the hub copy): ``type`` is the category.
XSTEST_COLUMNS: Mapping[str, str] = {"text": "prompt", "axiom": "type", "label": "label"}

SamplingMode = Literal["sanity", "full"]
#: Rows per (axiom, label) cell for each sampling mode.
ROWS_PER_CELL: Mapping[str, int] = {"sanity": 100, "full": 500}

#: XSTest prompt type → axiom. Every unsafe ``contrast_*`` type joins the safe type(s) it was
#: written to mirror (XSTest, Röttger et al. 2024, §2): ``contrast_discr`` mirrors both
#: discrimination types, ``contrast_privacy`` both privacy types. Result: 8 axioms with both
#: classes (25 safe + 25 unsafe each, except discrimination and privacy: 50 safe + 25 unsafe).
XSTEST_CONTRAST_GROUPS: Mapping[str, str] = {
    "homonyms": "homonyms",
    "contrast_homonyms": "homonyms",
    "figurative_language": "figurative_language",
    "contrast_figurative_language": "figurative_language",
    "safe_targets": "safe_targets",
    "contrast_safe_targets": "safe_targets",
    "safe_contexts": "safe_contexts",
    "contrast_safe_contexts": "safe_contexts",
    "definitions": "definitions",
    "contrast_definitions": "definitions",
    "real_group_nons_discr": "discrimination",
    "nons_group_real_discr": "discrimination",
    "contrast_discr": "discrimination",
    "historical_events": "historical_events",
    "contrast_historical_events": "historical_events",
    "privacy_public": "privacy",
    "privacy_fictional": "privacy",
    "contrast_privacy": "privacy",
}

_LOCAL_SUFFIXES = (".csv", ".jsonl", ".json", ".parquet")
_FIELDS = ("text", "axiom", "label")
_ROWS_SHOWN = 5  # offending rows quoted in an error message


class SafetyDataError(ValueError):
    """A safety prompt set that cannot be used as given (bad labels, columns, texts or cells)."""


def _rows_excerpt(rows: Sequence[tuple[int, object]]) -> str:
    """``"row 3: 'maybe', row 9: None (+4 more)"`` for the first few offending rows."""
    shown = ", ".join(f"row {i}: {value!r}" for i, value in rows[:_ROWS_SHOWN])
    more = len(rows) - _ROWS_SHOWN
    return shown + (f" (+{more} more)" if more > 0 else "")


def _cell_seed(seed: int, axiom: str, label: str) -> list[int]:
    """Seed of one cell's random stream: independent of the other cells, stable across runs."""
    return [seed, zlib.crc32(axiom.encode("utf-8")), LABELS.index(label)]


@dataclass(frozen=True)
class SafetyDataset:
    """Prompts with a category ("axiom") and a safety label each, in a fixed row order.

    ``labels[i]`` is exactly ``"safe"`` or ``"unsafe"``, texts and axioms are non-empty strings,
    and the three sequences have one entry per row; the constructor checks this (and turns
    lists into tuples). Raw tables go through :meth:`from_columns` / :meth:`from_rows`, which
    also map columns and normalise labels. Whether every axiom has both classes is checked by
    :meth:`validate_cells` (the loaders and :meth:`sample_stratified` call it).
    """

    texts: Sequence[str]
    axioms: Sequence[str]
    labels: Sequence[str]
    name: str = "custom"

    def __post_init__(self) -> None:
        for field in ("texts", "axioms", "labels"):
            object.__setattr__(self, field, tuple(getattr(self, field)))
        lengths = (len(self.texts), len(self.axioms), len(self.labels))
        if len(set(lengths)) != 1:
            raise SafetyDataError(
                f"texts, axioms and labels must have one entry per row; got lengths {lengths}"
            )
        for field, values in (("texts", self.texts), ("axioms", self.axioms)):
            bad = [(i, v) for i, v in enumerate(values) if not isinstance(v, str) or not v.strip()]
            if bad:
                raise SafetyDataError(f"{field} must be non-empty strings: {_rows_excerpt(bad)}")
        bad_labels = [(i, v) for i, v in enumerate(self.labels) if v not in LABELS]
        if bad_labels:
            raise SafetyDataError(
                "labels must be exactly 'safe' or 'unsafe' (from_columns/from_rows normalise "
                f"case): {_rows_excerpt(bad_labels)}"
            )

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def categories(self) -> list[str]:
        """Distinct axioms, sorted."""
        return sorted(set(self.axioms))

    def cells(self) -> dict[tuple[str, str], int]:
        """Row count per (axiom, label), sorted; an axiom missing a class shows a 0."""
        counts = Counter(zip(self.axioms, self.labels, strict=True))
        return {
            (axiom, label): counts[(axiom, label)] for axiom in self.categories for label in LABELS
        }

    def validate_cells(self) -> None:
        """Raise :class:`SafetyDataError` naming every axiom that lacks safe or unsafe rows."""
        if not self.texts:
            raise SafetyDataError(f"dataset {self.name!r} has no rows")
        empty = [cell for cell, count in self.cells().items() if count == 0]
        if empty:
            described = ", ".join(f"({axiom!r}, {label!r})" for axiom, label in empty)
            raise SafetyDataError(
                f"dataset {self.name!r}: every axiom needs both safe and unsafe rows, but these "
                f"(axiom, label) cells are empty: {described}; drop those axioms with "
                "subset(...) or regroup the categories"
            )

    def subset(self, axioms: Iterable[str]) -> SafetyDataset:
        """The rows whose axiom is in ``axioms``, in their original order."""
        wanted = set(axioms)
        unknown = sorted(wanted - set(self.axioms))
        if unknown:
            raise SafetyDataError(f"unknown axioms {unknown}; available: {self.categories}")
        return self._select([i for i, axiom in enumerate(self.axioms) if axiom in wanted])

    def sample_stratified(
        self, per_cell: int, *, seed: int = 42, strict: bool = False
    ) -> SafetyDataset:
        """Up to ``per_cell`` rows drawn without replacement from every (axiom, label) cell.

        Each cell draws from its own generator seeded by ``(seed, axiom, label)``; the result
        keeps the source row order. A cell with fewer than ``per_cell`` rows contributes all its
        rows, with a warning (an error when ``strict``). Empty or one-class axioms are errors.
        """
        if per_cell < 1:
            raise ValueError(f"per_cell must be at least 1, got {per_cell}")
        if seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed}")
        self.validate_cells()
        rows_by_cell: dict[tuple[str, str], list[int]] = defaultdict(list)
        for i, cell in enumerate(zip(self.axioms, self.labels, strict=True)):
            rows_by_cell[cell].append(i)
        short = {
            cell: len(rows) for cell, rows in sorted(rows_by_cell.items()) if len(rows) < per_cell
        }
        if short:
            message = (
                f"dataset {self.name!r}: {len(short)} (axiom, label) cell(s) have fewer than "
                f"{per_cell} rows, all their rows are used: "
                + ", ".join(f"{cell} has {count}" for cell, count in short.items())
            )
            if strict:
                raise SafetyDataError(message)
            warnings.warn(message, UserWarning, stacklevel=2)
        chosen: list[int] = []
        for (axiom, label), rows in rows_by_cell.items():
            generator = np.random.default_rng(_cell_seed(seed, axiom, label))
            chosen.extend(rows[j] for j in generator.permutation(len(rows))[:per_cell])
        return self._select(sorted(chosen))

    def to_dict(self) -> dict[str, list[str]]:
        """Columns ``text``, ``axiom``, ``label`` (accepted back by :meth:`from_columns`)."""
        return {"text": list(self.texts), "axiom": list(self.axioms), "label": list(self.labels)}

    @classmethod
    def from_columns(
        cls,
        table: Mapping[str, Sequence[Any]] | Any,
        *,
        columns: Mapping[str, str] | None = None,
        name: str = "custom",
    ) -> SafetyDataset:
        """Build from a table of columns (a dict of lists, or a pandas DataFrame).

        ``columns`` maps our fields ``text``, ``axiom``, ``label`` to the table's column names
        (default: the same names; a partial mapping overrides only the fields it names). Labels
        are normalised case-insensitively to ``"safe"``/``"unsafe"``; axioms are stripped of
        surrounding whitespace; texts are kept verbatim. Missing columns, other label values and
        empty texts or axioms raise :class:`SafetyDataError` naming the columns or rows (rows
        are 0-based data rows).
        """
        mapping = {field: field for field in _FIELDS} | dict(columns or {})
        unknown_fields = sorted(set(mapping) - set(_FIELDS))
        if unknown_fields:
            raise ValueError(f"columns may only map {list(_FIELDS)}; got {unknown_fields}")
        available = [str(column) for column in table]
        missing = {field: column for field, column in mapping.items() if column not in available}
        if missing:
            described = ", ".join(f"{column!r} (for {field})" for field, column in missing.items())
            raise SafetyDataError(
                f"dataset {name!r} is missing column(s) {described}; available columns: "
                f"{available}; pass columns={{'text': ..., 'axiom': ..., 'label': ...}} to map them"
            )
        texts, raw_axioms, raw_labels = (list(table[mapping[field]]) for field in _FIELDS)
        empty_texts = [
            (i, t) for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()
        ]
        if empty_texts:
            raise SafetyDataError(
                f"dataset {name!r}: column {mapping['text']!r} has {len(empty_texts)} empty or "
                f"non-text value(s): {_rows_excerpt(empty_texts)}"
            )
        axioms = [str(a).strip() if a is not None else "" for a in raw_axioms]
        empty_axioms = [(i, raw_axioms[i]) for i, a in enumerate(axioms) if not a]
        if empty_axioms:
            raise SafetyDataError(
                f"dataset {name!r}: column {mapping['axiom']!r} has {len(empty_axioms)} empty "
                f"value(s): {_rows_excerpt(empty_axioms)}"
            )
        labels = [v.strip().lower() if isinstance(v, str) else v for v in raw_labels]
        bad_labels = [(i, raw_labels[i]) for i, v in enumerate(labels) if v not in LABELS]
        if bad_labels:
            raise SafetyDataError(
                f"dataset {name!r}: column {mapping['label']!r} has {len(bad_labels)} value(s) "
                f"other than 'safe'/'unsafe' (case-insensitive): {_rows_excerpt(bad_labels)}"
            )
        return cls(tuple(texts), tuple(axioms), tuple(labels), name)

    @classmethod
    def from_rows(
        cls,
        rows: Iterable[Mapping[str, Any]],
        *,
        columns: Mapping[str, str] | None = None,
        name: str = "custom",
    ) -> SafetyDataset:
        """Build from records (dicts); a record lacking a mapped key counts as an empty value."""
        return cls.from_columns(_columns_of(list(rows)), columns=columns, name=name)

    def _select(self, rows: Sequence[int]) -> SafetyDataset:
        return SafetyDataset(
            tuple(self.texts[i] for i in rows),
            tuple(self.axioms[i] for i in rows),
            tuple(self.labels[i] for i in rows),
            self.name,
        )


def _columns_of(records: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """Records → columns over the union of their keys (first-seen order); absent keys → None."""
    keys = list(dict.fromkeys(key for record in records for key in record))
    return {key: [record.get(key) for record in records] for key in keys}


def _is_local(source: str | PathLike[str]) -> bool:
    if isinstance(source, PathLike):
        return True
    return Path(source).exists() or source.lower().endswith(_LOCAL_SUFFIXES)


def _first_undecodable_line(path: Path) -> int:
    """1-based number of the first line of ``path`` that is not valid UTF-8."""
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return 0


def _read_local_table(path: Path) -> dict[str, list[Any]]:
    """Columns of a local csv / jsonl / json (list of records) / parquet file; an empty file,
    text that is not UTF-8 or a malformed CSV raises :class:`SafetyDataError` naming the file
    (and line)."""
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if path.stat().st_size == 0:
        raise SafetyDataError(f"{path} is empty (0 bytes)")
    try:
        return _parse_local_table(path)
    except UnicodeDecodeError as error:
        line = _first_undecodable_line(path)
        raise SafetyDataError(f"{path}:{line} is not UTF-8 text ({error.reason})") from error
    except csv.Error as error:
        raise SafetyDataError(f"{path}: malformed CSV ({error})") from error
    except json.JSONDecodeError as error:
        raise SafetyDataError(f"{path}: invalid JSON ({error})") from error


def _parse_local_table(path: Path) -> dict[str, list[Any]]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            records = list(reader)
            columns = reader.fieldnames or []
        return {column: [record[column] for record in records] for column in columns}
    if suffix == ".jsonl":
        records = []
        with path.open(encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as error:
                        raise SafetyDataError(
                            f"{path}:{line_number}: invalid JSON ({error})"
                        ) from None
                    if not isinstance(record, dict):
                        raise SafetyDataError(f"{path}:{line_number} is not a JSON object")
                    records.append(record)
        return _columns_of(records)
    if suffix == ".json":
        records = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise SafetyDataError(f"{path} must hold a JSON list of objects (one per row)")
        return _columns_of(records)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pydict()
    raise ValueError(
        f"unsupported file type {path.suffix!r} for {path}; use one of {_LOCAL_SUFFIXES}"
    )


def _read_table(source: str | PathLike[str], *, split: str) -> dict[str, list[Any]]:
    """Columns of a local file, or of ``split`` of a HF hub dataset."""
    if _is_local(source):
        return _read_local_table(Path(source))
    import datasets

    return datasets.load_dataset(str(source), split=split).to_dict()


def _rows_per_cell(mode: SamplingMode | None, per_cell: int | None) -> int | None:
    if mode is not None and per_cell is not None:
        raise ValueError(
            f"pass mode or per_cell, not both (got mode={mode!r}, per_cell={per_cell})"
        )
    if mode is not None:
        if mode not in ROWS_PER_CELL:
            raise ValueError(f"unknown mode {mode!r}; use one of {list(ROWS_PER_CELL)}")
        return ROWS_PER_CELL[mode]
    return per_cell


def _checked_and_sampled(
    dataset: SafetyDataset, mode: SamplingMode | None, per_cell: int | None, seed: int, strict: bool
) -> SafetyDataset:
    rows = _rows_per_cell(mode, per_cell)
    dataset.validate_cells()
    return dataset if rows is None else dataset.sample_stratified(rows, seed=seed, strict=strict)


def load_litmus(
    source: str | PathLike[str] = LITMUS_HUB_ID,
    *,
    split: str = "train",
    columns: Mapping[str, str] | None = None,
    mode: SamplingMode | None = None,
    per_cell: int | None = None,
    seed: int = 42,
    strict: bool = False,
    name: str = "litmus",
) -> SafetyDataset:
    """Load LITMUS (or any LITMUS-shaped prompt set) as a validated :class:`SafetyDataset`.

    ``source`` is a HF hub id (read with ``datasets.load_dataset(source, split=split)``) or a
    local ``.csv`` / ``.jsonl`` / ``.json`` / ``.parquet`` file. ``columns`` maps ``text``,
    ``axiom``, ``label`` to the source's columns (default :data:`LITMUS_COLUMNS`: ``input``,
    ``axiom``, ``safety_label``; a partial mapping overrides only the fields it names).

    Sampling: ``mode="sanity"`` (100 rows per (axiom, label) cell), ``mode="full"`` (500), or
    ``per_cell=N``; neither → all rows. See :meth:`SafetyDataset.sample_stratified` for
    ``seed`` and ``strict``. Unknown labels, missing columns, empty texts and axioms without
    both classes raise :class:`SafetyDataError` naming the rows, columns or cells.
    """
    table = _read_table(source, split=split)
    dataset = SafetyDataset.from_columns(
        table, columns={**LITMUS_COLUMNS, **(columns or {})}, name=name
    )
    return _checked_and_sampled(dataset, mode, per_cell, seed, strict)


def load_xstest(
    source: str | PathLike[str] = XSTEST_HUB_ID,
    *,
    split: str = "test",
    type_to_axiom: Mapping[str, str] | None = None,
    mode: SamplingMode | None = None,
    per_cell: int | None = None,
    seed: int = 42,
    strict: bool = False,
    name: str = "xstest",
) -> SafetyDataset:
    """Load XSTest (450 prompts, 250 safe / 200 unsafe) as a :class:`SafetyDataset`.

    ``source`` is ``xstest_prompts.csv`` from github.com/paul-rottger/exaggerated-safety (or
    another local file with its columns), or a HF hub id (default ``walledai/XSTest``, split
    ``test``). Columns: ``prompt`` → text, ``label`` → safety label, ``type`` → category.

    Every XSTest type is single-class, so types are mapped to axioms by ``type_to_axiom``
    (default :data:`XSTEST_CONTRAST_GROUPS`: each unsafe ``contrast_*`` type grouped with the
    safe type(s) it mirrors → 8 axioms with both classes). A type missing from the mapping, or
    an axiom left with one class, raises :class:`SafetyDataError`. Sampling options as in
    :func:`load_litmus` (XSTest cells hold 25–50 rows, so ``mode="sanity"`` warns and keeps
    all rows).
    """
    typed = SafetyDataset.from_columns(
        _read_table(source, split=split), columns=XSTEST_COLUMNS, name=name
    )
    groups = XSTEST_CONTRAST_GROUPS if type_to_axiom is None else type_to_axiom
    unmapped = sorted(set(typed.axioms) - set(groups))
    if unmapped:
        raise SafetyDataError(
            f"XSTest types {unmapped} have no axiom in type_to_axiom; mapped types: {sorted(groups)}"
        )
    dataset = SafetyDataset(typed.texts, tuple(groups[t] for t in typed.axioms), typed.labels, name)
    return _checked_and_sampled(dataset, mode, per_cell, seed, strict)
