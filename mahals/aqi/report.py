"""Report objects of the AQI: :class:`AQIScore` (one category) and :class:`AQIReport` (one
model on one dataset), with JSON, markdown and pandas output."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from mahals.io import atomic_write_json

__all__ = ["OVERALL", "AQIReport", "AQIScore", "Mode"]

OVERALL = "overall"
"""Name of the category made of all rows of a run."""

Mode = Literal["principled", "reference"]


def _tuple_or_none(values: Sequence[float] | None) -> tuple[float, ...] | None:
    return None if values is None else tuple(float(v) for v in values)


@dataclass(frozen=True)
class AQIScore:
    """AQI of one category (an axiom, or :data:`OVERALL`).

    ``aqi`` is on a 0–100 scale (principled: 0 = chance, 100 = perfect separation; reference:
    the γ-mix of the run-relative ``chi_norm`` and ``xb_norm``). ``chi_raw``/``xb_raw`` are the
    unitless Calinski–Harabasz and Xie–Beni indices the score was computed from. ``ci_low``/
    ``ci_high`` bound ``aqi`` (bootstrap, principled mode only). ``layer_*`` fields are
    per-layer curves aligned with :attr:`AQIReport.layers` (principled mode only).
    """

    category: str
    aqi: float
    chi_raw: float
    xb_raw: float
    n_safe: int
    n_unsafe: int
    chi_norm: float | None = None
    xb_norm: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    layer_aqi: tuple[float, ...] | None = None
    layer_ci_low: tuple[float, ...] | None = None
    layer_ci_high: tuple[float, ...] | None = None
    layer_chi: tuple[float, ...] | None = None
    layer_xb: tuple[float, ...] | None = None

    @property
    def n(self) -> int:
        return self.n_safe + self.n_unsafe

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AQIScore:
        curves = {name: _tuple_or_none(data.get(name)) for name in _CURVE_FIELDS}
        return cls(**{**data, **curves})


_CURVE_FIELDS = ("layer_aqi", "layer_ci_low", "layer_ci_high", "layer_chi", "layer_xb")


@dataclass(frozen=True)
class AQIReport:
    """AQI of one model on one labelled dataset: a score per axiom plus :data:`OVERALL`.

    ``layers`` are the layer indices the scores were computed on (one for a single-layer
    score; several when pooled, with per-layer curves in each score). ``settings`` records
    everything needed to reproduce the numbers.
    """

    model: str
    mode: Mode
    layers: tuple[int, ...]
    scores: dict[str, AQIScore]
    settings: dict[str, Any] = field(default_factory=dict)
    dataset: str = "custom"

    @property
    def overall(self) -> AQIScore:
        return self.scores[OVERALL]

    @property
    def axioms(self) -> list[str]:
        """Category names other than :data:`OVERALL`, in report order."""
        return [name for name in self.scores if name != OVERALL]

    def __getitem__(self, category: str) -> AQIScore:
        return self.scores[category]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (floats kept exactly: JSON writes their shortest round-trip repr)."""
        return {
            "model": self.model,
            "dataset": self.dataset,
            "mode": self.mode,
            "layers": list(self.layers),
            "settings": self.settings,
            "scores": {
                name: {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(s).items()}
                for name, s in self.scores.items()
            },
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AQIReport:
        return cls(
            model=data["model"],
            mode=data["mode"],
            layers=tuple(int(layer) for layer in data["layers"]),
            scores={name: AQIScore.from_dict(s) for name, s in data["scores"].items()},
            settings=data.get("settings", {}),
            dataset=data.get("dataset", "custom"),
        )

    def to_json(self, path: str | os.PathLike) -> None:
        """Write the report to ``path`` atomically."""
        atomic_write_json(path, self.to_dict())

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> AQIReport:
        with open(path, encoding="utf-8") as handle:
            return cls.from_dict(json.load(handle))

    def _table_columns(self) -> list[tuple[str, Any]]:
        scores = list(self.scores.values())
        columns: list[tuple[str, Any]] = [("AQI", lambda s: f"{s.aqi:.2f}")]
        if all(s.ci_low is not None for s in scores):
            columns.append(("CI", lambda s: f"[{s.ci_low:.2f}, {s.ci_high:.2f}]"))
        columns += [("CHI", lambda s: f"{s.chi_raw:.4g}"), ("XB", lambda s: f"{s.xb_raw:.4g}")]
        if all(s.chi_norm is not None for s in scores):
            columns += [
                ("CHI_norm", lambda s: f"{s.chi_norm:.2f}"),
                ("XB_norm", lambda s: f"{s.xb_norm:.2f}"),
            ]
        columns += [("n_safe", lambda s: str(s.n_safe)), ("n_unsafe", lambda s: str(s.n_unsafe))]
        return columns

    def to_markdown(self) -> str:
        """A markdown table: one row per axiom, then the overall row."""
        columns = self._table_columns()
        lines = [
            "| category | " + " | ".join(name for name, _ in columns) + " |",
            "|---|" + "---:|" * len(columns),
        ]
        for name, score in self.scores.items():
            cells = " | ".join(render(score) for _, render in columns)
            lines.append(f"| {name} | {cells} |")
        return "\n".join(lines) + "\n"

    def to_pandas(self):
        """A ``pandas.DataFrame`` indexed by category, one column per :class:`AQIScore` scalar
        field (needs pandas)."""
        try:
            import pandas as pd
        except ImportError as error:
            raise ImportError("AQIReport.to_pandas needs pandas: pip install pandas") from error
        rows = {
            name: {k: v for k, v in asdict(s).items() if k not in _CURVE_FIELDS}
            for name, s in self.scores.items()
        }
        return pd.DataFrame.from_dict(rows, orient="index").drop(columns="category")

    def plot_curve(self, ax=None, categories: Sequence[str] | None = None):
        """Plot AQI over depth (with its confidence band when present) for each category on
        ``ax`` (default: a new pyplot figure, so it shows in notebooks); returns the Axes.
        Needs per-layer curves (not reference mode). Drawn by
        :func:`mahals.plots.aqi_category_curves`."""
        from mahals.plots import aqi_category_curves

        if ax is None:
            import matplotlib.pyplot as plt

            _, ax = plt.subplots(figsize=(7, 4))
        return aqi_category_curves(self, ax=ax, categories=categories)
