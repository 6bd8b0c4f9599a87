"""The Alignment Quality Index (AQI): how well a model's activations separate safe from unsafe
prompts, per category ("axiom") and overall.

Three modes:

* **mahalanobis** (default) — cross-validated shrinkage-LDA separation of the two classes in
  the within-class-whitened geometry, per category and layer: ``100 · (2 · AUC − 1)`` of
  held-out projections (0 = chance, 100 = perfectly separated), η² alongside, bootstrap
  intervals, surface baselines (prompt length, embedding output) on the same folds.
  Deterministic and comparable across models and runs. See :mod:`~mahals.aqi.mahalanobis`.
* **geometry** — a diagnostic: the chance-corrected share of the raw activations' variance
  that lies between the classes (deterministic, bootstrap intervals). It measures how much of
  the Euclidean geometry the split organises, not separability. See
  :data:`GEOMETRY_MODE_NOTES`. (Called ``principled`` before; that name is a deprecated alias.)
* **reference** — reproduces the published AQI (Borah et al. 2025, arXiv 2506.13901) and the
  original study's numbers: mean-pooled last-layer embeddings → 3-D t-SNE per category →
  Calinski–Harabasz (CHI) and Xie–Beni (XB) → :func:`reference_normalize` across the categories
  of one run. Stochastic, and a score depends on the other categories in the run.

Modules: :mod:`~mahals.aqi.indices` (CHI, XB, PCA; torch, float64 accumulation, vectorised over
layers, CPU or GPU), :mod:`~mahals.aqi.mahalanobis`, :mod:`~mahals.aqi.geometry`,
:mod:`~mahals.aqi.reference`, :mod:`~mahals.aqi.report` (:class:`AQIScore`, :class:`AQIReport`)
and :mod:`~mahals.aqi.evaluation` (:func:`evaluate_activations`, the model-free core, and
:func:`evaluate`, model + :class:`~mahals.data.SafetyDataset` → :class:`AQIReport`).
"""

from mahals.aqi.evaluation import (
    DEFAULT_SEED,
    embedding_features,
    evaluate,
    evaluate_activations,
    length_features,
    mahalanobis_categories,
    report_from_categories,
)
from mahals.aqi.geometry import GEOMETRY_MODE_NOTES
from mahals.aqi.indices import calinski_harabasz, pca_reduce, xie_beni
from mahals.aqi.mahalanobis import (
    CategoryHeldOut,
    category_centred_projections,
    cross_validated_projections,
    lda_direction,
    stratified_folds,
)
from mahals.aqi.reference import reference_aqi, reference_normalize
from mahals.aqi.report import CENTRED_OVERALL, OVERALL, AQIReport, AQIScore

PRINCIPLED_MODE_NOTES = GEOMETRY_MODE_NOTES
"""Deprecated name of :data:`GEOMETRY_MODE_NOTES`."""

__all__ = [
    "CENTRED_OVERALL",
    "DEFAULT_SEED",
    "GEOMETRY_MODE_NOTES",
    "OVERALL",
    "PRINCIPLED_MODE_NOTES",
    "AQIReport",
    "AQIScore",
    "CategoryHeldOut",
    "calinski_harabasz",
    "category_centred_projections",
    "cross_validated_projections",
    "embedding_features",
    "evaluate",
    "evaluate_activations",
    "lda_direction",
    "length_features",
    "mahalanobis_categories",
    "pca_reduce",
    "reference_aqi",
    "reference_normalize",
    "report_from_categories",
    "stratified_folds",
    "xie_beni",
]
