"""Figures for Phase 1 (AQI) and Phase 2.1 (steering vectors), drawn from plain data.

Every function takes dicts / sequences / arrays / tensors, returns the matplotlib
:class:`~matplotlib.figure.Figure`, and, when given ``path``, also saves it as a PNG atomically
(rendered to bytes, then :func:`mahals.checkpoint.atomic_write_bytes`).

Figures are built with :class:`matplotlib.figure.Figure` on the Agg canvas, never through
``pyplot``: no display is needed, the interactive backend is left alone, and no figure is kept
alive by pyplot's registry, so there is nothing to close.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.container import Container
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from mahals.aqi.report import OVERALL
from mahals.io import atomic_write_bytes

if TYPE_CHECKING:
    from mahals.aqi import AQIReport

__all__ = [
    "Values",
    "save_png",
    "aqi_bar_plot",
    "aqi_axiom_heatmap",
    "aqi_layer_curves",
    "aqi_category_curves",
    "layer_curve",
    "layer_curves_comparison",
    "explained_variance_plot",
    "model_dimensions_plot",
]

Values = Sequence[float] | np.ndarray | torch.Tensor
"""A 1-D series of numbers: a sequence, a numpy array or a tensor (any device or dtype)."""

AQI_LABEL = "AQI (0–100)"
BAR_COLOUR = "tab:blue"
BASELINE_COLOUR = "tab:orange"
DEFAULT_DPI = 150


def save_png(fig: Figure, path: str | os.PathLike, *, dpi: int = DEFAULT_DPI) -> Path:
    """Render ``fig`` to PNG bytes and write them to ``path`` atomically; returns the path."""
    buffer = BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return atomic_write_bytes(path, buffer.getvalue())


def _wrapped(title: str, width: int = 72) -> str:
    """Long titles (a pair's full display name) broken into lines instead of cut off."""
    return textwrap.fill(title, width)


def _new_figure(
    width: float, height: float, *, n_columns: int = 1, layout: str | None = "constrained"
) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n_columns, squeeze=False)[0]
    return fig, list(axes)


def _finish(fig: Figure, path: str | os.PathLike | None, dpi: int) -> Figure:
    if path is not None:
        save_png(fig, path, dpi=dpi)
    return fig


def _as_series(values: Values, name: str) -> np.ndarray:
    """``values`` as a non-empty 1-D float64 array."""
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu", torch.float64).numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D series, got shape {array.shape}")
    return array


def _relative_depth(n_layers: int) -> np.ndarray:
    """Layer positions ``l / (L - 1)`` in [0, 1]; a single layer sits at 0."""
    return np.linspace(0.0, 1.0, n_layers) if n_layers > 1 else np.zeros(1)


def _rotate_tick_labels(ax: Axes, n_labels: int) -> None:
    if n_labels > 4:
        ax.tick_params(axis="x", labelrotation=30)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")


def aqi_bar_plot(
    scores: Mapping[str, float],
    *,
    ci: Mapping[str, tuple[float, float]] | None = None,
    baseline: str | None = None,
    title: str = "AQI by model",
    path: str | os.PathLike | None = None,
    dpi: int = DEFAULT_DPI,
) -> Figure:
    """One bar per model, highest AQI first (NaN last), each bar labelled with its value.

    Args:
        scores: overall AQI (0–100) per model.
        ci: optional ``(low, high)`` confidence interval per model, drawn as an error bar
            spanning exactly ``low``..``high`` (it need not be centred on the score).
        baseline: a model of ``scores`` to highlight (the Phase 1 baseline).
        title: axes title.
        path: where to save the PNG, if anywhere.
        dpi: PNG resolution.
    """
    if not scores:
        raise ValueError("aqi_bar_plot needs at least one model score")
    if baseline is not None and baseline not in scores:
        raise ValueError(f"baseline {baseline!r} is not one of the scored models {list(scores)}")
    unknown = sorted(set(ci or {}) - set(scores))
    if unknown:
        raise ValueError(f"confidence intervals given for unscored models {unknown}")

    # Highest first; a NaN score (metric undefined) goes last rather than scrambling the order.
    models = sorted(scores, key=lambda model: (math.isnan(scores[model]), -scores[model]))
    heights = [float(scores[model]) for model in models]
    positions = np.arange(len(models))
    fig, (ax,) = _new_figure(max(6.0, 1.0 * len(models) + 2.0), 4.5)
    bars = ax.bar(positions, heights, color=BAR_COLOUR)
    label_heights = np.array(heights)
    legend_handles: list[Artist | Container] = [Patch(color=BAR_COLOUR, label="AQI")]
    if baseline is not None:
        baseline_bar = bars[models.index(baseline)]
        baseline_bar.set_facecolor(BASELINE_COLOUR)
        baseline_bar.set_hatch("//")
        legend_handles.append(
            Patch(facecolor=BASELINE_COLOUR, hatch="//", label=f"baseline ({baseline})")
        )
    if ci:
        with_ci = [i for i, model in enumerate(models) if model in ci]
        lows = np.array([ci[models[i]][0] for i in with_ci], dtype=np.float64)
        highs = np.array([ci[models[i]][1] for i in with_ci], dtype=np.float64)
        if np.any(lows > highs):
            raise ValueError("every confidence interval must satisfy low <= high")
        interval_bars = ax.errorbar(
            positions[with_ci],
            (lows + highs) / 2,
            yerr=(highs - lows) / 2,
            fmt="none",
            ecolor="black",
            capsize=4,
            label="confidence interval",
        )
        legend_handles.append(interval_bars)
        label_heights[with_ci] = np.fmax(label_heights[with_ci], highs)
    finite = label_heights[np.isfinite(label_heights)]
    zoomed = bool(finite.size) and finite.min() >= 0 and finite.max() <= 20
    for position, height, label_height in zip(positions, heights, label_heights, strict=True):
        ax.annotate(
            f"{height:.2f}" if zoomed else f"{height:.1f}",
            (position, label_height),
            xytext=(0, 3),
            textcoords="offset points",
            ha="center",
            va="bottom",
        )
    ax.set_xticks(positions, models)
    _rotate_tick_labels(ax, len(models))
    if zoomed:
        # Every bar is small (principled AQI near chance): zoom in so bars and intervals can be
        # told apart; the axis label keeps the 0–100 scale explicit.
        ax.set_ylim(0, 1.25 * max(finite.max(), 0.1))
    elif finite.size and finite.min() >= 0 and finite.max() <= 100:
        ax.set_ylim(0, 108)  # the 0–100 scale, with room for the value labels
    ax.set_title(_wrapped(title))
    ax.set_xlabel("Model")
    ax.set_ylabel(AQI_LABEL)
    if len(legend_handles) > 1:
        ax.legend(handles=legend_handles, loc="upper right")
    return _finish(fig, path, dpi)


def aqi_axiom_heatmap(
    table: Mapping[str, Mapping[str, float]],
    *,
    title: str = "AQI by axiom and model",
    path: str | os.PathLike | None = None,
    dpi: int = DEFAULT_DPI,
) -> Figure:
    """Models (rows, in the order given) × axioms (columns, in first-seen order), 0–100 scale.

    Each cell is annotated with its value; a model without a score for an axiom shows "n/a".
    """
    if not table or not any(table.values()):
        raise ValueError("aqi_axiom_heatmap needs at least one model with one axiom score")
    models = list(table)
    axioms = list(dict.fromkeys(axiom for row in table.values() for axiom in row))
    grid = np.array(
        [[float(table[model].get(axiom, np.nan)) for axiom in axioms] for model in models]
    )
    fig, (ax,) = _new_figure(max(6.0, 1.1 * len(axioms) + 3.0), max(3.5, 0.6 * len(models) + 2.0))
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=100.0, aspect="auto")
    fig.colorbar(image, ax=ax, label=AQI_LABEL)
    for row, col in np.ndindex(grid.shape):
        value = grid[row, col]
        text = "n/a" if math.isnan(value) else f"{value:.1f}"
        dark_cell = not math.isnan(value) and (value < 25 or value > 75)
        ax.text(col, row, text, ha="center", va="center", color="white" if dark_cell else "black")
    ax.set_xticks(range(len(axioms)), axioms)
    ax.set_yticks(range(len(models)), models)
    _rotate_tick_labels(ax, len(axioms))
    ax.set_title(_wrapped(title))
    ax.set_xlabel("Axiom")
    ax.set_ylabel("Model")
    return _finish(fig, path, dpi)


def layer_curves_comparison(
    curves: Mapping[str, Values],
    *,
    title: str,
    ylabel: str,
    relative_depth: bool = True,
    bands: Mapping[str, tuple[Values, Values]] | None = None,
    path: str | os.PathLike | None = None,
    dpi: int = DEFAULT_DPI,
) -> Figure:
    """One line per model (or model pair) over its layers, with a legend.

    Args:
        curves: a per-layer series per model; models may have different depths.
        title: axes title.
        ylabel: what the series measures.
        relative_depth: plot against ``layer / (L - 1)`` so models of different depth overlay;
            otherwise against the layer index.
        bands: optional ``(low, high)`` per-layer series per model, shaded around its line
            (e.g. bootstrap confidence intervals).
        path: where to save the PNG, if anywhere.
        dpi: PNG resolution.
    """
    if not curves:
        raise ValueError("layer_curves_comparison needs at least one curve")
    unknown = sorted(set(bands or {}) - set(curves))
    if unknown:
        raise ValueError(f"bands given for models without a curve {unknown}")
    fig, (ax,) = _new_figure(8.0, 4.5)
    for model, values in curves.items():
        series = _as_series(values, f"curve of {model!r}")
        x = _relative_depth(series.size) if relative_depth else np.arange(series.size)
        (line,) = ax.plot(x, series, marker=".", label=model)
        if bands and model in bands:
            low = _as_series(bands[model][0], f"lower band of {model!r}")
            high = _as_series(bands[model][1], f"upper band of {model!r}")
            if not low.size == high.size == series.size:
                raise ValueError(
                    f"bands of {model!r} have {low.size} and {high.size} layers, "
                    f"its curve {series.size}"
                )
            ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_title(_wrapped(title))
    if relative_depth:
        ax.set_xlabel("Relative depth (layer / (L − 1))")
    else:
        ax.set_xlabel("Layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return _finish(fig, path, dpi)


def aqi_layer_curves(
    curves: Mapping[str, Values],
    *,
    bands: Mapping[str, tuple[Values, Values]] | None = None,
    title: str = "AQI over depth",
    path: str | os.PathLike | None = None,
    dpi: int = DEFAULT_DPI,
) -> Figure:
    """AQI per layer for each model against relative depth, with optional CI ``bands``."""
    return layer_curves_comparison(
        curves,
        title=title,
        ylabel=AQI_LABEL,
        relative_depth=True,
        bands=bands,
        path=path,
        dpi=dpi,
    )


def aqi_category_curves(
    report: AQIReport, *, ax: Axes | None = None, categories: Sequence[str] | None = None
) -> Axes:
    """AQI over depth of each category of one report (overall in bold black), with the
    per-layer confidence band when present; draws on ``ax`` (default: a new Agg figure) and
    returns it. Raises if a category has no per-layer curve (reference mode)."""
    if ax is None:
        _, (ax,) = _new_figure(7.0, 4.0)
    names = list(categories) if categories is not None else list(report.scores)
    for name in names:
        score = report.scores[name]
        if score.layer_aqi is None:
            raise ValueError(f"{name!r} has no per-layer curve ({report.mode} mode)")
        is_overall = name == OVERALL
        (line,) = ax.plot(
            report.layers,
            score.layer_aqi,
            marker="o",
            markersize=3,
            linewidth=2.5 if is_overall else 1.2,
            color="black" if is_overall else None,
            label=name,
        )
        if score.layer_ci_low is not None:
            ax.fill_between(
                report.layers,
                score.layer_ci_low,
                score.layer_ci_high,
                color=line.get_color(),
                alpha=0.15,
                linewidth=0,
            )
    ax.axhline(0.0, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("layer")
    ax.set_ylabel("AQI (0 = chance, 100 = perfect)")
    ax.set_title(f"{report.model}: AQI over depth")
    ax.legend(fontsize="small", ncol=2)
    return ax


def layer_curve(
    values: Values,
    *,
    title: str,
    ylabel: str,
    path: str | os.PathLike | None = None,
    dpi: int = DEFAULT_DPI,
) -> Figure:
    """One per-layer series against the layer index (e.g. cos(instruct, base), or L2 norms)."""
    series = _as_series(values, "values")
    fig, (ax,) = _new_figure(7.0, 4.0)
    ax.plot(np.arange(series.size), series, marker="o", markersize=3)
    ax.set_title(_wrapped(title))
    ax.set_xlabel("Layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return _finish(fig, path, dpi)


def explained_variance_plot(
    ratios: Values,
    *,
    layer: int,
    top_k: int = 20,
    title: str | None = None,
    path: str | os.PathLike | None = None,
    dpi: int = DEFAULT_DPI,
) -> Figure:
    """Explained-variance ratio of the first ``top_k`` SVD components (bars, 0-based) and
    their cumulative sum (line) for one layer."""
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    all_ratios = _as_series(ratios, "ratios")
    if np.any(all_ratios < 0):
        raise ValueError("explained-variance ratios must be non-negative")
    shown = all_ratios[:top_k]
    components = np.arange(shown.size)
    # Fixed margins instead of the constrained-layout solver: this plot is drawn once per layer
    # and the solver is 60 % of its cost.
    fig, (ax,) = _new_figure(7.0, 4.0, layout=None)
    heading = _wrapped(title or f"Explained variance, layer {layer}")
    fig.subplots_adjust(left=0.1, right=0.97, top=0.91 - 0.06 * heading.count("\n"), bottom=0.13)
    ax.bar(components, shown, color=BAR_COLOUR, label="per component")
    ax.plot(
        components, np.cumsum(shown), color="black", marker="o", markersize=3, label="cumulative"
    )
    ax.set_ylim(0, 1.05)
    ax.set_title(heading)
    ax.set_xlabel("Component")
    ax.set_ylabel("Explained variance ratio")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(loc="best")
    return _finish(fig, path, dpi)


def explained_variance_plots(
    ratios_per_layer: Sequence[Values] | np.ndarray | torch.Tensor,
    layers: Sequence[int],
    folder: str | os.PathLike,
    *,
    top_k: int = 20,
    title: str = "Explained variance",
    dpi: int = 100,
) -> list[Path]:
    """:func:`explained_variance_plot` for every layer, saved as
    ``folder/layer_{l}_explained_variance.png``; returns the paths in layer order.

    Drawn at a lower resolution than the summary plots: there is one per layer (42 for
    Gemma-2), and rendering them dominated a GPU run's wall time. (Worker processes did not
    help: each must import torch before it draws anything.)
    """
    if len(ratios_per_layer) != len(layers):
        raise ValueError(f"{len(ratios_per_layer)} ratio rows for {len(layers)} layers")
    folder = Path(folder)
    paths = []
    for ratios, layer in zip(ratios_per_layer, layers, strict=True):
        path = folder / f"layer_{layer}_explained_variance.png"
        explained_variance_plot(
            ratios, layer=layer, top_k=top_k, title=f"{title}, layer {layer}", path=path, dpi=dpi
        )
        paths.append(path)
    return paths


def model_dimensions_plot(
    dims: Mapping[str, tuple[int, int]],
    *,
    title: str = "Model dimensions",
    path: str | os.PathLike | None = None,
    dpi: int = DEFAULT_DPI,
) -> Figure:
    """Two bar panels, in the order given: number of layers and hidden size per model."""
    if not dims:
        raise ValueError("model_dimensions_plot needs at least one model")
    models = list(dims)
    fig, (layers_ax, width_ax) = _new_figure(max(9.0, 1.4 * len(models) + 3.0), 4.5, n_columns=2)
    for ax, column, panel_title, ylabel in (
        (layers_ax, 0, "Layers", "Number of layers"),
        (width_ax, 1, "Hidden size", "d_model"),
    ):
        bars = ax.bar(range(len(models)), [dims[model][column] for model in models])
        ax.bar_label(bars, padding=2)
        ax.margins(y=0.12)
        ax.set_xticks(range(len(models)), models)
        _rotate_tick_labels(ax, len(models))
        ax.set_title(panel_title)
        ax.set_xlabel("Model")
        ax.set_ylabel(ylabel)
    fig.suptitle(_wrapped(title))
    return _finish(fig, path, dpi)
