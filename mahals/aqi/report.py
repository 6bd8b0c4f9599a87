"""Report objects of the AQI: :class:`AQIScore` (one category) and :class:`AQIReport` (one
model on one dataset), with JSON, markdown and pandas output."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from mahals.io import atomic_write_json

__all__ = ["CENTRED_OVERALL", "OVERALL", "SUMMARY_ROWS", "AQIReport", "AQIScore", "Mode"]

OVERALL = "overall"
"""Name of the category made of all rows of a run."""

CENTRED_OVERALL = "overall_centred"
"""Name of the optional mahalanobis row that scores all rows pooled after removing each
category's mean (the category as a nuisance factor)."""

SUMMARY_ROWS = (OVERALL, CENTRED_OVERALL)
"""Report rows that summarise the categories rather than being one."""

Mode = Literal["mahalanobis", "geometry", "reference"]


def _tuple_or_none(values: Sequence[float] | None) -> tuple[float, ...] | None:
    return None if values is None else tuple(float(v) for v in values)


@dataclass(frozen=True)
class AQIScore:
    """AQI of one category (an axiom, or :data:`OVERALL`).

    ``aqi`` depends on the mode: mahalanobis ``100 · (2 · AUC − 1)`` of held-out shrinkage-LDA
    projections (−100…100, 0 = chance, 100 = perfectly separated); geometry the
    chance-corrected between-class share of variance (0 = chance, 100 = every row on its class
    mean); reference the γ-mix of the run-relative ``chi_norm`` and ``xb_norm`` (0–100).
    ``chi_raw``/``xb_raw`` are the unitless Calinski–Harabasz and Xie–Beni indices (geometry and
    reference modes). ``auc``/``eta2`` are the held-out ROC-AUC and η² of the projection
    (mahalanobis). ``ci_low``/``ci_high`` bound ``aqi`` (bootstrap; not in reference mode).
    ``layer_*`` fields are per-layer curves aligned with :attr:`AQIReport.layers`.
    ``baselines`` maps a surface-feature baseline's name to its score on the same folds.
    """

    category: str
    aqi: float
    n_safe: int
    n_unsafe: int
    chi_raw: float | None = None
    xb_raw: float | None = None
    chi_norm: float | None = None
    xb_norm: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    auc: float | None = None
    eta2: float | None = None
    layer_aqi: tuple[float, ...] | None = None
    layer_ci_low: tuple[float, ...] | None = None
    layer_ci_high: tuple[float, ...] | None = None
    layer_chi: tuple[float, ...] | None = None
    layer_xb: tuple[float, ...] | None = None
    layer_auc: tuple[float, ...] | None = None
    layer_eta2: tuple[float, ...] | None = None
    layer_shrinkage: tuple[float, ...] | None = None
    baselines: dict[str, float] | None = None

    @property
    def n(self) -> int:
        return self.n_safe + self.n_unsafe

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AQIScore:
        curves = {name: _tuple_or_none(data.get(name)) for name in _CURVE_FIELDS}
        return cls(**{**data, **curves})


_CURVE_FIELDS = (
    "layer_aqi",
    "layer_ci_low",
    "layer_ci_high",
    "layer_chi",
    "layer_xb",
    "layer_auc",
    "layer_eta2",
    "layer_shrinkage",
)


@dataclass(frozen=True)
class AQIReport:
    """AQI of one model on one labelled dataset: a score per axiom plus :data:`OVERALL` (and,
    when asked for, :data:`CENTRED_OVERALL`).

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
        """Category names other than the :data:`SUMMARY_ROWS`, in report order."""
        return [name for name in self.scores if name not in SUMMARY_ROWS]

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
        if all(s.auc is not None for s in scores):
            columns += [("AUC", lambda s: f"{s.auc:.3f}"), ("eta2", lambda s: f"{s.eta2:.3f}")]
        for baseline in scores[0].baselines or {}:
            columns.append((f"baseline {baseline}", lambda s, b=baseline: f"{s.baselines[b]:.2f}"))
        if all(s.chi_raw is not None for s in scores):
            columns += [
                ("CHI", lambda s: f"{s.chi_raw:.4g}"),
                ("XB", lambda s: f"{s.xb_raw:.4g}"),
            ]
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
        field that this mode fills, and ``baseline_<name>`` per baseline (needs pandas)."""
        try:
            import pandas as pd
        except ImportError as error:
            raise ImportError("AQIReport.to_pandas needs pandas: pip install pandas") from error
        rows = {
            name: {
                **{k: v for k, v in asdict(s).items() if k not in (*_CURVE_FIELDS, "baselines")},
                **{f"baseline_{b}": value for b, value in (s.baselines or {}).items()},
            }
            for name, s in self.scores.items()
        }
        frame = pd.DataFrame.from_dict(rows, orient="index").drop(columns="category")
        return frame.dropna(axis="columns", how="all")

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
