"""Entry points: :func:`evaluate_activations` (pooled activations → :class:`AQIReport`) and
:func:`evaluate` (model + labelled dataset → :class:`AQIReport`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from mahals.aqi._inputs import LayerSpec, category_rows, select_layers, unsafe_mask
from mahals.aqi.indices import as_layered
from mahals.aqi.principled import _principled_scores
from mahals.aqi.reference import reference_aqi
from mahals.aqi.report import AQIReport, Mode

if TYPE_CHECKING:
    from mahals.data import SafetyDataset
    from mahals.models import MahalsModel

__all__ = ["evaluate", "evaluate_activations"]


def evaluate_activations(
    activations: Float[Tensor, "n layer d"] | Float[Tensor, "n d"],
    axioms: Sequence[str],
    labels: Sequence[str] | Bool[Tensor, " n"],
    *,
    mode: Mode = "principled",
    layer: LayerSpec = -1,
    layer_ids: Sequence[int] | None = None,
    pca_dim: int | None = None,
    n_bootstrap: int = 200,
    seed: int | None = None,
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
            for a single layer), any float dtype, CPU or GPU.
        axioms: category of each row ``[n]``.
        labels: ``"safe"``/``"unsafe"`` per row, or a bool tensor (True = unsafe).
        mode: ``"principled"`` (default, see :data:`PRINCIPLED_MODE_NOTES`) or ``"reference"``
            (t-SNE + run-relative normalisation; needs a single layer).
        layer: position(s) along the layer axis: an int (default ``-1``, the last), a list, or
            ``"all"``/``None``. Several layers give per-layer curves and a headline pooled over
            them (the mean of the per-layer AQIs).
        layer_ids: the model's layer number of each position of the layer axis (default
            ``0..layer-1``); used to label :attr:`AQIReport.layers`.
        pca_dim: principled mode: reduce each category's activations per layer to this many
            principal components first (``None`` = use the activations as they are).
        n_bootstrap: principled mode: bootstrap resamples for the confidence intervals (0 =
            none).
        seed: bootstrap seed (principled, default 0) or t-SNE seed (reference, default 42).
        confidence: two-sided level of the bootstrap intervals.
        gamma: reference mode: weight of ``CHI_norm`` in the AQI.
        device: where the metrics run (default: the activations' device).
    """
    layered = as_layered(activations)
    n_rows, n_layers = layered.shape[:2]
    positions = select_layers(layer, n_layers)
    ids = list(layer_ids) if layer_ids is not None else list(range(n_layers))
    if len(ids) != n_layers:
        raise ValueError(f"{len(ids)} layer_ids for {n_layers} layers")
    report_layers = tuple(int(ids[p]) for p in positions)
    is_unsafe = unsafe_mask(labels, n_rows)

    if mode == "reference":
        if len(positions) != 1:
            raise ValueError("reference mode scores a single layer (the seed used the last)")
        report = reference_aqi(
            layered[:, positions[0]],
            axioms,
            is_unsafe,
            seed=42 if seed is None else seed,
            gamma=gamma,
        )
        return replace(report, model=model_name, dataset=dataset_name, layers=report_layers)
    if mode != "principled":
        raise ValueError(f"mode must be 'principled' or 'reference', got {mode!r}")

    seed = 0 if seed is None else seed
    scores = _principled_scores(
        layered,
        torch.tensor(positions, device=layered.device),
        category_rows(axioms, is_unsafe),
        is_unsafe,
        pca_dim=pca_dim,
        n_bootstrap=n_bootstrap,
        seed=seed,
        confidence=confidence,
        device=torch.device(device) if device is not None else layered.device,
    )
    settings = {
        "pca_dim": pca_dim,
        "n_bootstrap": n_bootstrap,
        "seed": seed,
        "confidence": confidence,
        "interval": "bootstrap percentile, stratified by (axiom, label) cell, bias-shifted",
        "pooling": "single layer" if len(positions) == 1 else "mean of per-layer AQI",
    }
    return AQIReport(
        model=model_name,
        mode="principled",
        layers=report_layers,
        scores=scores,
        settings=settings,
        dataset=dataset_name,
    )


def evaluate(
    model: MahalsModel | None,
    dataset: SafetyDataset,
    *,
    mode: Mode = "principled",
    layer: LayerSpec = -1,
    pca_dim: int | None = None,
    n_bootstrap: int = 200,
    seed: int | None = None,
    batch_size: int | None = None,
    activations: Float[Tensor, "n layer d"] | None = None,
    confidence: float = 0.95,
    device: str | torch.device | None = None,
    model_name: str | None = None,
) -> AQIReport:
    """Model + labelled dataset → :class:`AQIReport` in one call.

    Captures mean-pooled residual-stream activations of ``dataset.texts`` at the selected
    layers with :func:`mahals.capture.capture` (reference mode: one layer, by default the
    last), then calls :func:`evaluate_activations` (see there for the other arguments).

    Args:
        model: from :func:`mahals.load_model` (may be ``None`` when ``activations`` is given).
        dataset: prompts with an axiom and a ``"safe"``/``"unsafe"`` label each.
        layer: model layer(s): an int (default ``-1``, the last), a list, or ``"all"``/``None``.
        batch_size: capture batch size (default: the registry's).
        activations: precomputed ``[n_texts, layer, d]`` activations of ``dataset.texts`` (all
            layers, in order) instead of capturing; ``layer`` then selects along their layer
            axis.
        model_name: name in the report (default: the model's).
    """
    options = {
        "mode": mode,
        "pca_dim": pca_dim,
        "n_bootstrap": n_bootstrap,
        "seed": seed,
        "confidence": confidence,
        "device": device,
        "dataset_name": dataset.name,
    }
    if activations is not None:
        return evaluate_activations(
            activations,
            dataset.axioms,
            dataset.labels,
            layer=layer,
            model_name=model_name or (model.name if model is not None else "unknown"),
            **options,
        )
    if model is None:
        raise ValueError("pass a model or precomputed activations")
    if mode == "reference" and not isinstance(layer, int):
        raise ValueError("reference mode scores a single layer (the seed used the last)")
    from mahals.activations import capture

    captured = capture(
        model,
        list(dataset.texts),
        pool="mean",
        layers=None if layer == "all" else layer,
        batch_size=batch_size,
    )
    return evaluate_activations(
        captured.tensor,
        dataset.axioms,
        dataset.labels,
        layer="all",
        layer_ids=captured.layers,
        model_name=model_name or captured.model,
        **options,
    )
