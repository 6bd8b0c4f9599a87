"""Tests of the mahalanobis AQI mode (issue 9) against closed forms, scikit-learn, and its own
invariances."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import norm
from sklearn.covariance import OAS
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

from mahals.aqi import (
    CENTRED_OVERALL,
    OVERALL,
    CategoryHeldOut,
    category_centred_projections,
    cross_validated_projections,
    evaluate,
    evaluate_activations,
    lda_direction,
    mahalanobis_categories,
    report_from_categories,
    stratified_folds,
)
from mahals.data import SafetyDataset


def planted(
    n_per_class: int, d: int, shift: float, seed: int, n_layers: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Isotropic Gaussian rows, unsafe ones shifted by ``shift`` along the first coordinate;
    labels alternate."""
    generator = torch.Generator().manual_seed(seed)
    shape = (2 * n_per_class, d) if n_layers is None else (2 * n_per_class, n_layers, d)
    x = torch.randn(*shape, generator=generator, dtype=torch.float64)
    is_unsafe = torch.arange(2 * n_per_class) % 2 == 1
    x[is_unsafe, ..., 0] += shift
    return x, is_unsafe


def score(x, is_unsafe, **options) -> float:
    report = evaluate_activations(
        x, ["a"] * len(is_unsafe), is_unsafe, n_bootstrap=options.pop("n_bootstrap", 0), **options
    )
    return report["a"].aqi


# ------------------------------------------------------------------------- what the score means


def test_shuffled_labels_score_zero_on_average():
    x, is_unsafe = planted(60, 20, shift=2.0, seed=0)
    generator = torch.Generator().manual_seed(1)
    scores = [
        score(x, is_unsafe[torch.randperm(len(is_unsafe), generator=generator)]) for _ in range(20)
    ]
    half_width = 1.96 * np.std(scores, ddof=1) / math.sqrt(len(scores))
    assert abs(np.mean(scores)) < half_width
    assert score(x, is_unsafe) > 60  # the same rows with their real labels


@pytest.mark.parametrize("delta", [1.0, 2.5])
def test_two_gaussians_match_the_closed_forms(delta):
    # Shared non-spherical covariance Σ = AᵀA; the unsafe mean is shifted by δ with
    # √(δᵀ Σ⁻¹ δ) = Δ. Equal priors: AUC = Φ(Δ/√2), η² of the projection = Δ²/(Δ² + 4).
    generator = torch.Generator().manual_seed(2)
    d, n_per_class = 4, 1500
    mixing = torch.randn(d, d, generator=generator, dtype=torch.float64) + 2 * torch.eye(d)
    is_unsafe = torch.arange(2 * n_per_class) % 2 == 1
    x = torch.randn(2 * n_per_class, d, generator=generator, dtype=torch.float64) @ mixing
    direction = torch.randn(d, generator=generator, dtype=torch.float64)
    shift = direction @ mixing  # in the white coordinates the shift is `direction`
    x[is_unsafe] += delta * shift / direction.norm()
    report = evaluate_activations(x, ["a"] * len(x), is_unsafe, n_bootstrap=200)
    result = report["a"]
    expected_auc = norm.cdf(delta / math.sqrt(2))
    assert result.ci_low <= 100 * (2 * expected_auc - 1) <= result.ci_high
    assert result.auc == pytest.approx(expected_auc, abs=0.015)
    assert result.eta2 == pytest.approx(delta**2 / (delta**2 + 4), abs=0.02)


def test_a_huge_nuisance_dimension_or_sink_coordinate_leaves_the_score_unchanged():
    # Label-free extra coordinates with 10⁶× the variance of a signal dimension: a random
    # nuisance, a mean-pooled attention sink h_sink / n_tokens, and a constant giant
    # coordinate. Standardising each coordinate on the training folds makes the first two one
    # ordinary unit-variance dimension (the same score as at 1×) and drops the third; the
    # variance-share score collapses.
    x, is_unsafe = planted(80, 50, shift=3.0, seed=3)
    generator = torch.Generator().manual_seed(4)
    n_tokens = torch.randint(5, 40, (len(x),), generator=generator).double()
    nuisance = torch.randn(len(x), 1, generator=generator, dtype=torch.float64)
    sink = 1.0 / n_tokens[:, None]
    sink /= sink.std()
    clean = score(x, is_unsafe)
    assert clean > 80
    for extra in (nuisance, sink):
        at_unit_variance = score(torch.cat([x, extra], 1), is_unsafe)
        assert at_unit_variance == pytest.approx(clean, abs=2.0)  # one more noise dimension
        huge = score(torch.cat([x, 1e3 * extra], 1), is_unsafe)
        assert huge == pytest.approx(at_unit_variance, abs=1e-9)
    constant = torch.full((len(x), 1), 2.3e4, dtype=torch.float64)
    assert score(torch.cat([x, constant], 1), is_unsafe) == pytest.approx(clean, abs=1e-9)
    geometry = score(x, is_unsafe, mode="geometry")
    assert score(torch.cat([x, 1e3 * nuisance], 1), is_unsafe, mode="geometry") < geometry / 10


def test_rescaling_coordinates_leaves_the_score_unchanged():
    x, is_unsafe = planted(50, 12, shift=1.5, seed=5, n_layers=2)
    x = torch.cat([x, 30 * torch.randn(100, 2, 1, dtype=torch.float64)], -1)  # anisotropic
    generator = torch.Generator().manual_seed(6)
    per_coordinate = 10 ** (8 * torch.rand(13, generator=generator, dtype=torch.float64) - 4)
    base = evaluate_activations(x, ["a"] * 100, is_unsafe)
    for transformed in (1e-3 * x, x * per_coordinate):
        other = evaluate_activations(transformed, ["a"] * 100, is_unsafe)
        assert other["a"].layer_aqi == pytest.approx(base["a"].layer_aqi, abs=1e-9)
        assert other["a"].ci_low == pytest.approx(base["a"].ci_low, abs=1e-9)


def test_rotating_near_isotropic_activations_moves_the_score_within_sampling_error():
    # Standardising per coordinate is not rotation-invariant (docs/aqi.md); on data whose
    # within-class covariance is near a multiple of the identity, a rotation changes the
    # score by less than its bootstrap interval's half-width.
    x, is_unsafe = planted(100, 12, shift=1.5, seed=5)
    base = evaluate_activations(x, ["a"] * 200, is_unsafe)["a"]
    half_width = (base.ci_high - base.ci_low) / 2
    generator = torch.Generator().manual_seed(6)
    for _ in range(3):
        rotation = torch.linalg.qr(torch.randn(12, 12, generator=generator, dtype=torch.float64))
        assert abs(score(x @ rotation[0], is_unsafe) - base.aqi) < half_width / 2


def test_perfect_separation_scores_100_with_an_interval_inside_the_range():
    x, is_unsafe = planted(30, 5, shift=50.0, seed=7)
    result = evaluate_activations(x, ["a"] * 60, is_unsafe)["a"]
    assert result.aqi == 100.0 and result.auc == 1.0
    assert result.ci_high <= 100.0 and result.ci_low <= 100.0
    noise, labels = planted(30, 5, shift=0.0, seed=8)
    for report in (
        evaluate_activations(noise, ["a"] * 60, labels),
        evaluate_activations(noise, ["a"] * 60, labels, mode="geometry"),
    ):
        floor = -100.0 if report.mode == "mahalanobis" else -100.0 / (60 - 2)
        assert floor <= report["a"].ci_low <= report["a"].ci_high <= 100.0


# ------------------------------------------------------------------- equal to scikit-learn's LDA


def standardised(x: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """numpy: the pooled within-class standard deviation per coordinate (divided by n) and the
    class-centred rows."""
    centred = x.copy()
    for label in (False, True):
        centred[labels == label] -= centred[labels == label].mean(0)
    return np.sqrt((centred**2).mean(0)), centred


@pytest.mark.parametrize(("n_per_class", "d"), [(40, 10), (15, 50)])
@pytest.mark.parametrize("shrinkage", [0.3, "oas"])
def test_lda_direction_and_held_out_projections_equal_sklearn(n_per_class, d, shrinkage):
    # scikit-learn's shrinkage LDA fitted on the rows divided by their pooled within-class
    # standard deviation (training rows only), with the same α.
    x, is_unsafe = planted(n_per_class, d, shift=1.0, seed=9)
    x = x @ torch.randn(d, d, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    x = x * torch.logspace(-3, 3, d, dtype=torch.float64)
    rows, labels = x.numpy(), is_unsafe.numpy()
    direction, alpha = lda_direction(x, is_unsafe, shrinkage=shrinkage)
    scale, centred = standardised(rows, labels)
    if shrinkage == "oas":
        expected_alpha = OAS(assume_centered=True).fit(centred / scale).shrinkage_
        assert float(alpha[0]) == pytest.approx(expected_alpha, rel=1e-10)
    reference = LinearDiscriminantAnalysis(solver="lsqr", shrinkage=float(alpha[0]))
    reference.fit(rows / scale, labels)
    np.testing.assert_allclose(direction.numpy() * scale, reference.coef_[0], rtol=1e-7)

    folds = stratified_folds(is_unsafe, 5, torch.Generator().manual_seed(11))
    projections, alphas = cross_validated_projections(x, is_unsafe, folds, shrinkage=shrinkage)
    for fold in range(5):
        train, held_out = (folds != fold).numpy(), (folds == fold).numpy()
        scale, _ = standardised(rows[train], labels[train])
        model = LinearDiscriminantAnalysis(solver="lsqr", shrinkage=float(alphas[fold, 0]))
        model.fit(rows[train] / scale, labels[train])
        expected = model.decision_function(rows[held_out] / scale) - model.intercept_[0]
        np.testing.assert_allclose(projections[0, held_out].numpy(), expected, rtol=1e-7)


def test_coordinates_constant_within_each_class_are_dropped():
    # A coordinate with no within-class variance on the training rows has no noise scale; it
    # is left out, exactly as if it were not there (also when it separates the classes).
    x, is_unsafe = planted(20, 30, shift=1.0, seed=15, n_layers=2)
    indicator = is_unsafe.double()[:, None, None].expand(-1, 2, 1)
    with_constants = torch.cat([x, torch.zeros(40, 2, 1, dtype=torch.float64), indicator], -1)
    folds = stratified_folds(is_unsafe, 5, torch.Generator().manual_seed(16))
    for solver in ("primal", "dual"):
        expected = cross_validated_projections(x, is_unsafe, folds, solver=solver)
        actual = cross_validated_projections(with_constants, is_unsafe, folds, solver=solver)
        for expected_values, values in zip(expected, actual, strict=True):
            torch.testing.assert_close(values, expected_values, rtol=1e-10, atol=1e-12)


def test_dual_path_equals_primal_path():
    x, is_unsafe = planted(25, 40, shift=1.2, seed=12, n_layers=3)
    x[..., 5] *= 300.0  # anisotropic
    folds = stratified_folds(is_unsafe, 5, torch.Generator().manual_seed(13))
    primal = cross_validated_projections(x, is_unsafe, folds, solver="primal")
    dual = cross_validated_projections(x, is_unsafe, folds, solver="dual")
    for primal_values, dual_values in zip(primal, dual, strict=True):
        torch.testing.assert_close(dual_values, primal_values, rtol=1e-8, atol=1e-10)
    primal_direction = lda_direction(x, is_unsafe, solver="primal")
    dual_direction = lda_direction(x, is_unsafe, solver="dual")
    for primal_values, dual_values in zip(primal_direction, dual_direction, strict=True):
        torch.testing.assert_close(dual_values, primal_values, rtol=1e-8, atol=1e-12)


def test_float32_activations_match_the_float64_computation():
    # float32 activations on a CPU use float32 inner products (Gram, scatter); means, variances,
    # shrinkage and solves stay float64. The held-out projections agree with the all-float64
    # computation on the same values to float32 accuracy.
    x, is_unsafe = planted(25, 300, shift=1.0, seed=18, n_layers=2)
    x = (x * torch.logspace(-2, 2, 300, dtype=torch.float64) + 50.0).float()
    folds = stratified_folds(is_unsafe, 5, torch.Generator().manual_seed(19))
    for solver in ("primal", "dual"):
        single = cross_validated_projections(x, is_unsafe, folds, solver=solver)
        double = cross_validated_projections(x.double(), is_unsafe, folds, solver=solver)
        torch.testing.assert_close(single[1], double[1], rtol=1e-5, atol=0.0)
        spread = double[0].std(-1, keepdim=True)
        assert ((single[0] - double[0]).abs() / spread).max() < 1e-4


# ----------------------------------------------------------------------------- report behaviour


def run(seed: int = 14):
    generator = torch.Generator().manual_seed(seed)
    blocks, axioms, labels = [], [], []
    for name, shift in (("noise", 0.0), ("planted", 3.0), ("mild", 1.0)):
        x, is_unsafe = planted(
            20,
            30,
            shift=shift,
            seed=int(torch.randint(1000, (1,), generator=generator)),
            n_layers=3,
        )
        blocks.append(x)
        axioms += [name] * len(x)
        labels += ["unsafe" if u else "safe" for u in is_unsafe]
    order = torch.randperm(len(axioms), generator=generator)
    return torch.cat(blocks)[order], [axioms[i] for i in order], [labels[i] for i in order]


def test_reruns_are_bit_identical():
    x, axioms, labels = run()
    first = evaluate_activations(x, axioms, labels)
    second = evaluate_activations(x.clone(), list(axioms), list(labels))
    assert first.to_dict() == second.to_dict()
    assert evaluate_activations(x, axioms, labels, seed=1).to_dict() != first.to_dict()


def test_a_category_does_not_depend_on_other_categories_rows():
    x, axioms, labels = run()
    full = evaluate_activations(x, axioms, labels)
    keep = [i for i, a in enumerate(axioms) if a != "mild"]
    subset = evaluate_activations(x[keep], [axioms[i] for i in keep], [labels[i] for i in keep])
    for name in ("noise", "planted"):
        assert subset[name] == full[name]
    assert subset.overall.aqi != full.overall.aqi


def test_categories_scored_apart_and_saved_combine_into_the_joint_report(tmp_path):
    x, axioms, labels = run()
    n_tokens = torch.arange(len(axioms)) % 7 + 3
    joint = evaluate_activations(x, axioms, labels, n_tokens=n_tokens, n_bootstrap=30)
    parts = {}
    for name in reversed(sorted(set(axioms))):  # another order than the joint call's
        rows = [i for i, a in enumerate(axioms) if a == name]
        (part,) = mahalanobis_categories(
            x[rows], [name] * len(rows), [labels[i] for i in rows],
            n_tokens=n_tokens[rows], n_bootstrap=30,
        ).values()  # fmt: skip
        identity = {"format": "cache", "model": "m"}  # keys of the caller's own
        part.save(tmp_path / f"{name}.safetensors", identity)
        parts[name] = CategoryHeldOut.load(tmp_path / f"{name}.safetensors", identity)
    combined = report_from_categories(parts)
    assert combined.to_dict() == joint.to_dict()  # the overall interval included, bit for bit
    assert CategoryHeldOut.load(tmp_path / "noise.safetensors", {"model": "other"}) is None
    other = mahalanobis_categories(
        x, axioms, labels, n_tokens=n_tokens, n_bootstrap=30, seed=7
    )
    with pytest.raises(ValueError, match="'planted' was scored with other settings"):
        report_from_categories({**parts, "planted": other["planted"]})


def test_overall_is_the_mean_of_the_categories_and_records_cells_and_width():
    x, axioms, labels = run()
    n_tokens = torch.arange(len(axioms)) % 7 + 3
    report = evaluate_activations(x, axioms, labels, n_tokens=n_tokens)
    categories = [report[name] for name in report.axioms]
    assert report.overall.aqi == pytest.approx(np.mean([s.aqi for s in categories]), abs=1e-12)
    assert report.overall.layer_aqi == pytest.approx(
        np.mean([s.layer_aqi for s in categories], axis=0), abs=1e-12
    )
    assert report.overall.baselines["length"] == pytest.approx(
        np.mean([s.baselines["length"] for s in categories]), abs=1e-12
    )
    assert [(s.n_safe, s.n_unsafe) for s in categories] == [(20, 20)] * 3
    assert report.settings["d"] == 30 and report.settings["n_folds"] == 5
    assert report.layers == (0, 1, 2) and report.settings["seed"] == 42


def test_centred_overall_is_unchanged_by_a_per_category_offset_that_breaks_plain_pooling():
    # A topic shift: each category's rows (both labels) moved by a large offset along the
    # class difference, + for one category and − for another. Pooling the rows as they are
    # mixes the shift into "within class"; removing each category's mean cancels it.
    x, axioms, labels = run()
    unsafe = torch.tensor([label == "unsafe" for label in labels])
    offsets = {"noise": 0.0, "planted": 6.0, "mild": -6.0}
    shifted = x.clone()
    for row, axiom in enumerate(axioms):
        shifted[row, :, 0] += offsets[axiom]
    before = evaluate_activations(x, axioms, labels, centred_overall=True)
    after = evaluate_activations(shifted, axioms, labels, centred_overall=True)
    centred, centred_after = before[CENTRED_OVERALL], after[CENTRED_OVERALL]
    assert centred_after.layer_aqi == pytest.approx(centred.layer_aqi, abs=1e-9)
    assert centred_after.ci_low == pytest.approx(centred.ci_low, abs=1e-9)
    assert centred.n == len(axioms) and before.axioms == ["mild", "noise", "planted"]
    pooled = score(x, unsafe)  # all rows as one category, not centred
    assert score(shifted, unsafe) < pooled - 20.0


def test_category_centred_projections_equal_sklearn_on_centred_standardised_rows():
    x, axioms, labels = run()
    x = x[:, 0].double()
    unsafe = torch.tensor([label == "unsafe" for label in labels])
    names = sorted(set(axioms))
    category = torch.tensor([names.index(a) for a in axioms])
    folds = stratified_folds(unsafe, 5, torch.Generator().manual_seed(17))
    projections, alphas = category_centred_projections(x, unsafe, category, folds)
    rows, is_unsafe = x.numpy(), unsafe.numpy()
    for fold in range(5):
        train, held_out = (folds != fold).numpy(), (folds == fold).numpy()
        centred = rows.copy()
        for index in range(len(names)):
            members = category.numpy() == index
            midpoint = np.mean(
                [rows[members & train & (is_unsafe == label)].mean(0) for label in (0, 1)],
                axis=0,
            )
            centred[members] -= midpoint
        scale, class_centred = standardised(centred[train], is_unsafe[train])
        expected_alpha = OAS(assume_centered=True).fit(class_centred / scale).shrinkage_
        assert float(alphas[fold, 0]) == pytest.approx(expected_alpha, rel=1e-10)
        model = LinearDiscriminantAnalysis(solver="lsqr", shrinkage=expected_alpha)
        model.fit(centred[train] / scale, is_unsafe[train])
        expected = model.decision_function(centred[held_out] / scale) - model.intercept_[0]
        np.testing.assert_allclose(projections[0, held_out].numpy(), expected, rtol=1e-7)


def test_length_baseline_scores_what_length_alone_separates():
    x, axioms, labels = run()
    unsafe = torch.tensor([label == "unsafe" for label in labels])
    n_tokens = torch.where(unsafe, 30, 10) + torch.arange(len(labels)) % 3
    constant = torch.zeros(len(labels), 1)
    report = evaluate_activations(
        x, axioms, labels, n_tokens=n_tokens, baselines={"constant": constant}
    )
    assert all(report[name].baselines["length"] == 100.0 for name in report.axioms)
    assert all(report[name].baselines["constant"] == 0.0 for name in report.axioms)


def test_invalid_inputs_are_errors_that_name_the_problem():
    x, axioms, labels = run()
    constant = x.clone()
    constant[[i for i, a in enumerate(axioms) if a == "mild"], 1] = 1.0
    with pytest.raises(ValueError, match=r"'mild'.*layer position 1"):
        evaluate_activations(constant, axioms, labels)
    broken = x.clone()
    broken[7, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="row 7, layer 2"):
        evaluate_activations(broken, axioms, labels)
    mild_unsafe = [i for i, a in enumerate(axioms) if a == "mild" and labels[i] == "unsafe"]
    few = [i for i in range(len(axioms)) if i not in mild_unsafe[3:]]
    with pytest.raises(ValueError, match="'mild'.*5-fold"):
        evaluate_activations(x[few], [axioms[i] for i in few], [labels[i] for i in few])


def test_principled_is_a_deprecated_alias_of_geometry():
    x, axioms, labels = run()
    with pytest.warns(DeprecationWarning, match="geometry"):
        old = evaluate_activations(x, axioms, labels, mode="principled")
    assert old == evaluate_activations(x, axioms, labels, mode="geometry")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert evaluate_activations(x, axioms, labels).mode == "mahalanobis"


def test_evaluate_and_evaluate_activations_share_defaults():
    x, axioms, labels = run()
    dataset = SafetyDataset(tuple(map(str, range(len(axioms)))), tuple(axioms), tuple(labels))
    from_dataset = evaluate(None, dataset, activations=x, model_name="m")
    direct = evaluate_activations(x, axioms, labels, model_name="m", dataset_name=dataset.name)
    assert from_dataset == direct
    assert (direct.mode, direct.layers, direct.settings["seed"]) == ("mahalanobis", (0, 1, 2), 42)
    assert OVERALL in direct.scores


@pytest.mark.slow
def test_evaluate_on_a_real_model_scores_the_embedding_and_length_baselines(smollm2):
    # The embedding baseline is HF's hidden_states[0] averaged over each text's tokens; the
    # length baseline uses the capture's token counts.
    from mahals.activations import capture, tokenize
    from mahals.aqi import embedding_features

    texts = [f"How do I {verb} a {noun}?" for verb in ("kill", "bake") for noun in ("cake", "lock")]
    features = embedding_features(smollm2, texts)
    for row, ids in enumerate(tokenize(smollm2, texts)):
        with torch.no_grad():
            hidden = smollm2.hf(torch.tensor([ids]), output_hidden_states=True).hidden_states[0]
        torch.testing.assert_close(features[row], hidden[0].double().mean(0), rtol=1e-6, atol=1e-7)
    texts = texts * 5
    dataset = SafetyDataset(
        tuple(texts), ("a",) * 20, tuple("unsafe" if "kill" in t else "safe" for t in texts)
    )
    report = evaluate(smollm2, dataset, layer=[-1], n_bootstrap=0)
    captured = capture(smollm2, texts, pool="mean", sinks="first", layers=[-1])
    expected = evaluate_activations(
        captured.tensor,
        dataset.axioms,
        dataset.labels,
        layer_ids=captured.layers,
        n_tokens=captured.n_tokens,
        baselines={"embedding": embedding_features(smollm2, texts)},
        n_bootstrap=0,
        model_name=smollm2.name,
    )
    assert report == expected
    assert set(report["a"].baselines) == {"embedding", "length"}
