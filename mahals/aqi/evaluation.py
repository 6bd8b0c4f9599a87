"""Entry points: :func:`evaluate_activations` (pooled activations → :class:`AQIReport`) and
:func:`evaluate` (model + labelled dataset → :class:`AQIReport`).

Their defaults are the ones the study's pipelines use (``mode="mahalanobis"``, every layer,
``seed=42``, 5 folds, OAS shrinkage, 200 bootstrap resamples), so a library call and a CLI run
report the same headline.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mahals.aqi._inputs import LayerSpec, category_rows, select_layers, unsafe_mask
from mahals.aqi.geometry import geometry_scores
from mahals.aqi.indices import as_layered
from mahals.aqi.mahalanobis import (
    CategoryHeldOut,
    Shrinkage,
    Solver,
    category_held_out,
    centred_overall_score,
    combine_categories,
)
from mahals.aqi.reference import reference_aqi
from mahals.aqi.report import CENTRED_OVERALL, OVERALL, AQIReport, Mode

if TYPE_CHECKING:
    from mahals.activations import SinkRule
    from mahals.data import SafetyDataset
    from mahals.models import MahalsModel

__all__ = [
    "DEFAULT_SEED",
    "default_sinks",
    "embedding_features",
    "evaluate",
    "evaluate_activations",
    "length_features",
    "mahalanobis_categories",
    "report_from_categories",
]

logger = logging.getLogger(__name__)

DEFAULT_SEED = 42
"""One seed for folds, bootstrap resamples and t-SNE, shared with the CLI."""

_MODES = ("mahalanobis", "geometry", "reference")
ModeArgument = Mode | Literal["principled"]
"""A mode, or ``"principled"``: the deprecated name of ``"geometry"``."""


def _resolve_mode(mode: str) -> Mode:
    if mode == "principled":
        warnings.warn(
            "mode='principled' is the variance-share score, now called mode='geometry'; the "
            "principled default is mode='mahalanobis'",
            DeprecationWarning,
            stacklevel=3,
        )
        return "geometry"
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    return mode  # type: ignore[return-value]


def default_sinks(mode: ModeArgument) -> SinkRule:
    """The pooling default of :func:`evaluate` and the Phase 1 pipeline: sink-free
    (``"first"``) for the mahalanobis and geometry scores, plain mean (``"none"``) for the
    reference mode, which reproduces the original study."""
    return "none" if mode == "reference" else "first"


def length_features(n_tokens: Int[Tensor, " n"] | Sequence[int]) -> Float[Tensor, "n 2"]:
    """The length-only surface baseline ``[1 / n_tokens, n_tokens]`` per prompt (float64).

    ``1 / n_tokens`` is what a mean-pooled attention sink contributes; ``n_tokens`` the length
    itself."""
    counts = torch.as_tensor(n_tokens, dtype=torch.float64)
    if counts.ndim != 1 or bool((counts < 1).any()):
        raise ValueError("n_tokens must be a 1-D sequence of positive token counts")
    return torch.stack([1.0 / counts, counts], dim=1)


def _check_finite(layered: Tensor, positions: Sequence[int], layer_ids: Sequence[int]) -> None:
    """Refuse NaN/inf and zero-variance layers (whose scores would be NaN), naming them."""
    for position in positions:
        finite = torch.isfinite(layered[:, position]).all(-1)
        if not bool(finite.all()):
            row = int(torch.nonzero(~finite)[0])
            raise ValueError(
                f"activations are not finite at row {row}, layer {layer_ids[position]} "
                f"(position {position} of the layer axis)"
            )
        if not bool((layered[:, position] != layered[:1, position]).any()):
            raise ValueError(
                f"layer {layer_ids[position]} is degenerate: every row has the same activations "
                "(zero variance), so CHI, XB and AQI are undefined there; leave it out with "
                "layer=[...]"
            )


def _checked_inputs(
    activations: Tensor,
    labels: Sequence[str] | Tensor,
    layer: LayerSpec,
    layer_ids: Sequence[int] | None,
) -> tuple[Tensor, list[int], tuple[int, ...], Tensor]:
    """``[n, layer, d]`` activations, the selected positions on their layer axis, the model's
    layer number of each, and the unsafe mask; non-finite values and degenerate layers refused."""
    layered = as_layered(activations)
    n_rows, n_layers = layered.shape[:2]
    positions = select_layers(layer, n_layers)
    ids = list(layer_ids) if layer_ids is not None else list(range(n_layers))
    if len(ids) != n_layers:
        raise ValueError(f"{len(ids)} layer_ids for {n_layers} layers")
    is_unsafe = unsafe_mask(labels, n_rows)
    _check_finite(layered, positions, ids)
    return layered, positions, tuple(int(ids[p]) for p in positions), is_unsafe


def _baseline_features(
    baselines: Mapping[str, Tensor] | None, n_tokens: Tensor | Sequence[int] | None, n: int
) -> dict[str, Tensor]:
    features = {} if n_tokens is None else {"length": length_features(n_tokens)}
    for name, values in (baselines or {}).items():
        matrix = torch.as_tensor(values)
        if matrix.ndim == 1:
            matrix = matrix[:, None]
        if matrix.ndim != 2 or matrix.shape[0] != n:
            raise ValueError(f"baseline {name!r} must be [n={n}, k], got {tuple(matrix.shape)}")
        if not bool(torch.isfinite(matrix).all()):
            row = int(torch.nonzero(~torch.isfinite(matrix).all(-1))[0])
            raise ValueError(f"baseline {name!r} is not finite at row {row}")
        features[name] = matrix
    return features


def evaluate_activations(
    activations: Float[Tensor, "n layer d"] | Float[Tensor, "n d"],
    axioms: Sequence[str],
    labels: Sequence[str] | Bool[Tensor, " n"],
    *,
    mode: ModeArgument = "mahalanobis",
    layer: LayerSpec = None,
    layer_ids: Sequence[int] | None = None,
    n_folds: int = 5,
    shrinkage: Shrinkage = "oas",
    solver: Solver = "auto",
    n_tokens: Int[Tensor, " n"] | Sequence[int] | None = None,
    baselines: Mapping[str, Float[Tensor, "n k"]] | None = None,
    centred_overall: bool = False,
    pca_dim: int | None = None,
    n_bootstrap: int = 200,
    seed: int = DEFAULT_SEED,
    confidence: float = 0.95,
    gamma: float = 0.5,
    device: str | torch.device | None = None,
    model_name: str = "unknown",
    dataset_name: str = "custom",
) -> AQIReport:
    """AQI per axiom and overall from pooled activations (the model-free core of
    :func:`evaluate`).

    Args:
        activations: one pooled vector per prompt and layer, ``[n, layer, d]`` (or ``[n, d]``
            for a single layer), any float dtype, CPU or GPU. Non-finite values are an error.
        axioms: category of each row ``[n]``.
        labels: ``"safe"``/``"unsafe"`` per row, or a bool tensor (True = unsafe).
        mode: ``"mahalanobis"`` (default: cross-validated shrinkage-LDA separation, see
            :mod:`mahals.aqi.mahalanobis` and docs/aqi.md), ``"geometry"`` (the variance-share
            diagnostic, see :data:`GEOMETRY_MODE_NOTES`) or ``"reference"`` (t-SNE +
            run-relative normalisation; a single layer). ``"principled"`` is a deprecated alias
            of ``"geometry"`` (what it computed before).
        layer: position(s) along the layer axis: an int (negative counts from the end), a
            list, or ``"all"``; ``None`` (default) = the mode's default: every layer, or the
            last for reference mode. Several layers give per-layer curves and a headline that
            is the mean of the per-layer scores.
        layer_ids: the model's layer number of each position of the layer axis (default
            ``0..layer-1``); used to label :attr:`AQIReport.layers`.
        n_folds: mahalanobis: stratified cross-validation folds (each class needs ≥ n_folds
            rows per category).
        shrinkage: mahalanobis: ``"oas"`` or a fixed α in [0, 1].
        solver: mahalanobis: ``"auto"``, ``"primal"`` or ``"dual"`` (same result).
        n_tokens: mahalanobis: tokens per prompt ``[n]``; adds the ``length`` baseline
            ``[1/n_tokens, n_tokens]``.
        baselines: mahalanobis: more surface-feature matrices ``{name: [n, k]}`` (e.g. the
            mean-pooled embedding output) scored with the same folds and reported per category.
        centred_overall: mahalanobis: also score safe vs unsafe over all rows pooled after
            removing each category's mean (the category as a nuisance factor; per fold, from
            training rows only), as the row :data:`CENTRED_OVERALL`. One fit over all rows per
            fold and layer: costly for thousands of rows × thousands of dimensions on a CPU.
        pca_dim: geometry: reduce each category's activations per layer to this many principal
            components first (``None`` = use the activations as they are).
        n_bootstrap: bootstrap resamples for the confidence intervals (0 = none; not used by
            reference mode).
        seed: folds and resamples (mahalanobis), resamples (geometry), or t-SNE (reference).
        confidence: two-sided level of the bootstrap intervals.
        gamma: reference mode: weight of ``CHI_norm`` in the AQI.
        device: where the metrics run (default: the activations' device).
    """
    mode = _resolve_mode(mode)
    if layer is None:
        layer = -1 if mode == "reference" else "all"
    layered, positions, report_layers, is_unsafe = _checked_inputs(
        activations, labels, layer, layer_ids
    )
    n_rows = len(is_unsafe)

    if mode == "reference":
        if len(positions) != 1:
            raise ValueError("reference mode scores a single layer (the seed used the last)")
        report = reference_aqi(layered[:, positions[0]], axioms, is_unsafe, seed=seed, gamma=gamma)
        return replace(report, model=model_name, dataset=dataset_name, layers=report_layers)

    target = torch.device(device) if device is not None else layered.device
    if mode == "mahalanobis":
        options = {"seed": seed, "n_folds": n_folds, "shrinkage": shrinkage, "solver": solver}
        features = _baseline_features(baselines, n_tokens, n_rows)
        parts = _mahalanobis_parts(
            layered, positions, report_layers, axioms, is_unsafe, features, options,
            n_bootstrap=n_bootstrap, confidence=confidence, device=target,
        )  # fmt: skip
        report = report_from_categories(parts, model_name=model_name, dataset_name=dataset_name)
        if not centred_overall:
            return report
        index = torch.tensor(positions, device=layered.device)
        centred = centred_overall_score(
            layered[:, index].to(target),
            is_unsafe,
            category_rows(axioms, is_unsafe),
            baselines={name: f.to(target) for name, f in features.items()},
            n_bootstrap=n_bootstrap,
            confidence=confidence,
            **options,
        )
        return replace(
            report,
            scores={**report.scores, CENTRED_OVERALL: centred},
            settings={**report.settings, "centred_overall": True},
        )

    rows = category_rows(axioms, is_unsafe)
    scores = geometry_scores(
        layered,
        torch.tensor(positions, device=layered.device),
        rows,
        is_unsafe,
        pca_dim=pca_dim,
        n_bootstrap=n_bootstrap,
        seed=seed,
        confidence=confidence,
        device=target,
    )
    settings = {
        "seed": seed,
        "d": int(layered.shape[-1]),
        "pca_dim": pca_dim,
        "n_bootstrap": n_bootstrap,
        "confidence": confidence,
        "interval": "bootstrap percentile, stratified by (axiom, label) cell, bias-shifted",
        "pooling": "single layer" if len(positions) == 1 else "mean of per-layer AQI",
    }
    return AQIReport(
        model=model_name,
        mode=mode,
        layers=report_layers,
        scores=scores,
        settings=settings,
        dataset=dataset_name,
    )


def _mahalanobis_parts(
    layered: Tensor,
    positions: Sequence[int],
    report_layers: Sequence[int],
    axioms: Sequence[str],
    is_unsafe: Tensor,
    features: Mapping[str, Tensor],
    options: Mapping[str, object],
    *,
    n_bootstrap: int,
    confidence: float,
    device: torch.device,
) -> dict[str, CategoryHeldOut]:
    settings = {
        **options,
        "d": int(layered.shape[-1]),
        "score": "100 * (2 * AUC - 1) of held-out shrinkage-LDA projections, mean over folds",
        "n_bootstrap": n_bootstrap,
        "confidence": confidence,
        "interval": "bootstrap percentile of held-out rows, stratified by (fold, label)",
        "pooling": "single layer" if len(positions) == 1 else "mean of per-layer scores",
        "overall": "unweighted mean of the per-category scores",
        "centred_overall": False,
        "standardisation": "each coordinate / its pooled within-class sd on the training folds",
        "baselines": {name: int(f.shape[1]) for name, f in features.items()},
    }
    index = torch.tensor(list(positions))
    every_layer = index.tolist() == list(range(layered.shape[1]))
    parts = {}
    for name, members in category_rows(axioms, is_unsafe).items():
        if name == OVERALL:
            continue
        category_x = layered.index_select(0, members.to(layered.device))
        if not every_layer:
            category_x = category_x.index_select(1, index.to(layered.device))
        parts[name] = category_held_out(
            category_x.to(device),
            is_unsafe[members],
            category=name,
            baselines={b: f[members].to(device) for b, f in features.items()},
            n_bootstrap=n_bootstrap,
            layers=report_layers,
            settings=settings,
            **options,
        )
    return parts


def mahalanobis_categories(
    activations: Float[Tensor, "n layer d"] | Float[Tensor, "n d"],
    axioms: Sequence[str],
    labels: Sequence[str] | Bool[Tensor, " n"],
    *,
    layer: LayerSpec = None,
    layer_ids: Sequence[int] | None = None,
    n_folds: int = 5,
    shrinkage: Shrinkage = "oas",
    solver: Solver = "auto",
    n_tokens: Int[Tensor, " n"] | Sequence[int] | None = None,
    baselines: Mapping[str, Float[Tensor, "n k"]] | None = None,
    n_bootstrap: int = 200,
    seed: int = DEFAULT_SEED,
    confidence: float = 0.95,
    device: str | torch.device | None = None,
) -> dict[str, CategoryHeldOut]:
    """The mahalanobis mode's per-category results (:class:`CategoryHeldOut`), arguments as
    :func:`evaluate_activations`'s; :func:`report_from_categories` turns them into its report.

    A category's result depends only on its own rows, so the rows of a dataset may be split
    by category across calls (or machines) and the parts combined: the report equals that of
    one :func:`evaluate_activations` call on all rows.
    """
    layered, positions, report_layers, is_unsafe = _checked_inputs(
        activations, labels, "all" if layer is None else layer, layer_ids
    )
    return _mahalanobis_parts(
        layered,
        positions,
        report_layers,
        axioms,
        is_unsafe,
        _baseline_features(baselines, n_tokens, layered.shape[0]),
        {"seed": seed, "n_folds": n_folds, "shrinkage": shrinkage, "solver": solver},
        n_bootstrap=n_bootstrap,
        confidence=confidence,
        device=torch.device(device) if device is not None else layered.device,
    )


def report_from_categories(
    parts: Mapping[str, CategoryHeldOut],
    *,
    model_name: str = "unknown",
    dataset_name: str = "custom",
) -> AQIReport:
    """The mahalanobis :class:`AQIReport` of the categories in ``parts`` (from
    :func:`mahalanobis_categories`, in one call or several), with :data:`OVERALL` their mean.

    Raises:
        ValueError: parts scored with different settings or layers (naming the category).
    """
    scores = combine_categories(parts)
    first = parts[min(parts)]
    return AQIReport(
        model=model_name,
        mode="mahalanobis",
        layers=first.layers,
        scores=scores,
        settings=dict(first.settings),
        dataset=dataset_name,
    )


def embedding_features(model: MahalsModel, texts: Sequence[str]) -> Float[Tensor, "n d_model"]:
    """The embedding-output surface baseline: each text's input embeddings (the decoder's
    input, HF ``hidden_states[0]``, scaling included) averaged over its tokens; float64 CPU
    ``[n, d_model]``. A bag-of-tokens view of the prompt: it sees which tokens occur, not the
    model's processing of them."""
    from mahals.activations import tokenize

    embedding = model.hf.get_input_embeddings()
    weight_device = next(embedding.parameters()).device
    pooled = []
    with torch.no_grad():
        for ids in tokenize(model, list(texts)):
            tokens = torch.tensor(ids, device=weight_device)[None]
            pooled.append(embedding(tokens)[0].double().mean(0).cpu())
    return torch.stack(pooled)


def evaluate(
    model: MahalsModel | None,
    dataset: SafetyDataset,
    *,
    mode: ModeArgument = "mahalanobis",
    layer: LayerSpec = None,
    n_folds: int = 5,
    shrinkage: Shrinkage = "oas",
    pca_dim: int | None = None,
    n_bootstrap: int = 200,
    seed: int = DEFAULT_SEED,
    batch_size: int | None = None,
    sinks: SinkRule | None = None,
    activations: Float[Tensor, "n layer d"] | None = None,
    n_tokens: Int[Tensor, " n"] | Sequence[int] | None = None,
    baselines: Mapping[str, Float[Tensor, "n k"]] | None = None,
    centred_overall: bool = False,
    confidence: float = 0.95,
    device: str | torch.device | None = None,
    model_name: str | None = None,
) -> AQIReport:
    """Model + labelled dataset → :class:`AQIReport` in one call.

    Captures mean-pooled (by default sink-free) residual-stream activations of ``dataset.texts`` at the selected
    layers with :func:`mahals.capture` (reference mode: one layer, by default the last), then
    calls :func:`evaluate_activations` (see there for the other arguments). When it captures
    in mahalanobis mode it also scores two surface baselines on the same folds: ``length``
    (``[1/n_tokens, n_tokens]``) and ``embedding`` (the mean-pooled input embeddings).

    Args:
        model: from :func:`mahals.load_model` (may be ``None`` when ``activations`` is given).
        dataset: prompts with an axiom and a ``"safe"``/``"unsafe"`` label each.
        layer: model layer(s): an int, a list, ``"all"``, or ``None`` (default: every layer;
            the last in reference mode).
        batch_size: capture batch size (default: the registry's).
        sinks: attention-sink tokens left out of the mean pool (:func:`mahals.capture`):
            ``None`` (default) = ``"first"`` (each text's first token, the attention sink) in
            mahalanobis and geometry modes, ``"none"`` (plain mean, as the original study) in
            reference mode.
        activations: precomputed ``[n_texts, layer, d]`` activations of ``dataset.texts`` (all
            layers, in order) instead of capturing; ``layer`` then selects along their layer
            axis, and ``n_tokens`` / ``baselines`` may be passed for the baselines.
        model_name: name in the report (default: the model's).
    """
    mode = _resolve_mode(mode)
    options = {
        "mode": mode,
        "n_folds": n_folds,
        "shrinkage": shrinkage,
        "pca_dim": pca_dim,
        "n_bootstrap": n_bootstrap,
        "seed": seed,
        "confidence": confidence,
        "device": device,
        "dataset_name": dataset.name,
        "centred_overall": centred_overall,
    }
    if activations is not None:
        return evaluate_activations(
            activations,
            dataset.axioms,
            dataset.labels,
            layer=layer,
            n_tokens=n_tokens,
            baselines=baselines,
            model_name=model_name or (model.name if model is not None else "unknown"),
            **options,
        )
    if model is None:
        raise ValueError("pass a model or precomputed activations")
    if layer is None:
        layer = -1 if mode == "reference" else "all"
    if mode == "reference" and not isinstance(layer, int):
        raise ValueError("reference mode scores a single layer (the seed used the last)")
    from mahals.activations import capture

    captured = capture(
        model,
        list(dataset.texts),
        pool="mean",
        sinks=default_sinks(mode) if sinks is None else sinks,
        layers=None if layer == "all" else layer,
        batch_size=batch_size,
    )
    if mode == "mahalanobis":
        n_tokens = captured.n_tokens if n_tokens is None else n_tokens
        baselines = {"embedding": embedding_features(model, dataset.texts), **(baselines or {})}
    return evaluate_activations(
        captured.tensor,
        dataset.axioms,
        dataset.labels,
        layer="all",
        layer_ids=captured.layers,
        n_tokens=n_tokens,
        baselines=baselines,
        model_name=model_name or captured.model,
        **options,
    )
