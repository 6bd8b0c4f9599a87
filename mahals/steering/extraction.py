"""From two models' hidden states on the same texts to a pair's steering vectors and statistics.

With ``h_base``, ``h_tuned`` of shape ``[n, layer, d_model]`` (float32, residual-stream units,
layer *l* = output of decoder block *l*), per answer kind (``"chosen"``, ``"rejected"``):

* the mean-difference vector ``mean_i (h_tuned[i] − h_base[i])``, ``[layer, d_model]``
  (:meth:`SteeringVector.from_diff`);
* SVD component *k* of the **centered** per-sample chosen differences, per layer, sign-aligned
  with and rescaled to the mean vector's norm (:meth:`DifferenceSVD.component`);
* D-STEER statistics per layer from the **uncentered** chosen differences: ``σ₂/σ₁`` and
  ``|cos(u₁, v̄)|`` (:meth:`DifferenceSVD.dsteer_stats`);
* cosine similarity tuned vs base per layer (:func:`mean_cosine_per_layer`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from mahals.steering.svd import DifferenceSVD, DSteerStats, difference_svd
from mahals.steering.vector import SteeringVector

__all__ = [
    "ANSWERS",
    "Answer",
    "PairVectors",
    "extract_pair_vectors",
    "frobenius_norm",
    "mean_cosine_per_layer",
]

Answer = Literal["chosen", "rejected"]
ANSWERS: tuple[Answer, ...] = ("chosen", "rejected")


def mean_cosine_per_layer(
    h_base: Float[Tensor, "n layer d_model"], h_tuned: Float[Tensor, "n layer d_model"]
) -> Float[Tensor, " layer"]:
    """``cos[l] = mean_i cos(h_tuned[i, l], h_base[i, l])``, computed in float64.

    A zero row counts as cosine 0 (torch's ``cosine_similarity`` clamps norms at 1e-8).
    """
    cosines = torch.nn.functional.cosine_similarity(
        h_tuned.to(torch.float64), h_base.to(torch.float64), dim=-1
    )
    return cosines.mean(0)


def frobenius_norm(vector: SteeringVector) -> float:
    """Norm of the whole ``[layer, d_model]`` vector (float64)."""
    return float(torch.linalg.vector_norm(vector.vectors.to(torch.float64)))


@dataclass(frozen=True)
class PairVectors:
    """A model pair's steering vectors and per-layer statistics.

    Attributes:
        chosen: mean-difference vector on chosen answers.
        rejected: mean-difference vector on rejected answers.
        svd: SVD component ``svd_component`` of the centered chosen differences.
        centered: the centered chosen-difference SVD (top components, explained variance).
        dsteer: D-STEER statistics of the uncentered chosen differences.
        cosines: per answer, :func:`mean_cosine_per_layer`, ``[layer]`` float64.
        svd_null_layers: model layers where component ``svd_component`` is below the numerical
            rank (its row of ``svd`` is zero there).
    """

    chosen: SteeringVector
    rejected: SteeringVector
    svd: SteeringVector
    centered: DifferenceSVD
    dsteer: DSteerStats
    cosines: dict[str, Tensor]
    svd_null_layers: list[int]

    @property
    def frobenius_norm(self) -> float:
        """:func:`frobenius_norm` of the chosen vector."""
        return frobenius_norm(self.chosen)


def extract_pair_vectors(
    h_base: Mapping[Answer, Float[Tensor, "n layer d_model"]],
    h_tuned: Mapping[Answer, Float[Tensor, "n layer d_model"]],
    *,
    svd_component: int,
    n_explained: int,
    dataset: str,
    meaning: str,
    **metadata: Any,
) -> PairVectors:
    """Mean differences, centered SVD component *k*, D-STEER statistics and cosines of a pair.

    Args:
        h_base: per answer kind, the base model's pooled hidden states ``[n, layer, d_model]``.
        h_tuned: the same texts' hidden states in the tuned model, same shapes.
        svd_component: index *k* of the centered-SVD component returned as ``svd``.
        n_explained: SVD components kept in ``centered`` (at least ``k + 1`` are computed).
        dataset: what the rows are; each vector records ``f"{dataset}:{answer}"``.
        meaning: one sentence on what the difference measures (kept in the descriptions).
        **metadata: other :class:`SteeringVector` fields (``base_model``, ``pool``, ``extra``…).

    Raises:
        ValueError: the four blocks differ in shape.
    """
    shapes = {tuple(t.shape) for t in (*h_base.values(), *h_tuned.values())}
    if len(shapes) != 1:
        raise ValueError(f"hidden-state blocks differ in shape: {sorted(shapes)}")
    vectors = {
        answer: SteeringVector.from_diff(
            h_base[answer],
            h_tuned[answer],
            dataset=f"{dataset}:{answer}",
            description=f"mean(h_tuned - h_base) on {answer} answers; {meaning}",
            **metadata,
        )
        for answer in ANSWERS
    }
    chosen = vectors["chosen"]
    k = svd_component
    rank = min(chosen.n_samples or 0, chosen.vectors.shape[1])
    centered = difference_svd(
        h_base["chosen"],
        h_tuned["chosen"],
        centered=True,
        n_components=min(rank, max(k + 1, n_explained)),
    )
    uncentered = difference_svd(
        h_base["chosen"], h_tuned["chosen"], centered=False, n_components=min(rank, 2)
    )
    null_layers = [
        layer for row, layer in enumerate(centered.layers) if centered.singular_values[row, k] == 0
    ]
    return PairVectors(
        chosen=chosen,
        rejected=vectors["rejected"],
        svd=centered.component(k, chosen),
        centered=centered,
        dsteer=uncentered.dsteer_stats(chosen),
        cosines={a: mean_cosine_per_layer(h_base[a], h_tuned[a]) for a in ANSWERS},
        svd_null_layers=null_layers,
    )
