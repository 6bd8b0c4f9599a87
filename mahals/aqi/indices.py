"""Cluster indices of hard clusters — Calinski–Harabasz and Xie–Beni — and a deterministic PCA,
in torch (float64 accumulation, vectorised over layers, CPU or GPU)."""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

__all__ = ["calinski_harabasz", "pca_reduce", "xie_beni"]

_CHUNK_BYTES = 128 * 2**20  # float64 working set per layer chunk


def as_layered(x: Tensor) -> Tensor:
    if x.ndim == 2:
        return x[:, None, :]
    if x.ndim == 3:
        return x
    raise ValueError(f"expected activations [n, d] or [n, layer, d], got shape {tuple(x.shape)}")


def layer_chunks(
    layer_index: Tensor, n_rows: int, d: int, budget: int = _CHUNK_BYTES
) -> list[Tensor]:
    """``layer_index`` split so that one chunk of ``n_rows × d`` float64 values per layer fits
    in ``budget`` bytes (at least one layer per chunk)."""
    per_layer = max(1, n_rows * d * 8)
    step = max(1, budget // per_layer)
    return list(torch.split(layer_index, step))


def _cluster_traces(
    x: Tensor, labels: Tensor
) -> tuple[Float[Tensor, " layer"], Float[Tensor, " layer"], Float[Tensor, " layer"]]:
    """Between- and within-cluster sums of squares and the smallest squared centroid distance,
    per layer, in float64."""
    x = as_layered(x)
    if labels.ndim != 1 or labels.shape[0] != x.shape[0]:
        raise ValueError(f"labels must be [n] with n = {x.shape[0]}, got {tuple(labels.shape)}")
    codes = torch.unique(labels.to(x.device), return_inverse=True)[1]
    n_clusters = int(codes.max()) + 1
    n = x.shape[0]
    if not 2 <= n_clusters < n:
        raise ValueError(f"need 2 <= clusters < n; got {n_clusters} clusters for n = {n}")
    onehot = torch.nn.functional.one_hot(codes, n_clusters).to(torch.float64)
    counts = onehot.sum(0)
    off_diagonal = ~torch.eye(n_clusters, dtype=torch.bool, device=x.device)
    between, within, min_dist2 = [], [], []
    layer_index = torch.arange(x.shape[1], device=x.device)
    for layers in layer_chunks(layer_index, n, x.shape[-1]):
        chunk = x[:, layers].to(torch.float64)
        means = torch.einsum("nk,nld->kld", onehot, chunk) / counts[:, None, None]
        grand_mean = chunk.mean(0)
        between.append((counts[:, None] * (means - grand_mean).square().sum(-1)).sum(0))
        within.append((chunk - means[codes]).square().sum((0, 2)))
        dist2 = (means[:, None] - means[None]).square().sum(-1)  # [k, k, layer]
        min_dist2.append(dist2[off_diagonal].min(0).values)
    return torch.cat(between), torch.cat(within), torch.cat(min_dist2)


def calinski_harabasz(
    x: Float[Tensor, "n layer d"] | Float[Tensor, "n d"],
    labels: Int[Tensor, " n"] | Bool[Tensor, " n"],
) -> Float[Tensor, " layer"] | Float[Tensor, ""]:
    """Calinski–Harabasz index of hard clusters, per layer (unitless, ≥ 0, higher = better
    separated): ``[tr(B) / (k − 1)] / [tr(W) / (n − k)]``, equal to sklearn's
    ``calinski_harabasz_score``.

    Args:
        x: activations ``[n, layer, d]`` (or ``[n, d]``), any float dtype and device;
            accumulated in float64.
        labels: cluster id of each row ``[n]`` (int or bool), at least two distinct values.

    Returns:
        float64 ``[layer]`` on ``x.device``; a 0-dim tensor for ``[n, d]`` input.
    """
    between, within, _ = _cluster_traces(x, labels)
    n = x.shape[0]
    n_clusters = int(torch.unique(labels).numel())
    chi = (between / (n_clusters - 1)) / (within / (n - n_clusters))
    return chi[0] if x.ndim == 2 else chi


def xie_beni(
    x: Float[Tensor, "n layer d"] | Float[Tensor, "n d"],
    labels: Int[Tensor, " n"] | Bool[Tensor, " n"],
) -> Float[Tensor, " layer"] | Float[Tensor, ""]:
    """Xie–Beni index of hard clusters, per layer (unitless, ≥ 0, lower = better separated):
    ``Σ_c Σ_{x∈c} ‖x − μ_c‖² / (n · min_{i≠j} ‖μ_i − μ_j‖²)``.

    Args:
        x: activations ``[n, layer, d]`` (or ``[n, d]``); accumulated in float64.
        labels: cluster id of each row ``[n]`` (int or bool), at least two distinct values.

    Returns:
        float64 ``[layer]`` on ``x.device``; a 0-dim tensor for ``[n, d]`` input.
    """
    _, within, min_dist2 = _cluster_traces(x, labels)
    xb = within / (x.shape[0] * min_dist2)
    return xb[0] if x.ndim == 2 else xb


def pca_coordinates(
    x: Tensor, rows: Tensor, layer_index: Tensor, k: int, device: torch.device
) -> Tensor:
    """PCA coordinates ``[len(rows), len(layer_index), min(k, rank)]`` (float64), fitted per
    layer on the given rows only."""
    if k < 1:
        raise ValueError(f"pca_dim must be >= 1, got {k}")
    coordinates = []
    for layers in layer_chunks(layer_index, len(rows), x.shape[-1]):
        chunk = x[rows[:, None], layers[None, :]].to(device).to(torch.float64)
        centred = (chunk - chunk.mean(0)).transpose(0, 1)  # [layer, n, d]
        left, singular, _ = torch.linalg.svd(centred, full_matrices=False)
        left, singular = left[..., :k], singular[..., :k]
        # Fix each component's sign so its largest-magnitude score is positive (as sklearn's
        # svd_flip): the SVD's signs are otherwise arbitrary.
        pivot = left.abs().argmax(dim=1, keepdim=True)
        signs = torch.gather(left, 1, pivot).sign()
        coordinates.append((left * signs * singular[:, None, :]).transpose(0, 1))
    return torch.cat(coordinates, dim=1)


def pca_reduce(
    x: Float[Tensor, "n layer d"] | Float[Tensor, "n d"], k: int
) -> Float[Tensor, "n layer k"] | Float[Tensor, "n k"]:
    """Project each layer's activations onto its top-``k`` principal components.

    Deterministic: centred per layer, ``torch.linalg.svd`` in float64, and each component's sign
    fixed so that its largest-magnitude coordinate is positive. Returns float64 coordinates in
    the units of ``x`` (``min(k, n, d)`` components), on ``x.device``.
    """
    layered = as_layered(x)
    coordinates = pca_coordinates(
        layered,
        torch.arange(layered.shape[0], device=x.device),
        torch.arange(layered.shape[1], device=x.device),
        k,
        x.device,
    )
    return coordinates[:, 0] if x.ndim == 2 else coordinates
