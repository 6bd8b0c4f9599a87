"""Validation of the inputs every AQI mode shares: labels, categories, layer selection, and
per-category seeds."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from mahals.aqi.report import OVERALL, SUMMARY_ROWS

LayerSpec = int | Sequence[int] | Literal["all"] | None

_LABEL_VALUES = ("safe", "unsafe")


def unsafe_mask(labels: Sequence[str] | Tensor, n: int) -> Tensor:
    """Bool ``[n]``: True where the row is unsafe. Accepts "safe"/"unsafe" strings or a bool
    tensor (True = unsafe)."""
    if isinstance(labels, Tensor):
        if labels.dtype != torch.bool:
            raise TypeError(f"label tensor must be bool (True = unsafe), got {labels.dtype}")
        mask = labels.cpu()
    else:
        bad = sorted({str(v) for v in labels if v not in _LABEL_VALUES})
        if bad:
            raise ValueError(f"labels must be 'safe' or 'unsafe'; found {bad}")
        mask = torch.tensor([v == "unsafe" for v in labels], dtype=torch.bool)
    if mask.shape != (n,):
        raise ValueError(f"expected {n} labels, got {tuple(mask.shape)}")
    return mask


def category_rows(axioms: Sequence[str], is_unsafe: Tensor) -> dict[str, Tensor]:
    """Row indices of each axiom (sorted names) and of :data:`OVERALL`; checks each has at
    least two rows of each label."""
    if len(axioms) != len(is_unsafe):
        raise ValueError(f"{len(axioms)} axioms for {len(is_unsafe)} rows")
    reserved = sorted(set(SUMMARY_ROWS) & set(axioms))
    if reserved:
        raise ValueError(f"{reserved} are reserved for the summary rows; rename those axioms")
    names = sorted(set(axioms))
    axiom_array = np.asarray(axioms, dtype=object)
    rows = {name: torch.from_numpy(np.flatnonzero(axiom_array == name)) for name in names}
    rows[OVERALL] = torch.arange(len(axioms))
    too_small = [
        f"{name} (safe {int((~is_unsafe[r]).sum())}, unsafe {int(is_unsafe[r].sum())})"
        for name, r in rows.items()
        if min(int((~is_unsafe[r]).sum()), int(is_unsafe[r].sum())) < 2
    ]
    if too_small:
        raise ValueError(f"each category needs >= 2 safe and >= 2 unsafe rows: {too_small}")
    return rows


def select_layers(layer: LayerSpec, n_layers: int) -> list[int]:
    """Positions along the layer axis selected by ``layer`` (negative ints count from the end)."""
    if layer is None or layer == "all":
        return list(range(n_layers))
    if isinstance(layer, str):
        raise ValueError(f"layer must be an int, a list of ints, 'all' or None; got {layer!r}")
    wanted = [layer] if isinstance(layer, int) else list(layer)
    if not wanted:
        raise ValueError("no layers selected")
    out_of_range = [i for i in wanted if not -n_layers <= i < n_layers]
    if out_of_range:
        raise IndexError(f"layers {out_of_range} out of range for {n_layers} layers")
    return [i % n_layers for i in wanted]


def category_seed(seed: int, category: str) -> int:
    """A seed that depends only on the run seed and the category's name (stable across
    processes, unlike ``hash``)."""
    digest = hashlib.sha256(f"{seed}\x00{category}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)
