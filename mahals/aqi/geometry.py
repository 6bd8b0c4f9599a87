"""Geometry mode (a diagnostic; mahals' principled default until issue 9): the chance-corrected
between-class share of total variance per category and layer, with a stratified bootstrap
computed from sufficient statistics. It measures how much of the raw Euclidean geometry the
safe/unsafe split organises, not whether the classes are separable (see :mod:`.mahalanobis`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from mahals.aqi._inputs import category_seed
from mahals.aqi.indices import layer_chunks, pca_coordinates
from mahals.aqi.report import OVERALL, AQIScore

__all__ = ["GEOMETRY_MODE_NOTES", "geometry_scores"]

GEOMETRY_MODE_NOTES = """\
Geometry AQI (a diagnostic; the mahalanobis mode is the default) is the share of the activations' variance that lies between
the safe and the unsafe cluster, corrected for chance:

    AQI = 100 * (1 - (n - 1) / (n - 2) * tr(W) / tr(T)) = 100 * (CHI - 1) / (CHI + n - 2)

with tr(W) the within-class and tr(T) = tr(W) + tr(B) the total sum of squares of one
category's n activation vectors (optionally PCA-reduced to k dimensions). It measures how much
of the representation's geometry is organised by the safe/unsafe split, as CHI does; it is not
linear separability (a shift along one direction among thousands of noisy ones scores low
however separable it is; a linear probe answers that other question).

Why this design:
- One number, not two. For two hard clusters CHI * XB = (n - 2) * n_safe * n_unsafe / n^2, so
  CHI and XB carry the same information; averaging their normalised values (as the reference
  AQI does) counts it twice. Raw CHI and XB are still reported alongside.
- Comparable across models, runs and sample sizes. A category's score depends only on its own
  rows: no min-max or median over the other categories of a run, no t-SNE. It is invariant to
  translation, rotation and isotropic scaling of the activations (so d_model and activation
  norms do not matter), and unlike CHI, which grows linearly with n for a fixed separation,
  the between-class share eta^2 = tr(B) / tr(T) estimates a population quantity free of n.
- Chance-corrected like adjusted R^2: over random relabellings E[eta^2] = 1 / (n - 1) exactly,
  whatever the data, so AQI = 0 means no separation beyond chance and 100 means every
  activation sits on its class mean. It can dip below 0 by at most 100 / (n - 2).
- Uncertainty: a stratified bootstrap gives a confidence interval. Rows are resampled within
  each safety label of an axiom (so both classes keep their sizes), and for "overall" within
  each (axiom, label) cell, the cells being fixed by the dataset's design. Resampling with
  replacement inflates separation by about the chance level, so the percentile interval is
  shifted by the bootstrap's estimated bias (mean resampled score minus the point estimate).
  Resamples are seeded by the axiom's name, so an axiom's score and interval do not change
  (beyond floating-point rounding, ~1e-12 relative) when other axioms join or leave the run.
- Depth: AQI is computed at every selected layer (a curve over depth). Pooled over several
  layers, each layer is scaled to unit total variance before concatenation, which makes the
  pooled AQI exactly the mean of the per-layer AQIs: every layer counts equally, whatever its
  activation norm. Raw CHI and XB of a pooled score are those of that scaled concatenation.
- Deterministic: no stochastic embedding; the same inputs give identical bits on the same
  device (PCA uses an SVD with fixed signs).

Limitation: the score is not invariant to anisotropic rescaling, so a few high-variance
("rogue") dimensions can dominate tr(T); PCA keeps exactly those dimensions.
"""


def _resample_counts(n_rows: int, n_bootstrap: int, generator: torch.Generator) -> Tensor:
    """``[1 + n_bootstrap, n_rows]`` float64 multiplicities: row 0 is the original sample (all
    ones), the others bootstrap resamples of the same size."""
    picks = torch.randint(n_rows, (n_bootstrap, n_rows), generator=generator)
    counts = torch.zeros(n_bootstrap, n_rows, dtype=torch.float64)
    counts.scatter_add_(1, picks, torch.ones_like(picks, dtype=torch.float64))
    return torch.cat([torch.ones(1, n_rows, dtype=torch.float64), counts])


def _squared_norms(values: Tensor) -> Tensor:
    """Squared L2 norms along the last dimension, without a squared copy of ``values``."""
    return torch.linalg.vector_norm(values, dim=-1).square()


@dataclass(frozen=True)
class _Cell:
    """One category inside an ordered set of rows: its safe and its unsafe rows as contiguous
    ranges, and their multiplicities ``[1 + n_bootstrap, rows]`` (row 0 = the sample itself)."""

    safe: slice
    unsafe: slice
    safe_counts: Tensor
    unsafe_counts: Tensor

    @property
    def n_safe(self) -> int:
        return self.safe.stop - self.safe.start

    @property
    def n_unsafe(self) -> int:
        return self.unsafe.stop - self.unsafe.start


def _two_class_traces(
    safe: Sequence[Tensor | int], unsafe: Sequence[Tensor | int], n_layers: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Between/within sums of squares and squared centroid distance ``[resample, layer]`` from
    each class's (resampled sum ``[resample, layer·d]``, resampled Σ‖x‖² ``[resample, layer]``,
    row count). Overwrites the unsafe sum."""
    (sum_safe, norms_safe, n_safe), (sum_unsafe, norms_unsafe, n_unsafe) = safe, unsafe
    n_resamples = len(sum_safe)
    within = (
        norms_safe
        - _squared_norms(sum_safe.view(n_resamples, n_layers, -1)) / n_safe
        + norms_unsafe
        - _squared_norms(sum_unsafe.view(n_resamples, n_layers, -1)) / n_unsafe
    )
    centroid_difference = sum_unsafe.div_(n_unsafe).sub_(sum_safe, alpha=1.0 / n_safe)
    dist2 = _squared_norms(centroid_difference.view(n_resamples, n_layers, -1))
    between = n_safe * n_unsafe / (n_safe + n_unsafe) * dist2
    return between, within, dist2


def _cell_traces(
    x: Tensor,
    order: Tensor,
    layer_index: Tensor,
    cells: dict[str, _Cell],
    device: torch.device,
    *,
    union: str | None = None,
) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    """Two-class traces (see :func:`_two_class_traces`) of every cell, in float64, from the
    rows ``x[order]`` at the layers ``layer_index``; with ``union``, also of all cells together
    under that name, resampled with the cells' multiplicities side by side.

    Works on sufficient statistics: for multiplicities w of a class's rows, the resampled sum
    is S = wᵀx, the centroid S / n_c and the within-class sum of squares wᵀ‖x‖² − ‖S‖² / n_c.
    One matrix product per class and layer chunk replaces gathering every resample; each class
    is a contiguous row range, so the products read the chunk without copying it, and the
    union's sums are the sums of its cells' sums (no product of its own).
    """
    names = [*cells, union] if union is not None else list(cells)
    parts: dict[str, list[list[Tensor]]] = {name: [[], [], []] for name in names}
    n_rows, d = len(order), x.shape[-1]
    n_resamples = len(next(iter(cells.values())).safe_counts)
    chunks = layer_chunks(layer_index, n_rows, d)
    widest = max(len(layers) for layers in chunks) * d
    # Buffers reused across chunks: fresh allocations this large page-fault on every chunk.
    chunk_buffer = torch.empty(n_rows * widest, dtype=torch.float64, device=device)
    sum_buffers = torch.empty(
        4 if union is not None else 2, n_resamples * widest, dtype=torch.float64, device=device
    )
    for layers in chunks:
        width = len(layers) * d
        chunk = chunk_buffer[: n_rows * width].view(n_rows, len(layers), d)
        for position, layer in enumerate(layers.tolist()):
            chunk[:, position] = x[:, layer].index_select(0, order)
        chunk -= chunk.mean(0)  # conditioning only: every statistic is translation invariant
        squared_norms = _squared_norms(chunk)
        flat = chunk.view(n_rows, width)
        sums = [buffer[: n_resamples * width].view(n_resamples, width) for buffer in sum_buffers]
        union_classes: list[list[Any]] = []
        for index, (name, cell) in enumerate(cells.items()):
            classes = [
                [torch.matmul(counts, flat[rows], out=out), counts @ squared_norms[rows], n]
                for rows, counts, n, out in (
                    (cell.safe, cell.safe_counts, cell.n_safe, sums[0]),
                    (cell.unsafe, cell.unsafe_counts, cell.n_unsafe, sums[1]),
                )
            ]
            if union is not None and index == 0:
                union_classes = [
                    [out.copy_(total), norms.clone(), n]
                    for (total, norms, n), out in zip(classes, sums[2:], strict=True)
                ]
            elif union is not None:
                for accumulated, (total, norms, n) in zip(union_classes, classes, strict=True):
                    accumulated[0] += total
                    accumulated[1] += norms
                    accumulated[2] += n
            _append_traces(parts[name], _two_class_traces(*classes, len(layers)))
        if union is not None:
            _append_traces(parts[union], _two_class_traces(*union_classes, len(layers)))
    return {name: tuple(torch.cat(p, dim=-1) for p in lists) for name, lists in parts.items()}


def _append_traces(collected: list[list[Tensor]], traces: tuple[Tensor, ...]) -> None:
    for values, chunk_values in zip(collected, traces, strict=True):
        values.append(chunk_values)


def _cells_in_label_order(
    rows: dict[str, Tensor], is_unsafe: Tensor
) -> tuple[Tensor, dict[str, tuple[slice, slice]]]:
    """An order of all rows (safe rows axiom by axiom, then unsafe rows likewise) in which each
    axiom's safe rows, its unsafe rows, and each label of :data:`OVERALL` are contiguous."""
    axioms = [name for name in rows if name != OVERALL]
    blocks, ranges, start = [], {name: [] for name in axioms}, 0
    for unsafe in (False, True):
        for name in axioms:
            block = rows[name][is_unsafe[rows[name]] == unsafe]
            ranges[name].append(slice(start, start + len(block)))
            blocks.append(block)
            start += len(block)
    n_safe = int((~is_unsafe).sum())
    ranges[OVERALL] = [slice(0, n_safe), slice(n_safe, start)]
    return torch.cat(blocks), {name: (safe, unsafe) for name, (safe, unsafe) in ranges.items()}


def _indices(
    between: Tensor, within: Tensor, dist2: Tensor, n: int
) -> tuple[Tensor, Tensor, Tensor]:
    """CHI, XB and geometry AQI from two-class traces (any matching shapes)."""
    chi = (n - 2) * between / within
    xb = within / (n * dist2)
    aqi = 100.0 * (1.0 - (n - 1) / (n - 2) * within / (between + within))
    return chi, xb, aqi


def _interval(point: Tensor, resampled: Tensor, confidence: float, n: int) -> tuple[Tensor, Tensor]:
    """Bootstrap percentile interval shifted by the bootstrap's bias estimate, clipped to the
    attainable range [−100 / (n − 2), 100]."""
    bias = resampled.mean(0) - point
    alpha = (1.0 - confidence) / 2
    levels = torch.tensor([alpha, 1.0 - alpha], dtype=resampled.dtype, device=resampled.device)
    low, high = torch.quantile(resampled, levels, dim=0) - bias
    return low.clamp(min=-100.0 / (n - 2)), high.clamp(max=100.0)


def _floats(values: Tensor) -> tuple[float, ...]:
    return tuple(values.cpu().tolist())


def _geometry_score(
    category: str,
    traces: tuple[Tensor, Tensor, Tensor],
    n_safe: int,
    n_unsafe: int,
    confidence: float | None,
) -> AQIScore:
    """Score one category from its ``[1 + n_bootstrap, layer]`` traces (row 0 = the sample);
    ``confidence=None`` for no intervals."""
    between, within, dist2 = traces
    n = n_safe + n_unsafe
    layer_chi, layer_xb, layer_aqi = _indices(between, within, dist2, n)
    # Pooled over layers: each layer scaled to unit total variance, then concatenated; its AQI
    # is exactly the mean of the per-layer AQIs.
    total = between + within
    chi, xb, _ = _indices(
        (between / total).sum(-1), (within / total).sum(-1), (dist2 / total).sum(-1), n
    )
    aqi = layer_aqi.mean(-1)
    intervals: dict[str, Any] = {}
    if confidence is not None:
        low, high = _interval(aqi[0], aqi[1:], confidence, n)
        layer_low, layer_high = _interval(layer_aqi[0], layer_aqi[1:], confidence, n)
        intervals = {
            "ci_low": float(low),
            "ci_high": float(high),
            "layer_ci_low": _floats(layer_low),
            "layer_ci_high": _floats(layer_high),
        }
    return AQIScore(
        category=category,
        aqi=float(aqi[0]),
        chi_raw=float(chi[0]),
        xb_raw=float(xb[0]),
        n_safe=n_safe,
        n_unsafe=n_unsafe,
        layer_aqi=_floats(layer_aqi[0]),
        layer_chi=_floats(layer_chi[0]),
        layer_xb=_floats(layer_xb[0]),
        **intervals,
    )


def geometry_scores(
    x: Tensor,
    layer_index: Tensor,
    rows: dict[str, Tensor],
    is_unsafe: Tensor,
    *,
    pca_dim: int | None,
    n_bootstrap: int,
    seed: int,
    confidence: float,
    device: torch.device,
) -> dict[str, AQIScore]:
    """Geometry scores of every category of ``rows`` (:data:`OVERALL` = all rows pooled) at
    the layers ``layer_index`` of ``x`` ``[n, layer, d]``; see :data:`GEOMETRY_MODE_NOTES`."""
    order, ranges = _cells_in_label_order(rows, is_unsafe)
    axiom_cells = {}
    for name, (safe, unsafe) in ranges.items():
        if name != OVERALL:
            generator = torch.Generator().manual_seed(category_seed(seed, name))
            counts = [
                _resample_counts(r.stop - r.start, n_bootstrap, generator).to(device)
                for r in (safe, unsafe)
            ]
            axiom_cells[name] = _Cell(safe, unsafe, *counts)
    # The overall bootstrap resamples within each (axiom, label) cell, as the axioms' own
    # bootstraps do (the cells are fixed by design), reusing their multiplicities.
    overall_counts = [
        torch.cat([getattr(cell, attribute) for cell in axiom_cells.values()], dim=1)
        for attribute in ("safe_counts", "unsafe_counts")
    ]
    cells = {**axiom_cells, OVERALL: _Cell(*ranges[OVERALL], *overall_counts)}
    if pca_dim is None:
        traces = _cell_traces(
            x, order.to(x.device), layer_index, axiom_cells, device, union=OVERALL
        )
    else:
        traces = {}
        for name, cell in cells.items():
            # PCA is fitted on the category's own rows only (safe, then unsafe).
            category_rows = torch.cat([order[cell.safe], order[cell.unsafe]]).to(x.device)
            coordinates = pca_coordinates(x, category_rows, layer_index, pca_dim, device)
            local = replace(
                cell, safe=slice(0, cell.n_safe), unsafe=slice(cell.n_safe, len(category_rows))
            )
            traces |= _cell_traces(
                coordinates,
                torch.arange(len(category_rows), device=device),
                torch.arange(coordinates.shape[1], device=device),
                {name: local},
                device,
            )
    return {
        name: _geometry_score(
            name, traces[name], cell.n_safe, cell.n_unsafe, confidence if n_bootstrap > 0 else None
        )
        for name, cell in cells.items()
    }
