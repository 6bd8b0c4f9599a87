"""Cross-architecture transfer (Phase 2.3): residual maps between two models, layer matching by
depth or linear CKA, and the spread of a set of agents' scores (homophily).

**Maps.** A :class:`ResidualMap` is an affine map ``y ≈ x @ weight + bias`` from one source
layer's residual space (``d_src``) to one target layer's (``d_tgt``), fitted from paired pooled
activations of the *same texts* through both models (``[n, d_src]`` and ``[n, d_tgt]``; texts
rather than tokens, because the tokenisers differ). Three fits, all in float64, deterministic,
on the inputs' device:

* :func:`fit_ridge` — ridge regression with an intercept, in closed form (the primal
  ``(XᵀX + αI)⁻¹XᵀY`` when the training rows outnumber ``d_src``, else the dual
  ``Xᵀ(XXᵀ + αI)⁻¹Y``); ``α`` chosen by k-fold cross-validation on a grid;
* :func:`fit_procrustes` — both sides reduced to their top ``rank`` principal components
  (whitened by default), the orthogonal Procrustes rotation between them, back to target units;
* :func:`fit_cca` — regularised CCA; the map is the least-squares regression of the target on
  the source's first ``n_components`` canonical variates (the map "through the canonical space";
  with no regularisation and ``n_components = min(d_src, d_tgt)`` it is ordinary least squares).

Each fit holds out ``test_fraction`` of the rows (a seeded permutation, :func:`holdout_split`)
and reports :class:`FitQuality` on them: R² (variance-weighted over target coordinates), the
mean cosine of mapped vs true activations, and the same cosine after subtracting the target's
training mean (residual streams share a large common direction, which inflates raw cosines).

**Projecting a steering vector.** A steering vector is a *translation* of the residual stream,
so :meth:`ResidualMap.project` applies only the linear part: a source shift ``v`` becomes the
target shift ``v @ weight`` (the bias cancels in a difference of two mapped activations).
:class:`LayerMapping` holds one map per target layer and projects a whole
:class:`~mahals.steering.SteeringVector` into a vector on the target's layers and ``d_model``.

**Layer matching.** :func:`match_by_depth` pairs layers at the same relative depth;
:func:`match_by_cka` pairs each target layer with the source layer of highest linear CKA
(:func:`cka_matrix`, :func:`cka_heatmap`); explicit pairs are plain ``(source, target)`` tuples.

**Homophily.** :func:`score_spread` / :func:`homophily` measure how far apart a set of agents'
scores are (population std, range, mean absolute pairwise difference) before and after
steering; :func:`homophily_plot` draws it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import combinations
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor

from mahals._version import __version__
from mahals.io import atomic_write_json, load_tensors, save_tensors
from mahals.plots import Values, save_png
from mahals.steering import SteeringVector

__all__ = [
    "DEFAULT_RIDGE_ALPHAS",
    "FitQuality",
    "HomophilyReport",
    "LayerMapping",
    "MapMethod",
    "ResidualMap",
    "Spread",
    "cka_heatmap",
    "cka_matrix",
    "fit_cca",
    "fit_procrustes",
    "fit_ridge",
    "fit_ridge_maps",
    "fit_quality",
    "holdout_split",
    "homophily",
    "homophily_plot",
    "linear_cka",
    "match_by_cka",
    "match_by_depth",
    "orthogonal_procrustes",
    "score_spread",
]

MapMethod = Literal["ridge", "procrustes", "cca"]
Normalization = Literal["whiten", "pca"]
LayerPair = tuple[int, int]

MAP_FORMAT = "mahals.ResidualMap"
MAPPING_FORMAT = "mahals.LayerMapping"
FORMAT_VERSION = 1

DEFAULT_RIDGE_ALPHAS: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
"""Ridge grid, relative to the mean eigenvalue ``‖X_c‖²_F / d_src`` of the training Gram matrix."""

_DEFAULT_CV_SKETCH = 64


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _shape(tensor: Tensor) -> tuple[int, ...]:
    return tuple(tensor.shape)


# ------------------------------------------------------------------------------ fit quality


@dataclass(frozen=True)
class FitQuality:
    """How well a map predicts held-out target activations from source activations.

    Attributes:
        r2: ``1 − Σ‖y − ŷ‖² / Σ‖y − ȳ‖²`` over every held-out row and target coordinate, ``ȳ``
            the held-out mean (sklearn's ``r2_score(multioutput="variance_weighted")``).
        mean_cosine: mean over held-out rows of ``cos(ŷ, y)`` (raw activations).
        mean_centered_cosine: the same after subtracting the target's *training* mean from both.
        n_train: rows the map was fitted on.
        n_test: held-out rows scored.
    """

    r2: float
    mean_cosine: float
    mean_centered_cosine: float
    n_train: int
    n_test: int


def _row_cosines(a: Tensor, b: Tensor) -> Tensor:
    norms = torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)
    dots = (a * b).sum(-1)
    return torch.where(norms > 0, dots / norms.clamp_min(torch.finfo(a.dtype).tiny), 0.0)


def fit_quality(
    predicted: Float[Tensor, "n d_tgt"],
    true: Float[Tensor, "n d_tgt"],
    *,
    train_mean: Float[Tensor, " d_tgt"],
    n_train: int,
) -> FitQuality:
    """:class:`FitQuality` of ``predicted`` against ``true`` (held-out rows), in float64."""
    if predicted.shape != true.shape:
        raise ValueError(
            f"predicted activations {_shape(predicted)} and true {_shape(true)} differ in shape"
        )
    predicted, true = predicted.to(torch.float64), true.to(torch.float64)
    train_mean = train_mean.to(true)
    residual = (true - predicted).square().sum()
    total = (true - true.mean(0)).square().sum()
    return FitQuality(
        r2=float(1.0 - residual / total) if total > 0 else math.nan,
        mean_cosine=float(_row_cosines(predicted, true).mean()),
        mean_centered_cosine=float(_row_cosines(predicted - train_mean, true - train_mean).mean()),
        n_train=n_train,
        n_test=true.shape[0],
    )


def holdout_split(n: int, test_fraction: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Train and held-out row indices (int64, CPU) of ``n`` rows.

    A seeded permutation (``torch.Generator().manual_seed(seed)``); the held-out part is its first
    ``round(n · test_fraction)`` entries, and both parts keep the permutation's order.
    ``test_fraction = 0`` returns every row for training and none held out.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    n_test = round(n * test_fraction)
    if test_fraction > 0 and not 2 <= n_test <= n - 2:
        raise ValueError(
            f"test_fraction={test_fraction} of {n} rows leaves {n_test} held out and "
            f"{n - n_test} for training; both need at least 2"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[n_test:], order[:n_test]


# ----------------------------------------------------------------------------- ResidualMap


@dataclass(frozen=True, eq=False)
class ResidualMap:
    """An affine map from one source layer's residual space to one target layer's.

    ``target ≈ source @ weight + bias`` for pooled activations of the same text.

    Attributes:
        weight: linear part ``[d_src, d_tgt]`` (float64 from the fits).
        bias: intercept ``[d_tgt]``.
        source_layer: model-layer index in the source model (output of that decoder block).
        target_layer: model-layer index in the target model.
        method: ``"ridge"``, ``"procrustes"`` or ``"cca"``.
        hyperparameters: what the fit chose or was given (``alpha``, ``rank``, ...; JSON-ready).
        quality: held-out :class:`FitQuality`, or ``None`` when nothing was held out.
        source_model: name or hub id of the source model.
        target_model: name or hub id of the target model.
        dataset: the texts the paired activations came from.
        n_samples: paired rows used (training + held out).
        created: ISO-8601 UTC timestamp.
        mahals_version: ``mahals.__version__`` of the code that made it.
        extra: free-form JSON-serialisable metadata.
    """

    weight: Float[Tensor, "d_src d_tgt"]
    bias: Float[Tensor, " d_tgt"]
    source_layer: int
    target_layer: int
    method: MapMethod
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    quality: FitQuality | None = None
    source_model: str | None = None
    target_model: str | None = None
    dataset: str | None = None
    n_samples: int | None = None
    created: str = field(default_factory=_now_iso)
    mahals_version: str = __version__
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.weight.ndim != 2 or self.bias.shape != self.weight.shape[1:]:
            raise ValueError(
                f"weight must be [d_src, d_tgt] and bias [d_tgt]; got weight "
                f"{_shape(self.weight)} and bias {_shape(self.bias)}"
            )
        for name in ("source_layer", "target_layer"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if self.method not in ("ridge", "procrustes", "cca"):
            raise ValueError(f"method must be ridge, procrustes or cca, got {self.method!r}")

    @property
    def d_source(self) -> int:
        return self.weight.shape[0]

    @property
    def d_target(self) -> int:
        return self.weight.shape[1]

    def _describe(self) -> str:
        return (
            f"map of layer {self.source_layer} → {self.target_layer} "
            f"(weight {_shape(self.weight)}, d_src {self.d_source} → d_tgt {self.d_target})"
        )

    def _check_source(self, tensor: Tensor, what: str) -> None:
        if tensor.ndim == 0 or tensor.shape[-1] != self.d_source:
            raise ValueError(
                f"{what} of shape {_shape(tensor)} does not fit the {self._describe()}: its last "
                f"dimension must be d_src={self.d_source}"
            )

    def __call__(self, source: Float[Tensor, "*batch d_src"]) -> Float[Tensor, "*batch d_tgt"]:
        """Mapped activations ``source @ weight + bias`` (float64, on the map's device)."""
        self._check_source(source, "source activations")
        weight = self.weight.to(torch.float64)
        return source.to(weight) @ weight + self.bias.to(weight)

    def project_direction(
        self, direction: Float[Tensor, "*batch d_src"]
    ) -> Float[Tensor, "*batch d_tgt"]:
        """A source-space shift as a target-space shift: ``direction @ weight`` (no bias)."""
        self._check_source(direction, "direction")
        weight = self.weight.to(torch.float64)
        return direction.to(weight) @ weight

    def project(self, vector: SteeringVector) -> SteeringVector:
        """The row of ``vector`` at :attr:`source_layer`, mapped to :attr:`target_layer`.

        Returns a one-layer :class:`SteeringVector` for the target model (``d_model = d_tgt``),
        in the input vector's dtype and on its device; see :meth:`LayerMapping.project`.
        """
        return LayerMapping(maps=(self,)).project(vector)

    # -------------------------------------------------------------------------------------- I/O

    def metadata(self) -> dict[str, Any]:
        """Every field except the tensors, JSON-ready."""
        return {
            "source_layer": self.source_layer,
            "target_layer": self.target_layer,
            "method": self.method,
            "hyperparameters": self.hyperparameters,
            "quality": None if self.quality is None else vars(self.quality),
            "source_model": self.source_model,
            "target_model": self.target_model,
            "dataset": self.dataset,
            "n_samples": self.n_samples,
            "created": self.created,
            "mahals_version": self.mahals_version,
            "extra": self.extra,
        }

    @classmethod
    def _from_metadata(cls, weight: Tensor, bias: Tensor, meta: Mapping[str, Any]) -> ResidualMap:
        fields = {key: meta[key] for key in cls.__dataclass_fields__ if key in meta}
        quality = meta.get("quality")
        fields["quality"] = None if quality is None else FitQuality(**quality)
        return cls(weight=weight, bias=bias, **fields)

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path`` (safetensors: ``weight.0``, ``bias.0``) and the ``.json`` sidecar.

        Atomic, tensor file first; dtypes are kept, so :meth:`load` returns identical bits.
        """
        return LayerMapping(maps=(self,))._save(path, MAP_FORMAT)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> ResidualMap:
        """Read a map written by :meth:`save`; errors name the offending file."""
        (single,) = LayerMapping._load(path, device, MAP_FORMAT).maps
        return single


# ---------------------------------------------------------------------------- LayerMapping


@dataclass(frozen=True, eq=False)
class LayerMapping:
    """Residual maps from a source model to a target model, one per target layer.

    Attributes:
        maps: one :class:`ResidualMap` per target layer (distinct target layers; a source layer
            may feed several), all with the same ``d_src`` and ``d_tgt``.
    """

    maps: tuple[ResidualMap, ...]

    def __post_init__(self) -> None:
        maps = tuple(self.maps)
        object.__setattr__(self, "maps", maps)
        if not maps:
            raise ValueError("a LayerMapping needs at least one map")
        targets = [m.target_layer for m in maps]
        if len(set(targets)) != len(targets):
            raise ValueError(f"each target layer needs exactly one map; target layers {targets}")
        shapes = {_shape(m.weight) for m in maps}
        if len(shapes) != 1:
            raise ValueError(f"maps of one LayerMapping must share a weight shape, got {shapes}")
        for side in ("source_model", "target_model"):
            names = {getattr(m, side) for m in maps}
            if len(names) != 1:
                raise ValueError(f"maps of one LayerMapping must share a {side}, got {names}")

    @property
    def pairs(self) -> tuple[LayerPair, ...]:
        """``(source_layer, target_layer)`` of every map, in order."""
        return tuple((m.source_layer, m.target_layer) for m in self.maps)

    @property
    def d_source(self) -> int:
        return self.maps[0].d_source

    @property
    def d_target(self) -> int:
        return self.maps[0].d_target

    def project(self, vector: SteeringVector) -> SteeringVector:
        """Project a source-model steering vector onto the target model's layers.

        Row ``i`` of the result is ``vector.layer(maps[i].source_layer) @ maps[i].weight``
        (linear part only: a steering vector is a translation), on target layer
        ``maps[i].target_layer``. Computed in float64, returned in ``vector``'s dtype and device.
        Provenance fields come from ``vector``; ``kind`` is ``"projected(<kind>)"`` and
        ``extra["transfer"]`` records the maps (source and target model, and per map the source
        layer, method and held-out R²).

        Raises:
            ValueError: ``vector``'s ``d_model`` is not the maps' ``d_src`` (both shapes named),
                or it lacks a source layer a map needs.
        """
        width = vector.vectors.shape[1]
        if width != self.d_source:
            raise ValueError(
                f"steering vector of shape {_shape(vector.vectors)} (d_model {width}) does not "
                f"fit maps of weight shape ({self.d_source}, {self.d_target}) "
                f"(d_src {self.d_source} → d_tgt {self.d_target})"
            )
        missing = sorted({m.source_layer for m in self.maps} - set(vector.layers))
        if missing:
            raise ValueError(
                f"steering vector has no rows for source layers {missing} the maps need; its "
                f"layers: {list(vector.layers)}"
            )
        rows = [
            m.project_direction(vector.layer(m.source_layer).to(m.weight.device)) for m in self.maps
        ]
        first = self.maps[0]
        transfer = {
            "source_model": first.source_model,
            "target_model": first.target_model,
            "source_layers": [m.source_layer for m in self.maps],
            "methods": [m.method for m in self.maps],
            "held_out_r2": [None if m.quality is None else m.quality.r2 for m in self.maps],
        }
        methods = "/".join(dict.fromkeys(m.method for m in self.maps))
        return SteeringVector(
            vectors=torch.stack(rows).to(device=vector.vectors.device, dtype=vector.vectors.dtype),
            layers=tuple(m.target_layer for m in self.maps),
            base_model=vector.base_model,
            tuned_model=vector.tuned_model,
            dataset=vector.dataset,
            n_samples=vector.n_samples,
            pool=vector.pool,
            kind=f"projected({vector.kind})",
            description=(
                f"{vector.kind} of {first.source_model or 'the source model'} projected onto "
                f"{first.target_model or 'the target model'} by {methods} residual maps"
            ),
            extra={**vector.extra, "transfer": transfer},
        )

    # ------------------------------------------------------------------------------ fitting

    @classmethod
    def fit(
        cls,
        source_acts: Float[Tensor, "n_src source_layer d_src"],
        target_acts: Float[Tensor, "n_tgt target_layer d_tgt"],
        pairs: Sequence[LayerPair],
        *,
        method: MapMethod = "ridge",
        source_layers: Sequence[int] | None = None,
        target_layers: Sequence[int] | None = None,
        **options: Any,
    ) -> LayerMapping:
        """Fit one map per ``(source_layer, target_layer)`` pair (model-layer indices).

        Args:
            source_acts: pooled source activations ``[n, layer, d_src]`` (e.g.
                ``mahals.capture(...).tensor``).
            target_acts: the same texts through the target model ``[n, layer, d_tgt]``.
            pairs: ``(source_layer, target_layer)`` tuples, e.g. from :func:`match_by_depth`.
            method: ``"ridge"`` (:func:`fit_ridge_maps`, which shares the work of one source
                layer across its targets), ``"procrustes"`` or ``"cca"``.
            source_layers: model-layer index of each entry of ``source_acts``' dimension 1
                (default ``0 .. layer-1``); likewise ``target_layers``.
            **options: passed to the fit (``test_fraction``, ``seed``, ``rank``, provenance
                fields such as ``source_model`` ...).
        """
        if source_acts.shape[0] != target_acts.shape[0]:
            raise ValueError(
                f"source activations {_shape(source_acts)} and target activations "
                f"{_shape(target_acts)} must have the same number of texts"
            )
        source_index = _layer_index(source_layers, source_acts.shape[1], "source")
        target_index = _layer_index(target_layers, target_acts.shape[1], "target")
        for source_layer, target_layer in pairs:
            if source_layer not in source_index or target_layer not in target_index:
                raise ValueError(
                    f"pair ({source_layer}, {target_layer}) names a layer without activations: "
                    f"source layers {list(source_index)}, target layers {list(target_index)}"
                )
        fitted: dict[LayerPair, ResidualMap] = {}
        if method == "ridge":
            for source_layer in dict.fromkeys(s for s, _ in pairs):
                targets = [t for s, t in pairs if s == source_layer]
                maps = fit_ridge_maps(
                    source_acts[:, source_index[source_layer]],
                    target_acts[:, [target_index[t] for t in targets]],
                    source_layer=source_layer,
                    target_layers=targets,
                    **options,
                )
                fitted.update({(source_layer, m.target_layer): m for m in maps})
        elif method in ("procrustes", "cca"):
            fit = fit_procrustes if method == "procrustes" else fit_cca
            for source_layer, target_layer in pairs:
                fitted[source_layer, target_layer] = fit(
                    source_acts[:, source_index[source_layer]],
                    target_acts[:, target_index[target_layer]],
                    source_layer=source_layer,
                    target_layer=target_layer,
                    **options,
                )
        else:
            raise ValueError(f"unknown method {method!r}; expected ridge, procrustes or cca")
        return cls(maps=tuple(fitted[tuple(pair)] for pair in pairs))

    # ---------------------------------------------------------------------------------- I/O

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path`` (safetensors: ``weight.{i}``, ``bias.{i}``) and the ``.json`` sidecar.

        Atomic, tensor file first; dtypes kept, so :meth:`load` returns identical bits.
        """
        return self._save(path, MAPPING_FORMAT)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> LayerMapping:
        """Read a mapping written by :meth:`save`; errors name the offending file."""
        return cls._load(path, device, MAPPING_FORMAT)

    def _save(self, path: str | os.PathLike, file_format: str) -> Path:
        path = Path(path)
        sidecar = path.with_suffix(".json")
        if sidecar == path:
            raise ValueError(f"{path}: the tensor file cannot have a .json suffix (the sidecar's)")
        metadata = [m.metadata() for m in self.maps]
        try:
            json.dumps(metadata)
        except TypeError as error:
            raise TypeError(f"map metadata is not JSON-serialisable: {error}") from error
        tensors = {}
        for i, m in enumerate(self.maps):
            tensors[f"weight.{i}"] = m.weight
            tensors[f"bias.{i}"] = m.bias
        save_tensors(path, tensors)
        atomic_write_json(
            sidecar,
            {
                "format": file_format,
                "format_version": FORMAT_VERSION,
                "tensor_file": path.name,
                "weight_shape": list(self.maps[0].weight.shape),
                "maps": metadata,
            },
        )
        return path

    @classmethod
    def _load(
        cls, path: str | os.PathLike, device: torch.device | str, file_format: str
    ) -> LayerMapping:
        path = Path(path)
        sidecar = path.with_suffix(".json")
        if not path.is_file():
            raise FileNotFoundError(f"no residual-map tensor file at {path}")
        if not sidecar.is_file():
            raise FileNotFoundError(f"{path}: metadata sidecar {sidecar} is missing")
        try:
            meta = json.loads(sidecar.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{sidecar}: not valid JSON ({error})") from error
        if meta.get("format") != file_format:
            raise ValueError(
                f"{sidecar}: not a {file_format} sidecar (format={meta.get('format')!r})"
            )
        tensors = load_tensors(path)
        maps = []
        for i, map_meta in enumerate(meta.get("maps", [])):
            if f"weight.{i}" not in tensors or f"bias.{i}" not in tensors:
                raise ValueError(
                    f"{path}: no weight.{i}/bias.{i} tensors (found {sorted(tensors)})"
                )
            weight = tensors[f"weight.{i}"]
            if list(weight.shape) != meta.get("weight_shape"):
                raise ValueError(
                    f"{path}: weight.{i} of shape {_shape(weight)} does not match its sidecar "
                    f"{sidecar} (weight_shape {meta.get('weight_shape')})"
                )
            maps.append(
                ResidualMap._from_metadata(
                    weight.to(device), tensors[f"bias.{i}"].to(device), map_meta
                )
            )
        if file_format == MAP_FORMAT and len(maps) != 1:
            raise ValueError(f"{sidecar}: a ResidualMap file holds one map, found {len(maps)}")
        return cls(maps=tuple(maps))


def _layer_index(layers: Sequence[int] | None, n_layers: int, side: str) -> dict[int, int]:
    layers = tuple(range(n_layers)) if layers is None else tuple(layers)
    if len(layers) != n_layers or len(set(layers)) != n_layers:
        raise ValueError(
            f"{side} layers {list(layers)} must be {n_layers} distinct indices (one per entry "
            f"of the activations' layer dimension)"
        )
    return {layer: i for i, layer in enumerate(layers)}


# ------------------------------------------------------------------------------------ fits


def _check_paired(source: Tensor, target: Tensor) -> None:
    if source.ndim != 2 or target.ndim not in (2, 3) or source.shape[0] != target.shape[0]:
        raise ValueError(
            f"paired activations must be source [n, d_src] and target [n, d_tgt] with the same "
            f"n; got source {_shape(source)} and target {_shape(target)}"
        )


@dataclass(frozen=True)
class _Split:
    """Training and held-out rows in float64 on the source's device."""

    source_train: Tensor
    target_train: Tensor
    source_test: Tensor
    target_test: Tensor


def _split(source: Tensor, target: Tensor, test_fraction: float, seed: int) -> _Split:
    train, test = holdout_split(source.shape[0], test_fraction, seed)
    device = source.device
    train, test = train.to(device), test.to(device)
    source, target = source.to(torch.float64), target.to(device=device, dtype=torch.float64)
    return _Split(source[train], target[train], source[test], target[test])


def _finish_map(
    split: _Split,
    weight: Tensor,
    bias: Tensor,
    *,
    method: MapMethod,
    hyperparameters: dict[str, Any],
    **provenance: Any,
) -> ResidualMap:
    quality = None
    if split.source_test.shape[0]:
        quality = fit_quality(
            split.source_test @ weight + bias,
            split.target_test,
            train_mean=split.target_train.mean(0),
            n_train=split.source_train.shape[0],
        )
    n_samples = split.source_train.shape[0] + split.source_test.shape[0]
    return ResidualMap(
        weight=weight,
        bias=bias,
        method=method,
        hyperparameters=hyperparameters,
        quality=quality,
        **{"n_samples": n_samples, **provenance},
    )


class _RidgeSystem:
    """Ridge on one centered ``X`` ``[n, d]``, in the primal or (when n < d) the dual form.

    Primal: ``W = (XᵀX + αI)⁻¹ XᵀY``. Dual: ``W = Xᵀ (XXᵀ + αI)⁻¹ Y``. Either way a prediction
    is ``features(X_new) @ solve(α, rhs)`` with ``features = X_new`` (primal) or
    ``X_new Xᵀ`` (dual), so cross-validation never forms ``W``, and solves for the held-out rows
    rather than for the targets' columns when there are fewer of them.
    """

    def __init__(self, x: Tensor) -> None:
        self.x = x
        self.primal = x.shape[0] >= x.shape[1]
        self.gram = x.mT @ x if self.primal else x @ x.mT

    def right_hand_side(self, y: Tensor) -> Tensor:
        return self.x.mT @ y if self.primal else y

    def features(self, x_new: Tensor) -> Tensor:
        return x_new if self.primal else x_new @ self.x.mT

    def solve(self, alpha: float, rhs: Tensor) -> Tensor:
        regularised = self.gram.clone()
        regularised.diagonal().add_(alpha)
        factor, info = torch.linalg.cholesky_ex(regularised)
        if int(info):
            raise ValueError(
                f"ridge system with alpha={alpha:g} is not positive definite (Gram matrix "
                f"{_shape(self.gram)}); use a larger alpha"
            )
        return torch.cholesky_solve(rhs, factor)

    def predict(self, alpha: float, features: Tensor, rhs: Tensor) -> Tensor:
        """``features @ solve(α, rhs)``, solving for whichever side has fewer columns."""
        if features.shape[0] < rhs.shape[1]:  # the system matrix is symmetric
            return self.solve(alpha, features.mT).mT @ rhs
        return features @ self.solve(alpha, rhs)

    def weights(self, alpha: float, rhs: Tensor) -> Tensor:
        """``W`` ``[d, m]`` for the columns of ``Y`` behind ``rhs``."""
        solved = self.solve(alpha, rhs)
        return solved if self.primal else self.x.mT @ solved


def _centered(x: Tensor, fit_intercept: bool) -> tuple[Tensor, Tensor]:
    mean = x.mean(0) if fit_intercept else torch.zeros_like(x[0])
    return x - mean, mean


def _ridge_cv_errors(
    x: Tensor,
    y: Tensor,
    alphas: Sequence[float],
    *,
    n_folds: int,
    fit_intercept: bool,
) -> Tensor:
    """Summed squared k-fold CV error ``[target, alpha]`` of ridge for ``y`` ``[n, target, m]``."""
    n, n_targets, width = y.shape
    errors = torch.zeros(n_targets, len(alphas), dtype=torch.float64, device=x.device)
    for fold in torch.tensor_split(torch.arange(n, device=x.device), n_folds):
        train = torch.ones(n, dtype=torch.bool, device=x.device)
        train[fold] = False
        x_train, x_mean = _centered(x[train], fit_intercept)
        y_train, y_mean = _centered(y[train].reshape(-1, n_targets * width), fit_intercept)
        system = _RidgeSystem(x_train)
        rhs = system.right_hand_side(y_train)
        features = system.features(x[fold] - x_mean)
        y_fold = y[fold].reshape(-1, n_targets * width) - y_mean
        for a, alpha in enumerate(alphas):
            residual = y_fold - system.predict(alpha, features, rhs)
            errors[:, a] += residual.square().reshape(-1, n_targets, width).sum((0, 2))
    return errors


def _sketch(y: Tensor, size: int | None, seed: int) -> Tensor:
    """``y`` ``[n, target, d]`` times a Gaussian ``[d, size] / √size`` (unchanged if d ≤ size)."""
    if size is None or y.shape[2] <= size:
        return y
    generator = torch.Generator().manual_seed(seed)
    omega = torch.randn(y.shape[2], size, generator=generator, dtype=torch.float64)
    return y @ (omega / math.sqrt(size)).to(y.device)


def fit_ridge_maps(
    source: Float[Tensor, "n_src d_src"],
    targets: Float[Tensor, "n_tgt target d_tgt"],
    *,
    source_layer: int = 0,
    target_layers: Sequence[int] | None = None,
    alphas: Sequence[float] = DEFAULT_RIDGE_ALPHAS,
    n_folds: int = 5,
    cv_sketch: int | None = _DEFAULT_CV_SKETCH,
    fit_intercept: bool = True,
    test_fraction: float = 0.2,
    seed: int = 0,
    **provenance: Any,
) -> tuple[ResidualMap, ...]:
    """Ridge maps from one source layer to several target layers, sharing the source's work.

    For each target, ``α`` is picked from ``alphas`` (multiples of the mean eigenvalue
    ``‖X_c‖²_F / d_src`` of the centered training Gram matrix) by ``n_folds``-fold CV on the
    training rows (contiguous folds in training order, like sklearn's ``KFold``; centered per
    fold), minimising the summed squared error; then the map is refitted on all training rows.
    sklearn's ``Ridge(alpha=map.hyperparameters["alpha"])`` on those rows gives the same map.

    Args:
        source: pooled source activations ``[n, d_src]`` (any float dtype/device; fitted in
            float64 on its device).
        targets: the same texts at each target layer ``[n, target, d_tgt]``.
        source_layer: model-layer index of ``source`` (recorded on the maps).
        target_layers: model-layer index of each target (default ``0 .. target-1``).
        alphas: the relative ridge grid; one value skips the CV.
        n_folds: CV folds.
        cv_sketch: score CV errors on ``y @ Ω`` with a seeded Gaussian ``Ω``
            ``[d_tgt, cv_sketch] / √cv_sketch`` (an unbiased estimate of each fold's squared
            error) when ``d_tgt > cv_sketch``, which makes CV cheap for wide targets; ``None``
            scores the exact error. The final maps never use the sketch.
        fit_intercept: centre both sides (``bias = ȳ − x̄ W``); otherwise ``bias = 0``.
        test_fraction: rows held out for :class:`FitQuality` (:func:`holdout_split`).
        seed: seeds the split and the sketch.
        **provenance: ``source_model``, ``target_model``, ``dataset``, ``extra``.

    Returns:
        One :class:`ResidualMap` per target, float64, on ``source``'s device.
    """
    _check_paired(source, targets)
    if targets.ndim != 3:
        raise ValueError(f"targets must be [n, target, d_tgt], got {_shape(targets)}")
    if not alphas or any(a <= 0 for a in alphas):
        raise ValueError(f"alphas must be a non-empty grid of positive numbers, got {alphas}")
    n_targets, d_target = targets.shape[1:]
    target_layers = tuple(range(n_targets)) if target_layers is None else tuple(target_layers)
    if len(target_layers) != n_targets:
        raise ValueError(f"{len(target_layers)} target layer indices for {n_targets} targets")
    split = _split(source, targets, test_fraction, seed)
    x_train, y_train = split.source_train, split.target_train
    if len(alphas) > 1 and not 2 <= n_folds <= x_train.shape[0]:
        raise ValueError(f"n_folds={n_folds} needs 2 ≤ n_folds ≤ {x_train.shape[0]} training rows")

    x_centered, x_mean = _centered(x_train, fit_intercept)
    scale = float(x_centered.square().sum()) / x_centered.shape[1]
    absolute = [float(a) * scale for a in alphas]
    sketched = len(alphas) > 1 and cv_sketch is not None and d_target > cv_sketch
    if len(alphas) > 1:
        errors = _ridge_cv_errors(
            x_train,
            _sketch(y_train, cv_sketch, seed),
            absolute,
            n_folds=n_folds,
            fit_intercept=fit_intercept,
        )
        choice = errors.argmin(1).tolist()
    else:
        choice = [0] * n_targets

    y_centered, y_mean = _centered(y_train.reshape(y_train.shape[0], -1), fit_intercept)
    system = _RidgeSystem(x_centered)
    rhs = system.right_hand_side(y_centered).reshape(-1, n_targets, d_target)
    weights: list[Tensor | None] = [None] * n_targets
    for a in sorted(set(choice)):
        chosen = [t for t in range(n_targets) if choice[t] == a]
        block = system.weights(absolute[a], rhs[:, chosen].reshape(rhs.shape[0], -1))
        for j, t in enumerate(chosen):
            weights[t] = block[:, j * d_target : (j + 1) * d_target]
    y_mean = y_mean.reshape(n_targets, d_target)
    maps = []
    for t, target_layer in enumerate(target_layers):
        weight = weights[t]
        target_split = _Split(x_train, y_train[:, t], split.source_test, split.target_test[:, t])
        hyperparameters = {
            "alpha": absolute[choice[t]],
            "alpha_relative": float(alphas[choice[t]]),
            "alphas_relative": [float(a) for a in alphas],
            "n_folds": n_folds if len(alphas) > 1 else None,
            "cv_sketch": cv_sketch if sketched else None,
            "fit_intercept": fit_intercept,
            "test_fraction": test_fraction,
            "seed": seed,
            "primal": system.primal,
        }
        maps.append(
            _finish_map(
                target_split,
                weight,
                y_mean[t] - x_mean @ weight,
                method="ridge",
                hyperparameters=hyperparameters,
                source_layer=source_layer,
                target_layer=target_layer,
                **provenance,
            )
        )
    return tuple(maps)


def fit_ridge(
    source: Float[Tensor, "n_src d_src"],
    target: Float[Tensor, "n_tgt d_tgt"],
    *,
    source_layer: int = 0,
    target_layer: int = 0,
    **options: Any,
) -> ResidualMap:
    """Ridge map from ``source`` ``[n, d_src]`` to ``target`` ``[n, d_tgt]``.

    One target of :func:`fit_ridge_maps` (same options: ``alphas``, ``n_folds``, ``cv_sketch``,
    ``fit_intercept``, ``test_fraction``, ``seed``, provenance).
    """
    _check_paired(source, target)
    if target.ndim != 2:
        raise ValueError(f"target must be [n, d_tgt], got {_shape(target)}")
    (single,) = fit_ridge_maps(
        source,
        target[:, None, :],
        source_layer=source_layer,
        target_layers=(target_layer,),
        **options,
    )
    return single


def orthogonal_procrustes(a: Float[Tensor, "n k"], b: Float[Tensor, "n k"]) -> Float[Tensor, "k k"]:
    """The orthogonal ``R`` minimising ``‖a R − b‖_F``: ``U Vᵀ`` from the SVD ``aᵀb = U S Vᵀ``.

    Same definition as ``scipy.linalg.orthogonal_procrustes(a, b)[0]``; float64.
    """
    if a.shape != b.shape:
        raise ValueError(f"Procrustes needs equal shapes, got a {_shape(a)} and b {_shape(b)}")
    u, _, vh = torch.linalg.svd(a.to(torch.float64).mT @ b.to(torch.float64))
    return u @ vh


def _principal_axes(centered: Tensor, rank: int, side: str) -> tuple[Tensor, Tensor]:
    """Top ``rank`` principal axes ``[d, rank]`` (unit columns) and standard deviations.

    Eigendecomposition of the smaller Gram matrix (``X Xᵀ`` when n < d, else ``Xᵀ X``).
    """
    n, d = centered.shape
    gram = centered @ centered.mT if n < d else centered.mT @ centered
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    eigenvalues = eigenvalues.flip(-1)[:rank]
    eigenvectors = eigenvectors.flip(-1)[:, :rank]
    tolerance = max(n, d) * torch.finfo(torch.float64).eps * float(eigenvalues[0].clamp_min(0))
    if not float(eigenvalues[-1]) > tolerance:
        raise ValueError(
            f"rank={rank} exceeds the numerical rank of the centered {side} training activations "
            f"{_shape(centered)}; choose a smaller rank"
        )
    axes = eigenvectors if n >= d else (centered.mT @ eigenvectors) / eigenvalues.sqrt()
    return axes, (eigenvalues / n).sqrt()


def fit_procrustes(
    source: Float[Tensor, "n_src d_src"],
    target: Float[Tensor, "n_tgt d_tgt"],
    *,
    rank: int,
    normalize: Normalization = "whiten",
    source_layer: int = 0,
    target_layer: int = 0,
    test_fraction: float = 0.2,
    seed: int = 0,
    **provenance: Any,
) -> ResidualMap:
    """Orthogonal Procrustes map between the two sides' top ``rank`` principal components.

    Both sides are centered and projected on their top ``rank`` principal axes ``P_s``, ``P_t``
    (training rows). With ``normalize="whiten"`` each component is scaled to unit variance
    (``Z = X_c P / σ``) and the map is ``W = (P_s / σ_s) R (P_t σ_t)ᵀ``, ``R`` the orthogonal
    Procrustes solution :func:`orthogonal_procrustes` ``(Z_s, Z_t)``: with whitening, any
    invertible linear relation of rank ``rank`` becomes a rotation. With ``"pca"`` the
    components keep their units and the rotation gets the least-squares global scale
    ``c = tr(S) / ‖Z_s‖²_F`` (the models' residual norms can differ by orders of magnitude):
    ``W = c P_s R P_tᵀ``. ``bias = ȳ − x̄ W``.

    Args:
        rank: the common rank ``k``, at most ``min(d_src, d_tgt, n_train − 1)`` and the numerical
            rank of both sides. No default: whitening near-null directions amplifies noise, and
            real residual streams have a huge spread of variances (outlier dimensions), so
            ``k`` is a modelling choice (``docs/transfer.md`` has a sweep on real models).
        normalize: ``"whiten"`` or ``"pca"``.
        test_fraction, seed, source_layer, target_layer, **provenance: as :func:`fit_ridge_maps`.
    """
    _check_paired(source, target)
    if normalize not in ("whiten", "pca"):
        raise ValueError(f"normalize must be 'whiten' or 'pca', got {normalize!r}")
    split = _split(source, target, test_fraction, seed)
    n_train = split.source_train.shape[0]
    max_rank = min(source.shape[1], target.shape[1], n_train - 1)
    if not 1 <= rank <= max_rank:
        raise ValueError(
            f"rank must be in 1..min(d_src, d_tgt, n_train - 1)={max_rank}, got {rank}"
        )
    x_centered, x_mean = _centered(split.source_train, True)
    y_centered, y_mean = _centered(split.target_train, True)
    source_axes, source_std = _principal_axes(x_centered, rank, "source")
    target_axes, target_std = _principal_axes(y_centered, rank, "target")
    if normalize == "whiten":
        source_basis, target_basis = source_axes / source_std, target_axes / target_std
        rotation = orthogonal_procrustes(x_centered @ source_basis, y_centered @ target_basis)
        weight = source_basis @ rotation @ (target_axes * target_std).mT
        scale = 1.0
    else:
        z_source, z_target = x_centered @ source_axes, y_centered @ target_axes
        rotation = orthogonal_procrustes(z_source, z_target)
        singular_values = torch.linalg.svdvals(z_source.mT @ z_target)
        scale = float(singular_values.sum() / z_source.square().sum())
        weight = scale * source_axes @ rotation @ target_axes.mT
    return _finish_map(
        split,
        weight,
        y_mean - x_mean @ weight,
        method="procrustes",
        hyperparameters={
            "rank": rank,
            "normalize": normalize,
            "scale": scale,
            "test_fraction": test_fraction,
            "seed": seed,
        },
        source_layer=source_layer,
        target_layer=target_layer,
        **provenance,
    )


def _inverse_sqrt(covariance: Tensor, side: str) -> Tensor:
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    if not float(eigenvalues[0]) > covariance.shape[0] * torch.finfo(torch.float64).eps * float(
        eigenvalues[-1]
    ):
        raise ValueError(
            f"the {side} covariance {_shape(covariance)} is singular (fewer training rows than "
            "dimensions, or collinear features); use regularization > 0"
        )
    return (eigenvectors / eigenvalues.sqrt()) @ eigenvectors.mT


def _shrunk(covariance: Tensor, regularization: float) -> Tensor:
    """``(1 − r) Σ + r · (tr Σ / d) I``: shrinkage towards a scaled identity, scale-free."""
    shrunk = (1.0 - regularization) * covariance
    shrunk.diagonal().add_(regularization * float(covariance.diagonal().mean()))
    return shrunk


def fit_cca(
    source: Float[Tensor, "n_src d_src"],
    target: Float[Tensor, "n_tgt d_tgt"],
    *,
    n_components: int,
    regularization: float = 0.1,
    source_layer: int = 0,
    target_layer: int = 0,
    test_fraction: float = 0.2,
    seed: int = 0,
    **provenance: Any,
) -> ResidualMap:
    """Regularised CCA map through the first ``n_components`` canonical variates of the source.

    With covariances shrunk as ``Σ_r = (1 − r) Σ + r (tr Σ / d) I``, the canonical directions
    come from the SVD ``Σ_xx,r^{-1/2} Σ_xy Σ_yy,r^{-1/2} = U diag(ρ) Vᵀ``: ``A = Σ_xx,r^{-1/2}
    U_k``. The map is the least-squares regression of the target on the source's canonical
    variates ``X_c A``: ``W = A (Aᵀ Σ_xx A)⁻¹ Aᵀ Σ_xy``, ``bias = ȳ − x̄ W``. At ``r = 0`` and
    ``k = min(d_src, d_tgt)`` this is ordinary least squares; smaller ``k`` keeps only the most
    correlated directions. ``hyperparameters["canonical_correlations"]`` lists ``ρ_1..ρ_k``
    (of the shrunk covariances).

    Args:
        n_components: ``k``, at most ``min(d_src, d_tgt)``.
        regularization: ``r`` in ``[0, 1)``; must be > 0 when a covariance is singular (fewer
            training rows than dimensions).
        test_fraction, seed, source_layer, target_layer, **provenance: as :func:`fit_ridge_maps`.
    """
    _check_paired(source, target)
    max_components = min(source.shape[1], target.shape[1])
    if not 1 <= n_components <= max_components:
        raise ValueError(
            f"n_components must be in 1..min(d_src, d_tgt)={max_components}, got {n_components}"
        )
    if not 0.0 <= regularization < 1.0:
        raise ValueError(f"regularization must be in [0, 1), got {regularization}")
    split = _split(source, target, test_fraction, seed)
    x_centered, x_mean = _centered(split.source_train, True)
    y_centered, y_mean = _centered(split.target_train, True)
    n_train = x_centered.shape[0]
    cov_xx = x_centered.mT @ x_centered / n_train
    cov_xy = x_centered.mT @ y_centered / n_train
    cov_yy = y_centered.mT @ y_centered / n_train
    whiten_x = _inverse_sqrt(_shrunk(cov_xx, regularization), "source")
    whiten_y = _inverse_sqrt(_shrunk(cov_yy, regularization), "target")
    u, correlations, _ = torch.linalg.svd(whiten_x @ cov_xy @ whiten_y, full_matrices=False)
    directions = whiten_x @ u[:, :n_components]
    weight = directions @ torch.linalg.solve(
        directions.mT @ cov_xx @ directions, directions.mT @ cov_xy
    )
    return _finish_map(
        split,
        weight,
        y_mean - x_mean @ weight,
        method="cca",
        hyperparameters={
            "n_components": n_components,
            "regularization": regularization,
            "canonical_correlations": correlations[:n_components].tolist(),
            "test_fraction": test_fraction,
            "seed": seed,
        },
        source_layer=source_layer,
        target_layer=target_layer,
        **provenance,
    )


# ------------------------------------------------------------------------------------- CKA

CKAForm = Literal["auto", "gram", "feature"]


def _centered_float64(x: Tensor, standardize: bool) -> Tensor:
    """Column-centered float64 copy; with ``standardize``, columns scaled to unit variance
    (constant columns stay zero)."""
    x = x.to(torch.float64)
    x = x - x.mean(0)
    if standardize:
        std = x.square().mean(0).sqrt()
        x = x / torch.where(std > 0, std, 1.0)
    return x


def _normalised_gram(x: Tensor, side: str, standardize: bool) -> Tensor:
    """``K / ‖K‖_F`` for ``K = X_c X_cᵀ``, flattened to ``[n²]``."""
    centered = _centered_float64(x, standardize)
    gram = centered @ centered.mT
    norm = torch.linalg.matrix_norm(gram)
    if not float(norm) > 0:
        raise ValueError(f"{side} activations {_shape(x)} have zero variance: CKA is undefined")
    return (gram / norm).reshape(-1)


def _gram_is_cheaper(n: int, n_source: int, d_source: int, n_target: int, d_target: int) -> bool:
    """Whether the Gram form needs fewer flops for all ``n_source × n_target`` pairs.

    Gram: one ``n × n`` matrix per layer plus an ``n²`` inner product per pair. Feature:
    ``X_cᵀ Y_c`` per pair plus each layer's own ``X_cᵀ X_c``.
    """
    gram = n * n * (n_source * d_source + n_target * d_target + n_source * n_target)
    feature = n * (
        n_source * n_target * d_source * d_target + n_source * d_source**2 + n_target * d_target**2
    )
    return gram < feature


def linear_cka(
    x: Float[Tensor, "n_x d_x"],
    y: Float[Tensor, "n_y d_y"],
    *,
    standardize: bool = False,
    form: CKAForm = "auto",
) -> float:
    """Linear CKA (Kornblith et al. 2019) of two representations of the same ``n`` inputs.

    ``‖X_cᵀ Y_c‖²_F / (‖X_cᵀ X_c‖_F ‖Y_cᵀ Y_c‖_F)`` with column-centered ``X_c``, ``Y_c``
    (the feature form), or equivalently ``⟨K_x, K_y⟩_F / (‖K_x‖_F ‖K_y‖_F)`` with
    ``K = X_c X_cᵀ`` (the Gram form, cheaper when ``n`` is below the widths). In float64, in
    ``[0, 1]``; invariant to rotations and isotropic scaling of either side.

    Linear CKA weighs directions by their variance, so a few outlier ("massive activation")
    dimensions can dominate it; ``standardize=True`` scales every feature to unit variance
    first (then it is no longer rotation-invariant).
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"CKA needs x [n, d_x] and y [n, d_y] with the same n; got x "
            f"{_shape(x)} and y {_shape(y)}"
        )
    return float(cka_matrix(x[:, None], y[:, None], standardize=standardize, form=form)[0, 0])


def cka_matrix(
    source_acts: Float[Tensor, "n_src source_layer d_src"],
    target_acts: Float[Tensor, "n_tgt target_layer d_tgt"],
    *,
    standardize: bool = False,
    form: CKAForm = "auto",
) -> Float[Tensor, "source_layer target_layer"]:
    """Linear CKA between every source layer and every target layer, ``[Ls, Lt]`` float64.

    The Gram form keeps the ``Lt`` normalised target Gram matrices (``Lt · n²`` float64) and
    makes one source Gram matrix at a time; the feature form computes ``X_cᵀ Y_c`` per source
    layer against all target layers at once (``d_src × Lt·d_tgt``). ``"auto"`` picks the one
    with fewer flops. Runs on ``source_acts``' device; layers are cast to float64 one at a time.
    ``standardize`` as in :func:`linear_cka`.
    """
    if (
        source_acts.ndim != 3
        or target_acts.ndim != 3
        or source_acts.shape[0] != target_acts.shape[0]
    ):
        raise ValueError(
            f"CKA needs source [n, layer, d_src] and target [n, layer, d_tgt] activations of the "
            f"same n; got source {_shape(source_acts)} and target {_shape(target_acts)}"
        )
    n, n_source, d_source = source_acts.shape
    _, n_target, d_target = target_acts.shape
    device = source_acts.device
    target_acts = target_acts.to(device)
    if form == "auto":
        form = "gram" if _gram_is_cheaper(n, n_source, d_source, n_target, d_target) else "feature"
    result = torch.empty(n_source, n_target, dtype=torch.float64, device=device)
    if form == "gram":
        targets = torch.stack(
            [_normalised_gram(target_acts[:, t], "target", standardize) for t in range(n_target)]
        )
        for s in range(n_source):
            result[s] = targets @ _normalised_gram(source_acts[:, s], "source", standardize)
    elif form == "feature":
        centered_targets = torch.stack(
            [_centered_float64(target_acts[:, t], standardize) for t in range(n_target)], dim=1
        )
        target_norms = torch.linalg.matrix_norm(
            torch.einsum("ntd,nte->tde", centered_targets, centered_targets)
        )
        flat_targets = centered_targets.reshape(n, n_target * d_target)
        for s in range(n_source):
            centered = _centered_float64(source_acts[:, s], standardize)
            cross = (centered.mT @ flat_targets).reshape(d_source, n_target, d_target)
            source_norm = torch.linalg.matrix_norm(centered.mT @ centered)
            result[s] = cross.square().sum((0, 2)) / (source_norm * target_norms)
    else:
        raise ValueError(f"form must be auto, gram or feature, got {form!r}")
    if not bool(torch.isfinite(result).all()):
        raise ValueError("a layer has zero variance: CKA is undefined")
    return result


# -------------------------------------------------------------------------- layer matching


def match_by_depth(
    n_source_layers: int, n_target_layers: int, target_layers: Sequence[int] | None = None
) -> tuple[LayerPair, ...]:
    """Pair each target layer with the source layer at the same relative depth.

    Block ``t`` of ``L_t`` sits at depth ``(t + 1) / L_t`` (the share of blocks passed); its
    source partner is ``round((t + 1) · L_s / L_t) − 1`` (halves round up), clamped to
    ``0 .. L_s − 1``. So the last layers match; e.g. 18 → 30 layers: target 0 ↔ source 1,
    target 17 ↔ source 29.
    """
    if n_source_layers < 1 or n_target_layers < 1:
        raise ValueError(f"layer counts must be positive, got {n_source_layers}, {n_target_layers}")
    targets = range(n_target_layers) if target_layers is None else target_layers
    pairs = []
    for t in targets:
        if not 0 <= t < n_target_layers:
            raise ValueError(f"target layer {t} outside 0..{n_target_layers - 1}")
        source = math.floor((t + 1) * n_source_layers / n_target_layers + 0.5) - 1
        pairs.append((min(max(source, 0), n_source_layers - 1), t))
    return tuple(pairs)


def match_by_cka(
    cka: Float[Tensor, "source_layer target_layer"],
    *,
    source_layers: Sequence[int] | None = None,
    target_layers: Sequence[int] | None = None,
    select: Sequence[int] | None = None,
) -> tuple[LayerPair, ...]:
    """Pair each target layer with the source layer of highest CKA (first on ties).

    Args:
        cka: ``[Ls, Lt]`` from :func:`cka_matrix`.
        source_layers: model-layer index of each row (default ``0 .. Ls-1``); likewise
            ``target_layers`` for the columns.
        select: the target layers to pair (default all columns).
    """
    source_index = _layer_index(source_layers, cka.shape[0], "source")
    target_index = _layer_index(target_layers, cka.shape[1], "target")
    sources = list(source_index)
    pairs = []
    for t in target_index if select is None else select:
        if t not in target_index:
            raise ValueError(f"target layer {t} has no CKA column; columns: {list(target_index)}")
        pairs.append((sources[int(cka[:, target_index[t]].argmax())], t))
    return tuple(pairs)


def cka_heatmap(
    cka: Float[Tensor, "source_layer target_layer"],
    *,
    source_layers: Sequence[int] | None = None,
    target_layers: Sequence[int] | None = None,
    pairs: Sequence[LayerPair] = (),
    source_name: str = "source",
    target_name: str = "target",
    title: str | None = None,
    path: str | os.PathLike | None = None,
    dpi: int = 150,
) -> Figure:
    """Heatmap of ``cka`` (source layers as rows, target layers as columns, 0–1 scale).

    ``pairs`` (e.g. from :func:`match_by_cka` or :func:`match_by_depth`) are outlined. Saved as a
    PNG atomically when ``path`` is given.
    """
    source_index = _layer_index(source_layers, cka.shape[0], "source")
    target_index = _layer_index(target_layers, cka.shape[1], "target")
    grid = cka.detach().to("cpu", torch.float64).numpy()
    fig = Figure(
        figsize=(max(5.0, 0.28 * grid.shape[1] + 2.5), max(4.0, 0.22 * grid.shape[0] + 1.8)),
        layout="constrained",
    )
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    image = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto", origin="lower")
    fig.colorbar(image, ax=ax, label="linear CKA")
    for source, target in pairs:
        ax.add_patch(
            Rectangle(
                (target_index[target] - 0.5, source_index[source] - 0.5),
                1,
                1,
                fill=False,
                edgecolor="red",
                linewidth=1.5,
            )
        )
    _set_layer_ticks(ax.set_xticks, list(target_index))
    _set_layer_ticks(ax.set_yticks, list(source_index))
    ax.set_xlabel(f"{target_name} layer")
    ax.set_ylabel(f"{source_name} layer")
    ax.set_title(title or f"Linear CKA: {source_name} vs {target_name}")
    if path is not None:
        save_png(fig, path, dpi=dpi)
    return fig


def _set_layer_ticks(setter: Any, layers: list[int]) -> None:
    step = max(1, math.ceil(len(layers) / 16))
    positions = list(range(0, len(layers), step))
    setter(positions, [str(layers[p]) for p in positions])


# ------------------------------------------------------------------------------- homophily


@dataclass(frozen=True)
class Spread:
    """How far apart a set of agents' scores on one metric are.

    Attributes:
        std: population standard deviation (``ddof = 0``).
        range: max − min.
        mean_pairwise_distance: mean ``|s_i − s_j|`` over all unordered pairs of agents.
        n_agents: number of scores.
    """

    std: float
    range: float
    mean_pairwise_distance: float
    n_agents: int


def score_spread(scores: Mapping[str, float] | Values) -> Spread:
    """:class:`Spread` of one metric's scores, one per agent (at least 2, all finite)."""
    values = list(scores.values()) if isinstance(scores, Mapping) else scores
    if isinstance(values, Tensor):
        values = values.detach().to("cpu", torch.float64).numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size < 2 or not np.isfinite(array).all():
        raise ValueError(f"spread needs at least 2 finite scores in a 1-D series, got {array!r}")
    distances = [abs(a - b) for a, b in combinations(array.tolist(), 2)]
    return Spread(
        std=float(array.std()),
        range=float(array.max() - array.min()),
        mean_pairwise_distance=float(np.mean(distances)),
        n_agents=int(array.size),
    )


Scores = Mapping[str, Mapping[str, float]]
"""``{agent: {metric: score}}``, e.g. ``{"Gemma-3-270M": {"aqi": 41.0, "refusal_rate": 0.3}}``."""


@dataclass(frozen=True)
class HomophilyReport:
    """Per metric, the spread of the agents' scores before and after steering.

    Attributes:
        metrics: metric names, in first-seen order.
        agents: agent names, in the order given.
        before: ``{metric: Spread}`` without steering.
        after: ``{metric: Spread}`` with steering.
    """

    metrics: tuple[str, ...]
    agents: tuple[str, ...]
    before: dict[str, Spread]
    after: dict[str, Spread]

    def ratio(self, metric: str, statistic: str = "std") -> float:
        """``after / before`` of one :class:`Spread` field (< 1: the agents moved closer)."""
        before = getattr(self.before[metric], statistic)
        after = getattr(self.after[metric], statistic)
        return after / before if before > 0 else math.inf if after > 0 else 1.0

    def rows(self) -> list[dict[str, Any]]:
        """One JSON-ready row per metric: every spread statistic before and after, std ratio."""
        return [
            {
                "metric": metric,
                **{f"{key}_before": value for key, value in vars(self.before[metric]).items()},
                **{f"{key}_after": value for key, value in vars(self.after[metric]).items()},
                "std_ratio": self.ratio(metric),
            }
            for metric in self.metrics
        ]


def _metric_table(
    scores: Scores, agents: Sequence[str], metrics: Sequence[str], when: str
) -> dict[str, dict[str, float]]:
    table: dict[str, dict[str, float]] = {}
    for metric in metrics:
        missing = [a for a in agents if metric not in scores.get(a, {})]
        if missing:
            raise ValueError(f"{when} scores lack metric {metric!r} for agents {missing}")
        table[metric] = {a: float(scores[a][metric]) for a in agents}
    return table


def _aligned(before: Scores, after: Scores) -> tuple[list[str], list[str]]:
    agents = list(before)
    if set(after) != set(agents):
        raise ValueError(
            f"before and after must score the same agents; before {sorted(before)}, "
            f"after {sorted(after)}"
        )
    metrics = list(dict.fromkeys(m for a in agents for m in before[a]))
    return agents, metrics


def homophily(before: Scores, after: Scores) -> HomophilyReport:
    """Spread of every metric across agents, without (``before``) and with (``after``) steering.

    Every agent needs every metric in both; scores are compared as given (so put metrics on a
    common scale first if agents' scales differ).
    """
    agents, metrics = _aligned(before, after)
    table_before = _metric_table(before, agents, metrics, "before")
    table_after = _metric_table(after, agents, metrics, "after")
    return HomophilyReport(
        metrics=tuple(metrics),
        agents=tuple(agents),
        before={m: score_spread(table_before[m]) for m in metrics},
        after={m: score_spread(table_after[m]) for m in metrics},
    )


def homophily_plot(
    before: Scores,
    after: Scores,
    *,
    title: str = "Agents' scores before and after steering",
    path: str | os.PathLike | None = None,
    dpi: int = 150,
) -> Figure:
    """One panel per metric: each agent's score before → after, and the std of each column.

    Saved as a PNG atomically when ``path`` is given.
    """
    report = homophily(before, after)
    agents, metrics = list(report.agents), list(report.metrics)
    table_before = _metric_table(before, agents, metrics, "before")
    table_after = _metric_table(after, agents, metrics, "after")
    fig = Figure(figsize=(max(4.0, 3.2 * len(metrics)), 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    colours = [f"C{i % 10}" for i in range(len(agents))]
    for ax, metric in zip(axes, metrics, strict=True):
        for agent, colour in zip(agents, colours, strict=True):
            ax.plot(
                [0, 1],
                [table_before[metric][agent], table_after[metric][agent]],
                marker="o",
                color=colour,
                label=agent,
            )
        ax.set_xticks(
            [0, 1],
            [
                f"before\nstd {report.before[metric].std:.3g}",
                f"after\nstd {report.after[metric].std:.3g}",
            ],
        )
        ax.set_xlim(-0.3, 1.3)
        ax.set_title(metric)
    axes[0].legend(fontsize="small", loc="best")
    fig.suptitle(title)
    if path is not None:
        save_png(fig, path, dpi=dpi)
    return fig
