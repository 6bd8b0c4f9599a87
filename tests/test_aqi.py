"""Tests of mahals.aqi against independent references (sklearn, float64 numpy, REFERENCE.md)."""

from __future__ import annotations

import itertools
import math
import random
from types import SimpleNamespace

import matplotlib
import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE
from sklearn.metrics import calinski_harabasz_score
from threadpoolctl import threadpool_limits

from mahals.aqi import (
    OVERALL,
    AQIReport,
    calinski_harabasz,
    evaluate,
    evaluate_activations,
    pca_reduce,
    reference_aqi,
    reference_normalize,
    xie_beni,
)
from mahals.data import SafetyDataset

matplotlib.use("Agg")


def geometry_aqi(*args, **kwargs) -> AQIReport:
    """The variance-share score (mode "geometry", called "principled" before issue 9)."""
    return evaluate_activations(*args, mode="geometry", **kwargs)


WORKED_CHI = [559.93, 664.57, 451.91, 776.91, 464.95, 683.10, 627.55, 989.71]
WORKED_XB = [0.1777, 0.1497, 0.2202, 0.1281, 0.2140, 0.1457, 0.1586, 0.7068]


def numpy_xie_beni(points: np.ndarray, labels: np.ndarray) -> float:
    """Xie–Beni of hard clusters, written directly from its definition in float64."""
    points = points.astype(np.float64)
    clusters = np.unique(labels)
    centroids = {c: points[labels == c].mean(axis=0) for c in clusters}
    compactness = sum(((points[labels == c] - centroids[c]) ** 2).sum() for c in clusters)
    separation = min(
        ((centroids[a] - centroids[b]) ** 2).sum() for a, b in itertools.combinations(clusters, 2)
    )
    return compactness / (len(points) * separation)


def synthetic_run(
    n_per_cell: int = 20,
    n_layers: int = 3,
    d: int = 12,
    shifts: dict[str, float] | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, list[str], list[str]]:
    """Activations ``[n, layer, d]`` for axioms whose unsafe rows are shifted by ``shift`` along
    the first feature at every layer but the first (0 = pure noise)."""
    shifts = shifts if shifts is not None else {"noise": 0.0, "planted": 8.0, "mild": 1.5}
    generator = torch.Generator().manual_seed(seed)
    blocks, axioms, labels = [], [], []
    for name, shift in shifts.items():
        for label in ("safe", "unsafe"):
            block = torch.randn(n_per_cell, n_layers, d, generator=generator)
            if label == "unsafe":
                block[:, 1:, 0] += shift
            blocks.append(block)
            axioms += [name] * n_per_cell
            labels += [label] * n_per_cell
    # Interleave rows so categories are not stored contiguously.
    order = torch.randperm(len(axioms), generator=generator)
    x = torch.cat(blocks)[order]
    return x, [axioms[i] for i in order], [labels[i] for i in order]


# ---------------------------------------------------------------------------- cluster indices


def test_chi_matches_sklearn_per_layer_and_for_2d_input():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(90, 4, 7, generator=generator)
    labels = torch.randint(0, 3, (90,), generator=generator)
    x[labels == 1] += 0.8
    chi = calinski_harabasz(x, labels)
    assert chi.shape == (4,) and chi.dtype == torch.float64
    expected = [
        calinski_harabasz_score(x[:, layer].double().numpy(), labels.numpy()) for layer in range(4)
    ]
    np.testing.assert_allclose(chi.numpy(), expected, rtol=1e-10)
    single = calinski_harabasz(x[:, 2], labels)
    assert single.ndim == 0
    assert float(single) == pytest.approx(expected[2], rel=1e-10)


def test_xie_beni_matches_numpy_reference_with_int_and_bool_labels():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(70, 3, 5, generator=generator)
    labels = torch.randint(0, 4, (70,), generator=generator)
    x[labels == 2, :, 1] += 2.0
    xb = xie_beni(x, labels)
    expected = [numpy_xie_beni(x[:, layer].numpy(), labels.numpy()) for layer in range(3)]
    np.testing.assert_allclose(xb.numpy(), expected, rtol=1e-10)
    mask = labels >= 2
    np.testing.assert_allclose(
        xie_beni(x, mask).numpy(),
        [numpy_xie_beni(x[:, layer].numpy(), mask.numpy()) for layer in range(3)],
        rtol=1e-10,
    )


def test_chi_times_xb_identity_for_two_clusters():
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(53, 5, 9, generator=generator)
    labels = torch.rand(53, generator=generator) < 0.3
    n, n_unsafe = 53, int(labels.sum())
    product = calinski_harabasz(x, labels) * xie_beni(x, labels)
    expected = (n - 2) * n_unsafe * (n - n_unsafe) / n**2
    np.testing.assert_allclose(product.numpy(), expected, rtol=1e-12)


def test_vectorised_over_layers_equals_per_layer_loop():
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(40, 6, 11, generator=generator) * torch.linspace(0.1, 50, 6)[None, :, None]
    labels = torch.randint(0, 2, (40,), generator=generator)
    for metric in (calinski_harabasz, xie_beni):
        vectorised = metric(x, labels)
        looped = torch.stack([metric(x[:, layer], labels) for layer in range(6)])
        torch.testing.assert_close(vectorised, looped, rtol=1e-13, atol=0)


def test_metrics_reject_a_single_cluster():
    with pytest.raises(ValueError, match="clusters"):
        calinski_harabasz(torch.randn(10, 3), torch.zeros(10, dtype=torch.long))


# ------------------------------------------------------------------------------ reference mode


def test_reference_normalize_reproduces_the_worked_example():
    chi_norm, xb_norm, aqi = reference_normalize(WORKED_CHI, WORKED_XB)
    assert len(chi_norm) == len(xb_norm) == len(aqi) == 8
    assert chi_norm[0] == pytest.approx(20.09, abs=1e-3 * 100)
    assert chi_norm[0] == pytest.approx(20.0855, abs=1e-3)
    assert xb_norm[0] == pytest.approx(46.43, abs=0.05)
    assert aqi[0] == pytest.approx(33.26, abs=0.03)
    assert (chi_norm[-1], xb_norm[-1], aqi[-1]) == pytest.approx((100.0, 10.0, 55.0), abs=1e-9)
    assert min(chi_norm) == 0.0


def test_reference_normalize_follows_input_order_and_gamma():
    permutation = [3, 0, 7, 5, 1, 6, 2, 4]
    base = reference_normalize(WORKED_CHI, WORKED_XB, gamma=0.25)
    shuffled = reference_normalize(
        [WORKED_CHI[i] for i in permutation], [WORKED_XB[i] for i in permutation], gamma=0.25
    )
    for base_values, shuffled_values in zip(base, shuffled, strict=True):
        assert shuffled_values == pytest.approx([base_values[i] for i in permutation], abs=1e-12)
    chi_norm, xb_norm, aqi = base
    assert aqi == pytest.approx(
        [0.25 * c + 0.75 * x for c, x in zip(chi_norm, xb_norm, strict=True)]
    )


def test_reference_normalize_handles_two_categories_and_rejects_bad_input():
    chi_norm, xb_norm, aqi = reference_normalize([1.0, 3.0], [0.5, 0.2])
    # Two values: median is their mean and the IQR is half their distance.
    sigmoid = 1 / (1 + math.exp(-(0.5 - 0.35) / (0.15 + 1e-9)))
    assert chi_norm == [0.0, 100.0]
    assert xb_norm[0] == pytest.approx(max(10.0, 100 * (1 - sigmoid)))
    with pytest.raises(ValueError, match=">= 2"):
        reference_normalize([1.0], [0.5])
    with pytest.raises(ValueError, match="equal length"):
        reference_normalize([1.0, 2.0, 3.0], [0.5, 0.2])


@pytest.fixture(scope="module")
def reference_run():
    """A small reference-mode run. t-SNE is the slow part, and on a busy machine its OpenMP
    threads are much slower than one thread (its result does not depend on the count)."""
    x, axioms, labels = synthetic_run(n_per_cell=10, n_layers=2, d=6, shifts={"a": 0.0, "b": 4.0})
    with threadpool_limits(limits=1):
        report = evaluate_activations(x, axioms, labels, mode="reference", model_name="m")
    return x, axioms, labels, report


def test_reference_mode_runs_tsne_per_category_and_clamps_perplexity(reference_run):
    x, axioms, labels, report = reference_run
    assert (report.mode, report.layers, report.model) == ("reference", (1,), "m")
    # Independent check of one category: sklearn's t-SNE with the reference settings, then
    # sklearn's CHI and the numpy XB on its coordinates.
    rows = [i for i, a in enumerate(axioms) if a == "a"]
    with threadpool_limits(limits=1):
        tsne = TSNE(n_components=3, perplexity=19.0, max_iter=500, random_state=42)
        coordinates = tsne.fit_transform(x[rows, -1].numpy())
    unsafe = np.array([labels[i] == "unsafe" for i in rows])
    assert report["a"].chi_raw == pytest.approx(
        calinski_harabasz_score(coordinates, unsafe), rel=1e-6
    )
    assert report["a"].xb_raw == pytest.approx(numpy_xie_beni(coordinates, unsafe), rel=1e-6)
    assert list(report.scores) == ["a", "b", OVERALL]
    assert report.settings["tsne_perplexity"] == {"a": 19.0, "b": 19.0, OVERALL: 39.0}
    assert report.settings["perplexity_clamped"] == ["a", "b", OVERALL]
    scores = list(report.scores.values())
    chi_norm, xb_norm, aqi = reference_normalize(
        [s.chi_raw for s in scores], [s.xb_raw for s in scores]
    )
    assert [s.aqi for s in scores] == aqi
    assert [s.chi_norm for s in scores] == chi_norm
    assert all(s.ci_low is None and s.layer_aqi is None for s in scores)
    # Under the test-time type checker the shape annotation rejects it before the ValueError.
    with pytest.raises((ValueError, TypeError), match=r"\[n, d\]|'n d'"):
        reference_aqi(x, axioms, labels)


# ------------------------------------------------------------------------------ geometry mode


def test_geometry_raw_indices_match_sklearn_and_numpy_at_each_layer():
    x, axioms, labels = synthetic_run()
    report = geometry_aqi(x, axioms, labels, layer="all", n_bootstrap=0)
    rows = [i for i, a in enumerate(axioms) if a == "mild"]
    unsafe = np.array([labels[i] == "unsafe" for i in rows])
    score = report["mild"]
    for layer in range(3):
        points = x[rows, layer].double().numpy()
        assert score.layer_chi[layer] == pytest.approx(
            calinski_harabasz_score(points, unsafe), rel=1e-10
        )
        assert score.layer_xb[layer] == pytest.approx(numpy_xie_beni(points, unsafe), rel=1e-10)
    assert [(s.n_safe, s.n_unsafe) for s in report.scores.values()] == [(20, 20)] * 3 + [(60, 60)]
    for category in report.scores.values():
        n = category.n_safe + category.n_unsafe
        identity = (n - 2) * category.n_safe * category.n_unsafe / n**2
        assert category.chi_raw * category.xb_raw == pytest.approx(identity, rel=1e-10)
        for chi, xb in zip(category.layer_chi, category.layer_xb, strict=True):
            assert chi * xb == pytest.approx(identity, rel=1e-10)


def test_geometry_aqi_is_the_chance_corrected_variance_share():
    x, axioms, labels = synthetic_run()
    x = x * torch.tensor([1.0, 0.1, 20.0])[None, :, None]  # layers of very different scales
    report = geometry_aqi(x, axioms, labels, layer="all", n_bootstrap=0)
    rows = [i for i, a in enumerate(axioms) if a == "planted"]
    unsafe = np.array([labels[i] == "unsafe" for i in rows])
    n = len(rows)
    per_layer = []
    scaled_layers = []
    for layer in range(3):
        points = x[rows, layer].double().numpy()
        total = ((points - points.mean(0)) ** 2).sum()
        within = sum(((points[m] - points[m].mean(0)) ** 2).sum() for m in (unsafe, ~unsafe))
        per_layer.append(100 * (1 - (n - 1) / (n - 2) * within / total))
        scaled_layers.append(points / math.sqrt(total))
    score = report["planted"]
    assert score.layer_aqi == pytest.approx(per_layer, rel=1e-10)
    # Pooled = mean over layers = the AQI of the unit-variance-scaled concatenation.
    assert score.aqi == pytest.approx(np.mean(per_layer), rel=1e-10)
    concatenated = np.concatenate(scaled_layers, axis=1)
    assert score.chi_raw == pytest.approx(calinski_harabasz_score(concatenated, unsafe), rel=1e-10)
    assert score.xb_raw == pytest.approx(numpy_xie_beni(concatenated, unsafe), rel=1e-10)


def test_geometry_mode_gives_identical_bits_on_rerun():
    x, axioms, labels = synthetic_run()
    first = geometry_aqi(x, axioms, labels, layer="all", n_bootstrap=50, seed=7)
    second = geometry_aqi(
        x.clone(), list(axioms), list(labels), layer="all", n_bootstrap=50, seed=7
    )
    assert first.to_dict() == second.to_dict()
    other_seed = geometry_aqi(x, axioms, labels, layer="all", n_bootstrap=50, seed=8)
    assert other_seed["mild"].aqi == first["mild"].aqi
    assert other_seed["mild"].ci_low != first["mild"].ci_low


def test_category_scores_do_not_depend_on_other_categories_in_the_run():
    x, axioms, labels = synthetic_run()
    full = geometry_aqi(x, axioms, labels, layer="all", n_bootstrap=40)
    keep = [i for i, a in enumerate(axioms) if a != "mild"]  # shifts the others' positions
    subset = geometry_aqi(
        x[keep], [axioms[i] for i in keep], [labels[i] for i in keep], layer="all", n_bootstrap=40
    )
    assert subset.axioms == ["noise", "planted"]
    for name in subset.axioms:
        for field, value in vars(subset[name]).items():
            expected = vars(full[name])[field]
            if value is None or isinstance(value, str | int):
                assert value == expected
            else:
                assert value == pytest.approx(expected, rel=1e-12, abs=1e-12), (name, field)
    assert subset.overall.aqi != pytest.approx(full.overall.aqi)


def test_planted_separation_scores_higher_than_noise():
    x, axioms, labels = synthetic_run(n_per_cell=30)
    report = geometry_aqi(x, axioms, labels, layer=-1)
    assert report["planted"].aqi > 50
    assert report["noise"].aqi < 10
    assert report["planted"].aqi > report["mild"].aqi > report["noise"].aqi
    curve = report["planted"].layer_aqi
    assert len(curve) == 1 and curve[0] == report["planted"].aqi
    depth = geometry_aqi(x, axioms, labels, layer="all")
    first_layer, *later = depth["planted"].layer_aqi  # the shift is absent at layer 0
    assert first_layer < 10 and min(later) > 50


@pytest.mark.parametrize("d", [4, 256])
def test_bootstrap_interval_contains_point_estimate(d):
    x, axioms, labels = synthetic_run(n_per_cell=25, n_layers=2, d=d)
    report = geometry_aqi(x, axioms, labels, layer="all", n_bootstrap=200)
    for score in report.scores.values():
        assert score.ci_low < score.aqi < score.ci_high, score.category
        for low, point, high in zip(
            score.layer_ci_low, score.layer_aqi, score.layer_ci_high, strict=True
        ):
            assert low < point < high, score.category
    assert report["noise"].ci_low < 0 < report["noise"].ci_high
    assert report["planted"].ci_low > report["noise"].ci_high


def test_chance_level_is_zero_over_all_relabellings():
    # Exactly zero on average over every assignment of 4 safe / 4 unsafe labels, whatever the
    # data: the chance correction is exact under permutation.
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(8, 2, 5, generator=generator) * torch.tensor([1.0, 30.0])[None, :, None]
    scores = []
    for unsafe_rows in itertools.combinations(range(8), 4):
        labels = ["unsafe" if i in unsafe_rows else "safe" for i in range(8)]
        report = geometry_aqi(x, ["a"] * 8, labels, layer="all", n_bootstrap=0)
        scores.append(report["a"].layer_aqi)
    assert np.mean(scores, axis=0) == pytest.approx([0.0, 0.0], abs=1e-9)
    assert np.min(scores) >= -100 / (8 - 2) - 1e-9


def test_chance_level_near_zero_for_unrelated_labels():
    x, axioms, labels = synthetic_run(n_per_cell=20, shifts={"noise": 0.0}, n_layers=1, d=32)
    rng = random.Random(5)
    scores = []
    for _ in range(60):
        shuffled = rng.sample(labels, len(labels))
        scores.append(geometry_aqi(x, axioms, shuffled, n_bootstrap=0)["noise"].aqi)
    assert abs(np.mean(scores)) < 3 * np.std(scores) / math.sqrt(len(scores))


def test_pca_reduce_matches_sklearn_pca_up_to_sign_with_fixed_signs():
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(30, 2, 10, generator=generator) @ torch.randn(10, 10, generator=generator)
    reduced = pca_reduce(x, 3)
    assert reduced.shape == (30, 2, 3) and reduced.dtype == torch.float64
    for layer in range(2):
        expected = PCA(n_components=3, svd_solver="full").fit_transform(
            x[:, layer].double().numpy()
        )
        np.testing.assert_allclose(np.abs(reduced[:, layer].numpy()), np.abs(expected), atol=1e-8)
        largest = reduced[:, layer].abs().argmax(dim=0)
        assert (reduced[:, layer].gather(0, largest[None])[0] > 0).all()
    torch.testing.assert_close(pca_reduce(-x, 3), reduced, rtol=0, atol=1e-10)
    assert pca_reduce(x[:, 0], 3).shape == (30, 3)


def test_pca_keeping_every_component_leaves_scores_unchanged():
    x, axioms, labels = synthetic_run(d=6)
    plain = geometry_aqi(x, axioms, labels, layer="all", n_bootstrap=20)
    reduced = geometry_aqi(x, axioms, labels, layer="all", n_bootstrap=20, pca_dim=6)
    for name in plain.scores:
        assert reduced[name].aqi == pytest.approx(plain[name].aqi, rel=1e-9)
        assert reduced[name].ci_low == pytest.approx(plain[name].ci_low, rel=1e-9)
    truncated = geometry_aqi(x, axioms, labels, layer="all", n_bootstrap=0, pca_dim=1)
    assert truncated["planted"].aqi != pytest.approx(plain["planted"].aqi)
    assert truncated.settings["pca_dim"] == 1


def test_bool_label_tensor_equals_string_labels():
    x, axioms, labels = synthetic_run()
    mask = torch.tensor([label == "unsafe" for label in labels])
    assert geometry_aqi(x, axioms, mask, n_bootstrap=10) == geometry_aqi(
        x, axioms, labels, n_bootstrap=10
    )


def test_invalid_inputs_name_the_problem():
    x, axioms, labels = synthetic_run(n_per_cell=3)
    one_class = ["safe" if a == "mild" else label for a, label in zip(axioms, labels, strict=True)]
    with pytest.raises(ValueError, match="mild"):
        geometry_aqi(x, axioms, one_class)
    with pytest.raises(ValueError, match="Unsafe"):
        geometry_aqi(x, axioms, [label.title() for label in labels])
    with pytest.raises(ValueError, match="reserved"):
        geometry_aqi(x, [OVERALL] * len(axioms), labels)
    with pytest.raises(IndexError):
        geometry_aqi(x, axioms, labels, layer=3)
    with pytest.raises(ValueError, match="single layer"):
        evaluate_activations(x, axioms, labels, mode="reference", layer="all")


# ------------------------------------------------------------------------------ report objects


def test_evaluate_with_precomputed_activations_and_a_dataset():
    x, axioms, labels = synthetic_run()
    dataset = SafetyDataset(
        texts=tuple(f"prompt {i}" for i in range(len(axioms))),
        axioms=tuple(axioms),
        labels=tuple(labels),
        name="synthetic",
    )
    report = evaluate(
        None,
        dataset,
        mode="geometry",
        activations=x,
        layer=[1, -1],
        n_bootstrap=20,
        model_name="toy",
    )
    assert (report.model, report.dataset, report.mode, report.layers) == (
        "toy",
        "synthetic",
        "geometry",
        (1, 2),
    )
    assert report.axioms == dataset.categories
    assert report == geometry_aqi(
        x[:, 1:],
        axioms,
        labels,
        layer="all",
        layer_ids=[1, 2],
        n_bootstrap=20,
        model_name="toy",
        dataset_name="synthetic",
    )


def test_evaluate_captures_mean_pooled_activations_of_the_requested_layers(monkeypatch):
    import sys

    capture_module = sys.modules[
        "mahals.activations"
    ]  # the attribute mahals.capture is the function
    x, axioms, labels = synthetic_run()
    dataset = SafetyDataset(tuple(map(str, range(len(axioms)))), tuple(axioms), tuple(labels))
    calls = []

    def fake_capture(model, texts, *, pool, sinks, layers, batch_size):
        calls.append((model, texts, pool, sinks, layers, batch_size))
        captured_layers = (5, 7) if layers is None else (7,)
        tensor = x[:, 1:] if layers is None else x[:, -1:]
        return SimpleNamespace(tensor=tensor, layers=captured_layers, model="fake-model")

    monkeypatch.setattr(capture_module, "capture", fake_capture)
    report = evaluate("MODEL", dataset, mode="geometry", layer="all", n_bootstrap=0, batch_size=4)
    assert calls == [("MODEL", list(dataset.texts), "mean", "first", None, 4)]
    assert (report.model, report.layers) == ("fake-model", (5, 7))
    assert (
        report["planted"].layer_aqi
        == geometry_aqi(x[:, 1:], axioms, labels, layer="all", n_bootstrap=0)["planted"].layer_aqi
    )
    with threadpool_limits(limits=1):
        reference = evaluate("MODEL", dataset, mode="reference")
    assert calls[-1][3:5] == ("none", -1)  # the original study's plain mean, last layer
    assert reference.layers == (7,) and reference.mode == "reference"


def test_json_round_trip_is_lossless(tmp_path, reference_run):
    x, axioms, labels = synthetic_run()
    geometry = geometry_aqi(x, axioms, labels, layer="all", n_bootstrap=30, model_name="m")
    reference = reference_run[-1]
    for report in (geometry, reference):
        path = tmp_path / f"{report.mode}.json"
        report.to_json(path)
        assert AQIReport.from_json(path) == report
        assert AQIReport.from_dict(report.to_dict()) == report
    assert not [p for p in tmp_path.iterdir() if p.suffix != ".json"]


def test_markdown_table_has_one_row_per_category(reference_run):
    x, axioms, labels = synthetic_run()
    report = geometry_aqi(x, axioms, labels, n_bootstrap=20)
    lines = report.to_markdown().strip().splitlines()
    assert lines[0] == "| category | AQI | CI | CHI | XB | n_safe | n_unsafe |"
    assert [line.split("|")[1].strip() for line in lines[2:]] == [
        "mild",
        "noise",
        "planted",
        OVERALL,
    ]
    planted = lines[4].split("|")
    assert planted[2].strip() == f"{report['planted'].aqi:.2f}"
    reference_lines = reference_run[-1].to_markdown().splitlines()
    assert reference_lines[0] == (
        "| category | AQI | CHI | XB | CHI_norm | XB_norm | n_safe | n_unsafe |"
    )
    assert len(reference_lines) == 2 + 3


def test_pandas_table_and_curve_plot(reference_run):
    x, axioms, labels = synthetic_run()
    report = geometry_aqi(x, axioms, labels, layer="all", n_bootstrap=20, model_name="toy")
    frame = report.to_pandas()
    assert list(frame.index) == ["mild", "noise", "planted", OVERALL]
    assert frame.loc["planted", "aqi"] == report["planted"].aqi
    ax = report.plot_curve()
    assert ax.get_xlabel() == "layer"
    assert [line.get_label() for line in ax.get_lines()[:4]] == list(report.scores)
    assert list(ax.get_lines()[2].get_ydata()) == list(report["planted"].layer_aqi)
    reference = reference_run[-1]
    with pytest.raises(ValueError, match="per-layer"):
        reference.plot_curve()
    matplotlib.pyplot.close("all")
