"""The Alignment Quality Index (AQI): how well a model's activations separate safe from unsafe
prompts, per category ("axiom") and overall.

Two modes:

* **reference** — reproduces the published AQI (Borah et al. 2025, arXiv 2506.13901) and the
  original study's numbers: mean-pooled last-layer embeddings → 3-D t-SNE per category →
  Calinski–Harabasz (CHI) and Xie–Beni (XB) → :func:`reference_normalize` across the categories
  of one run. Stochastic, and a score depends on the other categories in the run.
* **principled** (default) — deterministic, comparable across models and runs, with bootstrap
  confidence intervals and a curve over depth. See :data:`PRINCIPLED_MODE_NOTES`.

Modules: :mod:`~mahals.aqi.indices` (CHI, XB, PCA; torch, float64 accumulation, vectorised over
layers, CPU or GPU), :mod:`~mahals.aqi.reference`, :mod:`~mahals.aqi.principled`,
:mod:`~mahals.aqi.report` (:class:`AQIScore`, :class:`AQIReport`) and
:mod:`~mahals.aqi.evaluation` (:func:`evaluate_activations`, the model-free core, and
:func:`evaluate`, model + :class:`~mahals.data.SafetyDataset` → :class:`AQIReport`).
"""

from mahals.aqi.evaluation import evaluate, evaluate_activations
from mahals.aqi.indices import calinski_harabasz, pca_reduce, xie_beni
from mahals.aqi.principled import PRINCIPLED_MODE_NOTES
from mahals.aqi.reference import reference_aqi, reference_normalize
from mahals.aqi.report import OVERALL, AQIReport, AQIScore

__all__ = [
    "OVERALL",
    "PRINCIPLED_MODE_NOTES",
    "AQIReport",
    "AQIScore",
    "calinski_harabasz",
    "evaluate",
    "evaluate_activations",
    "pca_reduce",
    "reference_aqi",
    "reference_normalize",
    "xie_beni",
]
