"""Plots: checked through the matplotlib objects they build, and the PNG files they save."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PolyCollection
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from mahals import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SCORES = {"Llama3_8B": 34.8, "Mistral_7B": 55.0, "Falcon_7B": 5.0, "Qwen2_7B": 15.0}
SORTED_MODELS = ["Mistral_7B", "Llama3_8B", "Qwen2_7B", "Falcon_7B"]


def bar_patches(ax) -> list[Rectangle]:
    return [patch for patch in ax.patches if isinstance(patch, Rectangle)]


def tick_labels(ax, axis: str = "x") -> list[str]:
    ticks = ax.get_xticklabels() if axis == "x" else ax.get_yticklabels()
    return [label.get_text() for label in ticks]


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert len(data) > 1000
    assert data.startswith(PNG_MAGIC)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name], "temp file left behind"


def test_aqi_bar_plot_sorts_bars_by_score_and_labels_them(tmp_path: Path) -> None:
    path = tmp_path / "aqi_bar_plot.png"
    fig = plots.aqi_bar_plot(SCORES, path=path)
    (ax,) = fig.axes
    bars = bar_patches(ax)
    assert [bar.get_height() for bar in bars] == [SCORES[m] for m in SORTED_MODELS]
    assert tick_labels(ax) == SORTED_MODELS
    assert [text.get_text() for text in ax.texts] == ["55.0", "34.8", "15.0", "5.0"]
    assert ax.get_title() == "AQI by model"
    assert ax.get_xlabel() == "Model"
    assert ax.get_ylabel() == "AQI (0–100)"
    assert ax.get_legend() is None  # one series: nothing to tell apart
    assert_png(path)


def test_aqi_bar_plot_highlights_the_baseline(tmp_path: Path) -> None:
    fig = plots.aqi_bar_plot(SCORES, baseline="Qwen2_7B")
    (ax,) = fig.axes
    bars = bar_patches(ax)
    baseline_index = SORTED_MODELS.index("Qwen2_7B")
    assert [bar.get_facecolor() for bar in bars] == [
        to_rgba(plots.BASELINE_COLOUR if i == baseline_index else plots.BAR_COLOUR)
        for i in range(len(bars))
    ]
    assert bars[baseline_index].get_hatch() == "//"
    legend_texts = [text.get_text() for text in ax.get_legend().get_texts()]
    assert legend_texts == ["AQI", "baseline (Qwen2_7B)"]


def test_aqi_bar_plot_error_bars_span_exactly_the_intervals() -> None:
    ci = {"Mistral_7B": (50.0, 58.0), "Falcon_7B": (1.0, 12.0)}  # Falcon's is not centred
    fig = plots.aqi_bar_plot(SCORES, ci=ci)
    (ax,) = fig.axes
    (error_lines,) = [c for c in ax.collections if c.get_segments()]
    spans = sorted((seg[0][0], seg[0][1], seg[1][1]) for seg in error_lines.get_segments())
    positions = {m: float(i) for i, m in enumerate(SORTED_MODELS)}
    assert spans == sorted((positions[m], low, high) for m, (low, high) in ci.items())
    assert "confidence interval" in [t.get_text() for t in ax.get_legend().get_texts()]
    falcon_label = ax.texts[SORTED_MODELS.index("Falcon_7B")]
    assert falcon_label.get_text() == "5.0"
    assert falcon_label.xy[1] == 12.0  # value label sits above the error bar


def test_aqi_bar_plot_puts_undefined_scores_last() -> None:
    (ax,) = plots.aqi_bar_plot({"A": 10.0, "B": float("nan"), "C": 30.0, "D": 20.0}).axes
    assert tick_labels(ax) == ["C", "D", "A", "B"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"baseline": "Gemma2_9B"}, "baseline"),
        ({"ci": {"Gemma2_9B": (1.0, 2.0)}}, "unscored"),
        ({"ci": {"Falcon_7B": (9.0, 2.0)}}, "low <= high"),
    ],
)
def test_aqi_bar_plot_rejects_inconsistent_inputs(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plots.aqi_bar_plot(SCORES, **kwargs)


def test_aqi_axiom_heatmap_shows_the_table(tmp_path: Path) -> None:
    table = {
        "Mistral_7B": {"Justice": 60.0, "Privacy": 10.0, "overall": 55.0},
        "Falcon_7B": {"Justice": 5.0, "overall": 7.5},
    }
    path = tmp_path / "aqi_axiom_heatmap.png"
    fig = plots.aqi_axiom_heatmap(table, path=path)
    ax = fig.axes[0]
    (image,) = ax.images
    expected = np.array([[60.0, 10.0, 55.0], [5.0, np.nan, 7.5]])
    np.testing.assert_array_equal(np.asarray(image.get_array()), expected)
    assert image.get_clim() == (0.0, 100.0)
    assert tick_labels(ax, "x") == ["Justice", "Privacy", "overall"]
    assert tick_labels(ax, "y") == ["Mistral_7B", "Falcon_7B"]
    cell_texts = [text.get_text() for text in ax.texts]
    assert cell_texts == ["60.0", "10.0", "55.0", "5.0", "n/a", "7.5"]
    assert (ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) == (
        "AQI by axiom and model",
        "Axiom",
        "Model",
    )
    assert len(fig.axes) == 2  # the heatmap and its colour bar
    assert_png(path)


def test_aqi_layer_curves_overlay_models_on_relative_depth(tmp_path: Path) -> None:
    curves = {
        "Llama3_8B": [10.0, 20.0, 30.0, 40.0, 50.0],
        "Qwen2_7B": torch.tensor([5.0, 15.0, 25.0], dtype=torch.bfloat16),
    }
    bands = {"Qwen2_7B": ([1.0, 10.0, 20.0], [8.0, 20.0, 30.0])}
    path = tmp_path / "aqi_layer_curves.png"
    fig = plots.aqi_layer_curves(curves, bands=bands, path=path)
    (ax,) = fig.axes
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == ["Llama3_8B", "Qwen2_7B"]
    np.testing.assert_allclose(lines[0].get_xdata(), [0.0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(lines[1].get_xdata(), [0.0, 0.5, 1.0])
    np.testing.assert_allclose(lines[1].get_ydata(), [5.0, 15.0, 25.0])
    (band,) = [c for c in ax.collections if isinstance(c, PolyCollection)]
    band_y = band.get_paths()[0].vertices[:, 1]
    assert band_y.min() == 1.0 and band_y.max() == 30.0
    assert ax.get_ylabel() == "AQI (0–100)"
    assert ax.get_xlabel().startswith("Relative depth")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["Llama3_8B", "Qwen2_7B"]
    assert_png(path)


def test_layer_curves_comparison_by_layer_index_and_band_checks() -> None:
    curves = {"Mistral_7B": np.arange(4.0), "Gemma2_9B": np.arange(6.0) * 2}
    fig = plots.layer_curves_comparison(
        curves, title="Steering vector norms", ylabel="L2 norm", relative_depth=False
    )
    (ax,) = fig.axes
    assert len(ax.get_lines()) == 2
    np.testing.assert_array_equal(ax.get_lines()[1].get_xdata(), np.arange(6))
    np.testing.assert_array_equal(ax.get_lines()[1].get_ydata(), np.arange(6.0) * 2)
    assert (ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) == (
        "Steering vector norms",
        "Layer",
        "L2 norm",
    )
    with pytest.raises(ValueError, match="layers"):
        plots.layer_curves_comparison(
            curves, title="t", ylabel="y", bands={"Mistral_7B": ([0.0] * 3, [1.0] * 3)}
        )
    with pytest.raises(ValueError, match="without a curve"):
        plots.layer_curves_comparison(curves, title="t", ylabel="y", bands={"Zephyr": ([], [])})


def test_layer_curve_plots_one_series_over_layers(tmp_path: Path) -> None:
    values = torch.linspace(0.99, 0.7, 32)
    path = tmp_path / "Mistral_7B" / "cosine_similarity.png"
    fig = plots.layer_curve(
        values, title="cos(instruct, base): Mistral_7B", ylabel="cosine similarity", path=path
    )
    (ax,) = fig.axes
    (line,) = ax.get_lines()
    np.testing.assert_array_equal(line.get_xdata(), np.arange(32))
    np.testing.assert_allclose(line.get_ydata(), values.double().numpy())
    assert ax.get_title() == "cos(instruct, base): Mistral_7B"
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("Layer", "cosine similarity")
    assert_png(path)


def test_series_must_be_one_dimensional_and_non_empty() -> None:
    with pytest.raises(ValueError, match="1-D"):
        plots.layer_curve(torch.zeros(2, 3), title="t", ylabel="y")
    with pytest.raises(ValueError, match="non-empty"):
        plots.layer_curve([], title="t", ylabel="y")


def test_explained_variance_plot_shows_top_k_and_cumulative(tmp_path: Path) -> None:
    ratios = np.array([0.5, 0.2, 0.1, 0.08, 0.07, 0.05])
    path = tmp_path / "explained_variances" / "layer_7_explained_variance.png"
    fig = plots.explained_variance_plot(ratios, layer=7, top_k=4, path=path)
    (ax,) = fig.axes
    np.testing.assert_allclose([bar.get_height() for bar in bar_patches(ax)], ratios[:4])
    (cumulative,) = ax.get_lines()
    np.testing.assert_allclose(cumulative.get_ydata(), [0.5, 0.7, 0.8, 0.88])
    np.testing.assert_array_equal(cumulative.get_xdata(), np.arange(4))
    assert ax.get_title() == "Explained variance, layer 7"
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("Component", "Explained variance ratio")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["cumulative", "per component"]
    assert_png(path)


def test_explained_variance_plot_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        plots.explained_variance_plot([0.5, -0.1], layer=0)
    with pytest.raises(ValueError, match="top_k"):
        plots.explained_variance_plot([0.5, 0.5], layer=0, top_k=0)


def test_model_dimensions_plot_has_layer_and_width_panels(tmp_path: Path) -> None:
    dims = {"Mistral_7B": (32, 4096), "Qwen2_7B": (28, 3584), "Gemma2_9B": (42, 3584)}
    path = tmp_path / "model_dimensions.png"
    fig = plots.model_dimensions_plot(dims, path=path)
    layers_ax, width_ax = fig.axes
    assert [bar.get_height() for bar in bar_patches(layers_ax)] == [32, 28, 42]
    assert [bar.get_height() for bar in bar_patches(width_ax)] == [4096, 3584, 3584]
    assert tick_labels(layers_ax) == tick_labels(width_ax) == list(dims)
    assert (layers_ax.get_title(), width_ax.get_title()) == ("Layers", "Hidden size")
    assert (layers_ax.get_ylabel(), width_ax.get_ylabel()) == ("Number of layers", "d_model")
    assert fig.get_suptitle() == "Model dimensions"
    assert_png(path)


def test_figures_use_agg_and_stay_out_of_pyplot() -> None:
    open_before = plt.get_fignums()
    fig = plots.aqi_bar_plot(SCORES)
    assert isinstance(fig, Figure)
    assert isinstance(fig.canvas, FigureCanvasAgg)
    assert plt.get_fignums() == open_before


def test_saving_replaces_an_existing_png(tmp_path: Path) -> None:
    path = tmp_path / "steering_norms_comparison.png"
    path.write_bytes(b"stale")
    plots.layer_curves_comparison({"A": [1.0, 2.0]}, title="t", ylabel="y", path=path)
    assert_png(path)


@pytest.mark.parametrize(
    "call",
    [
        lambda: plots.aqi_bar_plot({}),
        lambda: plots.aqi_axiom_heatmap({"A": {}}),
        lambda: plots.layer_curves_comparison({}, title="t", ylabel="y"),
        lambda: plots.model_dimensions_plot({}),
    ],
)
def test_empty_inputs_are_refused(call) -> None:
    with pytest.raises(ValueError):
        call()


def test_explained_variance_plots_writes_one_png_per_layer(tmp_path):
    from mahals.plots import explained_variance_plots

    ratios = [[0.5, 0.3, 0.2], [0.9, 0.1, 0.0]]
    paths = explained_variance_plots(ratios, [4, 7], tmp_path, title="T")
    assert paths == [tmp_path / "layer_4_explained_variance.png", tmp_path / "layer_7_explained_variance.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
    with pytest.raises(ValueError, match="2 ratio rows for 1 layers"):
        explained_variance_plots(ratios, [4], tmp_path)
