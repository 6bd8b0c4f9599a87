"""Row discipline: disjoint, hashed splits of preference rows, and the check that enforces them.

Rows used to build something never evaluate it. A model pair made by DPO on hh-rlhf rows, a
steering vector extracted from hh-rlhf rows, and the evaluation of either must therefore read
three disjoint sets of rows. :func:`split_rows` cuts a :class:`~mahals.data.PreferenceDataset`
into named splits (by default ``dpo_train``, ``vector_extraction``, ``evaluation``):

- every row is identified by :func:`row_hash`, the SHA-256 of its content (prompt turns and
  both answers), so the identity survives re-ordering, re-loading and other copies of the file;
- rows with the same content (hh-rlhf repeats a few conversations) count as one and always land
  in the same split, so two splits never share a hash;
- the assignment is a deterministic function of the seed and the content hashes alone: rows are
  ordered by ``SHA-256(seed, row hash)`` and cut into consecutive blocks of the requested sizes.

The resulting :class:`RowSplits` is saved next to whatever it was used for (the DPO adapter
ships its own, see :mod:`mahals.pairs`) and pipelines call :func:`assert_disjoint` before they
evaluate: it raises :class:`RowOverlapError` naming how many rows overlap.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from mahals.data.hh_rlhf import PreferenceDataset, PreferencePair
from mahals.io import atomic_write_json

__all__ = [
    "DEFAULT_FRACTIONS",
    "SPLIT_NAMES",
    "RowOverlapError",
    "RowSplits",
    "assert_disjoint",
    "load_row_splits",
    "row_hash",
    "rows_sha256",
    "split_rows",
]

#: The three uses of hh-rlhf rows around a DPO pair, in the order the blocks are cut.
SPLIT_NAMES: tuple[str, ...] = ("dpo_train", "vector_extraction", "evaluation")
DEFAULT_FRACTIONS: Mapping[str, float] = {
    "dpo_train": 0.5,
    "vector_extraction": 0.25,
    "evaluation": 0.25,
}
_FORMAT = "mahals.row_splits/1"
_EXAMPLES_SHOWN = 5


class RowOverlapError(ValueError):
    """Rows about to be used for one purpose were already used for another."""


def row_hash(pair: PreferencePair) -> str:
    """SHA-256 (hex) of a row's content: its prompt turns (role, text) and both answers.

    The row's position in its file is left out, so the same conversation hashes the same
    wherever it is read from.
    """
    content = {
        "prompt": [[turn.role, turn.text] for turn in pair.prompt_turns],
        "chosen": pair.chosen,
        "rejected": pair.rejected,
    }
    encoded = json.dumps(content, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(encoded.encode("utf-8")).hexdigest()


def rows_sha256(pairs: Iterable[PreferencePair]) -> str:
    """One SHA-256 (hex) for an ordered list of rows: the hash of their row hashes, one a line.

    Identifies exactly which rows, in which order, something was built from.
    """
    digest = hashlib.sha256()
    for pair in pairs:
        digest.update(row_hash(pair).encode("ascii") + b"\n")
    return digest.hexdigest()


@dataclass(frozen=True)
class RowSplits:
    """Named, disjoint sets of row hashes and how they were made.

    Attributes:
        hashes: split name → row hashes (hex SHA-256), in the split's (seeded) order.
        seed: the seed of the assignment.
        fractions: split name → requested fraction of the distinct rows.
        source: description of the rows that were split (file names).
        n_rows: rows split, duplicates included; ``n_distinct`` distinct contents.
    """

    hashes: Mapping[str, tuple[str, ...]]
    seed: int
    fractions: Mapping[str, float]
    source: str
    n_rows: int
    n_distinct: int

    def __post_init__(self) -> None:
        seen: dict[str, str] = {}
        for name, hashes in self.hashes.items():
            for value in hashes:
                if value in seen and seen[value] != name:
                    raise RowOverlapError(
                        f"row {value[:12]}… is in both split {seen[value]!r} and {name!r}"
                    )
                seen[value] = name

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.hashes)

    def split_of(self, name: str) -> frozenset[str]:
        """The hashes of split ``name``; an unknown name raises naming the known ones."""
        if name not in self.hashes:
            raise KeyError(f"no split {name!r}; splits: {list(self.hashes)}")
        return frozenset(self.hashes[name])

    def all_except(self, name: str) -> frozenset[str]:
        """The hashes of every split other than ``name`` (what ``name``'s users must not read)."""
        self.split_of(name)
        return frozenset(
            h for other, hashes in self.hashes.items() if other != name for h in hashes
        )

    def select(self, dataset: Iterable[PreferencePair], name: str) -> list[PreferencePair]:
        """The rows of ``dataset`` that belong to split ``name``, in the split's order (one row
        per distinct content). Rows of the split absent from ``dataset`` are left out."""
        self.split_of(name)
        by_hash: dict[str, PreferencePair] = {}
        for pair in dataset:
            by_hash.setdefault(row_hash(pair), pair)
        return [by_hash[h] for h in self.hashes[name] if h in by_hash]

    def to_json(self) -> dict:
        return {
            "format": _FORMAT,
            "seed": self.seed,
            "fractions": dict(self.fractions),
            "source": self.source,
            "n_rows": self.n_rows,
            "n_distinct": self.n_distinct,
            "sizes": {name: len(hashes) for name, hashes in self.hashes.items()},
            "hashes": {name: list(hashes) for name, hashes in self.hashes.items()},
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the splits as JSON (atomically)."""
        return atomic_write_json(path, self.to_json())


def load_row_splits(path: str | os.PathLike) -> RowSplits:
    """Read splits written by :meth:`RowSplits.save`; a malformed file raises naming it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read row splits from {path}: {err}") from err
    if data.get("format") != _FORMAT:
        raise ValueError(f"{path}: format {data.get('format')!r} is not {_FORMAT!r}")
    return RowSplits(
        hashes={name: tuple(hashes) for name, hashes in data["hashes"].items()},
        seed=int(data["seed"]),
        fractions=dict(data["fractions"]),
        source=str(data["source"]),
        n_rows=int(data["n_rows"]),
        n_distinct=int(data["n_distinct"]),
    )


def _block_sizes(n: int, fractions: Mapping[str, float]) -> dict[str, int]:
    """Sizes summing to ``n``: floor of each share, the remainder to the largest fractions."""
    if not fractions:
        raise ValueError("fractions is empty: name at least one split")
    bad = {name: f for name, f in fractions.items() if not 0 < f <= 1}
    if bad:
        raise ValueError(f"split fractions must lie in (0, 1], got {bad}")
    total = sum(fractions.values())
    if abs(total - 1) > 1e-9:
        raise ValueError(f"split fractions must sum to 1, got {total} ({dict(fractions)})")
    sizes = {name: int(n * f) for name, f in fractions.items()}
    by_share = sorted(fractions, key=lambda name: (-(n * fractions[name] - sizes[name]), name))
    for name in by_share[: n - sum(sizes.values())]:
        sizes[name] += 1
    return sizes


def split_rows(
    dataset: PreferenceDataset | Iterable[PreferencePair],
    fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
    *,
    seed: int = 0,
    source: str | None = None,
) -> RowSplits:
    """Split rows into disjoint named sets by content hash.

    Args:
        dataset: the rows (e.g. ``load_hh_rlhf(".../harmless-base/test.jsonl.gz")``).
        fractions: split name → share of the distinct rows (sum 1); blocks are cut in this
            order. Default: half for DPO training, a quarter each for vector extraction and
            evaluation.
        seed: the assignment's seed; the same rows and seed always give the same splits.
        source: description recorded in the result (default: the dataset's own).

    Returns:
        :class:`RowSplits`; every distinct row is in exactly one split.
    """
    pairs = list(dataset)
    distinct = list(dict.fromkeys(row_hash(pair) for pair in pairs))
    if not distinct:
        raise ValueError("no rows to split")
    order = sorted(
        distinct, key=lambda h: hashlib.sha256(f"{seed}:{h}".encode("ascii")).hexdigest()
    )
    sizes = _block_sizes(len(order), fractions)
    hashes, start = {}, 0
    for name in fractions:
        hashes[name] = tuple(order[start : start + sizes[name]])
        start += sizes[name]
    description = source if source is not None else getattr(dataset, "source", "rows")
    return RowSplits(hashes, seed, dict(fractions), description, len(pairs), len(distinct))


def assert_disjoint(
    rows_used: Iterable[PreferencePair | str],
    forbidden_hashes: Iterable[str],
    *,
    what: str,
) -> None:
    """Raise :class:`RowOverlapError` if any of ``rows_used`` has a forbidden hash.

    ``rows_used`` are rows (hashed with :func:`row_hash`) or row hashes; ``forbidden_hashes``
    are the hashes of rows already used to build the thing being evaluated (for example
    ``splits.all_except("evaluation")``). ``what`` names the use in the message, which gives the
    number of overlapping rows and the first few of them.
    """
    forbidden = frozenset(forbidden_hashes)
    used = [row if isinstance(row, str) else row_hash(row) for row in rows_used]
    overlap = [i for i, h in enumerate(used) if h in forbidden]
    if overlap:
        shown = ", ".join(f"#{i} ({used[i][:12]}…)" for i in overlap[:_EXAMPLES_SHOWN])
        more = ", …" if len(overlap) > _EXAMPLES_SHOWN else ""
        raise RowOverlapError(
            f"{what}: {len(overlap)} of {len(used)} rows were already used to build what is "
            f"evaluated (rows {shown}{more}); pick rows from a split disjoint from them"
        )
