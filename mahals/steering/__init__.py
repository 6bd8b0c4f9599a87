"""Steering vectors (D-STEER): a typed per-layer vector, SVD of differences, GGUF export, and
the extraction of a model pair's vectors from its hidden states.

* :mod:`~mahals.steering.vector` — :class:`SteeringVector` (arithmetic, save/load, GGUF);
* :mod:`~mahals.steering.svd` — :func:`difference_svd`, :class:`DifferenceSVD`,
  :class:`DSteerStats`;
* :mod:`~mahals.steering.gguf` — llama.cpp control-vector export;
* :mod:`~mahals.steering.extraction` — a pair's vectors and statistics from ``h_base`` /
  ``h_tuned`` (:func:`extract_pair_vectors`, :func:`mean_cosine_per_layer`);
* :mod:`~mahals.steering.apply` — applying vectors: :class:`Steering` specs and the
  :func:`steer` context manager.

**Layer convention.** Row *i* of a vector belongs to model layer ``layers[i]``, the output of
decoder block ``layers[i]`` (0-based), as in :func:`mahals.capture`.
"""

from mahals.steering.apply import MODES, POSITIONS, Steering, SteeringIntervention, steer
from mahals.steering.extraction import (
    ANSWERS,
    Answer,
    PairVectors,
    extract_pair_vectors,
    frobenius_norm,
    mean_cosine_per_layer,
)
from mahals.steering.gguf import write_control_vector
from mahals.steering.svd import DifferenceSVD, DSteerStats, SVDMethod, difference_svd
from mahals.steering.vector import Pool, SteeringVector

__all__ = [
    "ANSWERS",
    "MODES",
    "POSITIONS",
    "Steering",
    "SteeringIntervention",
    "steer",
    "Answer",
    "DSteerStats",
    "DifferenceSVD",
    "PairVectors",
    "Pool",
    "SVDMethod",
    "SteeringVector",
    "difference_svd",
    "extract_pair_vectors",
    "frobenius_norm",
    "mean_cosine_per_layer",
    "write_control_vector",
]
