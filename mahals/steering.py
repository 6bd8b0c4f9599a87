"""Steering vectors (D-STEER): a typed per-layer vector with provenance, and SVD of differences.

**Layer convention.** Row *i* of :attr:`SteeringVector.vectors` belongs to model layer
``layers[i]``, and model layer *l* means the **output of decoder block l** (0-based), the same
convention as :mod:`mahals.capture`. That is HF's ``hidden_states[l + 1]`` (``hidden_states[0]``
is the embedding output), except that for the last block HF applies the final norm and mahals
does not.

**GGUF export** (:meth:`SteeringVector.to_gguf`) writes llama.cpp's control-vector format, the
one repeng's ``ControlVector.export_gguf`` writes: ``general.architecture = "controlvector"``,
``controlvector.model_hint`` (string), ``controlvector.layer_count`` (uint32, the number of
direction tensors, as repeng writes it) and one float32 1-D tensor ``direction.{l}`` per layer.
The index is the mahals layer index *unchanged*, because all three agree on it:

* llama.cpp adds ``direction.{il}`` to the output of block ``il`` (``build_cvec(cur, il)`` at
  the end of layer ``il``'s graph); its loader rejects ``direction.0`` ("invalid (zero)
  direction tensor layer index") and stores ``direction.{k}`` at offset ``(k - 1) * n_embd``,
  which ``llama_adapter_cvec::apply`` hands to block ``k``;
* repeng reads block ``layer``'s output as ``hidden_states[layer + 1]``, steers
  ``model.layers[layer]``'s output, and exports it as ``direction.{layer}``.

So no ``+ 1`` shift. A vector indexed by HF ``hidden_states`` position *h* instead belongs to
block ``h - 1``. Block 0's output cannot be steered by llama.cpp: its row is left out of the file,
with a warning when it is non-zero.

**SVD** (:func:`difference_svd`) decomposes, per layer, the ``[n, d_model]`` matrix of
per-sample differences ``D = h_tuned - h_base``, batched over layers as ``[layer, n, d_model]``.
How, with ``method="auto"``:

* by default (``compute_dtype=float32``), and for float64 when ``min(n, d_model) > 512``: the
  eigendecomposition of the smaller Gram matrix (``D Dᵀ``, ``n × n``, when ``n <= d_model``,
  else ``Dᵀ D``). It is exact, but forming a Gram matrix squares the condition number, so it is
  formed and decomposed in float64 (whatever the compute dtype; a few layers at a time to bound
  memory): a singular value ``s`` keeps a relative accuracy of about ``1e-16 · (s₁ / s)²``.
  It costs one GEMM plus an eigendecomposition of a ``min(n, d)²`` matrix. On an H100 (32
  layers, d_model 4096, centred, top 4) it took 0.045 / 0.23 / 0.94 s for n = 100 / 600 / 2000
  against 0.10 / 0.91 / 7.3 s for ``torch.linalg.svd``, whose float32 cuSOLVER singular values
  were also the least accurate (up to 8e-4 relative off the values on which the float64 Gram
  path and the low-rank path agreed); on a busy 2-core CPU it was 7-10× faster than the direct
  SVD;
* ``compute_dtype=float64`` and ``min(n, d_model) <= 512``: ``torch.linalg.svd(D,
  full_matrices=False)``, exact to float64 precision even for tiny singular values;
* ``method="lowrank"`` (explicit only): ``torch.svd_lowrank``, randomised (Halko et al.) and
  approximate, for the top ``n_components`` of inputs too large even for a Gram matrix.

Every path runs on the input's device. Singular directions below the numerical rank
(``s <= max(n, d) · eps · s₁``) are returned as zero rows with ``s = 0``: they carry no
direction (a centred ``D`` has rank at most ``n - 1``).
"""

from __future__ import annotations

import json
import numbers
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import gguf
import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from mahals._version import __version__
from mahals.io import atomic_write_bytes, atomic_write_json, load_tensors, save_tensors

__all__ = ["SteeringVector", "DifferenceSVD", "DSteerStats", "difference_svd"]

TokenPosition = Literal["last", "mean"]
SVDMethod = Literal["auto", "full", "gram", "lowrank"]

SIDECAR_FORMAT = "mahals.SteeringVector"
SIDECAR_FORMAT_VERSION = 1
TENSOR_KEY = "vectors"
GGUF_ARCH = "controlvector"

# Elements per chunk when a float64 copy is made (2**24 float64 = 128 MiB).
_FLOAT64_CHUNK_ELEMENTS = 2**24
# min(n, d_model) up to which method="auto" runs a direct float64 SVD rather than a Gram eigensolve.
_DIRECT_SVD_MAX_RANK = 512
# Extra random directions and power iterations for torch.svd_lowrank.
_LOWRANK_OVERSAMPLING = 10
_LOWRANK_POWER_ITERATIONS = 4


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other float dtype reduces in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _agreed(first: Any, second: Any) -> Any:
    """The common value of a metadata field, or ``None`` when the operands disagree."""
    return first if first == second else None


def _as_operand(kind: str) -> str:
    """A kind string that reads unambiguously inside a larger expression."""
    return f"({kind})" if " " in kind else kind


@dataclass(frozen=True, eq=False)
class SteeringVector:
    """One steering direction per model layer, with where it came from.

    Attributes:
        vectors: ``[layer, d_model]``, in the model's residual-stream units; row *i* is model
            layer ``layers[i]`` (output of decoder block ``layers[i]``, 0-based).
        layers: model-layer index of each row (distinct, non-negative).
        base_model: name or hub id of the reference model (``h_base``).
        tuned_model: name or hub id of the tuned model (``h_tuned``).
        dataset: what the differences were averaged over (e.g. ``"Anthropic/hh-rlhf:chosen"``).
        n_samples: number of samples the vector was computed from.
        token_position: ``"last"`` (last real token) or ``"mean"`` (mean over real tokens).
        kind: what the rows are: ``"mean_diff"``, ``"svd3"``, or an expression such as
            ``"mean_diff - svd0"`` for derived vectors.
        description: free text.
        created: ISO-8601 UTC timestamp.
        mahals_version: ``mahals.__version__`` of the code that made it.
        extra: free-form JSON-serialisable metadata.

    Arithmetic (``+``, ``-`` between vectors of the same layers and shape, scalar ``*``, unary
    ``-``) returns a new vector: metadata fields the operands agree on are kept, the others
    become ``None``; ``kind`` records the expression; ``extra`` keeps the entries both share.
    """

    vectors: Float[Tensor, "layer d_model"]
    layers: tuple[int, ...]
    base_model: str | None = None
    tuned_model: str | None = None
    dataset: str | None = None
    n_samples: int | None = None
    token_position: TokenPosition | None = None
    kind: str = "mean_diff"
    description: str = ""
    created: str = field(default_factory=_now_iso)
    mahals_version: str = __version__
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2 or not self.vectors.is_floating_point():
            raise ValueError(
                f"vectors must be a floating [layer, d_model] tensor, got {self.vectors.dtype} "
                f"of shape {tuple(self.vectors.shape)}"
            )
        layers = tuple(self.layers)
        object.__setattr__(self, "layers", layers)
        if len(layers) != self.vectors.shape[0]:
            raise ValueError(
                f"{len(layers)} layer indices for {self.vectors.shape[0]} rows of vectors"
            )
        if any(
            isinstance(index, bool) or not isinstance(index, int) or index < 0 for index in layers
        ):
            raise ValueError(f"layers must be non-negative ints, got {list(layers)}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers must be distinct, got {list(layers)}")
        if self.token_position not in (None, "last", "mean"):
            raise ValueError(
                f"token_position must be 'last' or 'mean', got {self.token_position!r}"
            )

    # ----------------------------------------------------------------------------- construction

    @classmethod
    def from_diff(
        cls,
        h_base: Float[Tensor, "n layer d_model"],
        h_tuned: Float[Tensor, "n layer d_model"],
        *,
        layers: Sequence[int] | None = None,
        **metadata: Any,
    ) -> SteeringVector:
        """The mean per-sample difference ``mean_i (h_tuned[i] - h_base[i])`` of every layer.

        Args:
            h_base: pooled hidden states of the reference model, ``[n, layer, d_model]``.
            h_tuned: the same samples through the tuned model, same shape.
            layers: model-layer index of each entry of dimension 1; default ``0 .. layer-1``.
            **metadata: any other :class:`SteeringVector` field (``base_model``, ``dataset``,
                ``token_position``, ...); ``kind`` defaults to ``"mean_diff"``. ``n_samples``
                is set to ``n``.

        Returns:
            float32 ``[layer, d_model]`` vector on the inputs' device, accumulated in float64
            (in chunks of samples, so no float64 copy of the whole input is made).
        """
        if h_base.shape != h_tuned.shape or h_base.ndim != 3:
            raise ValueError(
                f"h_base and h_tuned must both be [n, layer, d_model], got "
                f"{tuple(h_base.shape)} and {tuple(h_tuned.shape)}"
            )
        n_samples, n_layers, d_model = h_base.shape
        if n_samples == 0:
            raise ValueError("cannot average over zero samples")
        chunk = max(1, _FLOAT64_CHUNK_ELEMENTS // (n_layers * d_model))
        total = torch.zeros(n_layers, d_model, dtype=torch.float64, device=h_base.device)
        for start in range(0, n_samples, chunk):
            tuned = h_tuned[start : start + chunk].to(torch.float64)
            total += (tuned - h_base[start : start + chunk].to(torch.float64)).sum(0)
        mean = (total / n_samples).to(torch.float32)
        return cls(
            vectors=mean,
            layers=tuple(range(n_layers)) if layers is None else tuple(layers),
            n_samples=n_samples,
            **{"kind": "mean_diff", **metadata},
        )

    # ------------------------------------------------------------------------------- arithmetic

    def _check_compatible(self, other: SteeringVector, operation: str) -> None:
        if other.layers != self.layers:
            raise ValueError(
                f"cannot {operation} steering vectors of different layers: "
                f"{list(self.layers)} vs {list(other.layers)}"
            )
        if other.vectors.shape != self.vectors.shape:
            raise ValueError(
                f"cannot {operation} steering vectors of shapes {tuple(self.vectors.shape)} "
                f"and {tuple(other.vectors.shape)}"
            )

    def _combine(self, other: SteeringVector, vectors: Tensor, symbol: str) -> SteeringVector:
        return SteeringVector(
            vectors=vectors,
            layers=self.layers,
            base_model=_agreed(self.base_model, other.base_model),
            tuned_model=_agreed(self.tuned_model, other.tuned_model),
            dataset=_agreed(self.dataset, other.dataset),
            n_samples=_agreed(self.n_samples, other.n_samples),
            token_position=_agreed(self.token_position, other.token_position),
            kind=f"{_as_operand(self.kind)} {symbol} {_as_operand(other.kind)}",
            description=_agreed(self.description, other.description) or "",
            extra={k: v for k, v in self.extra.items() if k in other.extra and other.extra[k] == v},
        )

    def _derive(self, vectors: Tensor, kind: str) -> SteeringVector:
        """Same provenance, new rows and kind, fresh timestamp and version."""
        return replace(
            self, vectors=vectors, kind=kind, created=_now_iso(), mahals_version=__version__
        )

    def __add__(self, other: object) -> SteeringVector:
        if not isinstance(other, SteeringVector):
            return NotImplemented
        self._check_compatible(other, "add")
        return self._combine(other, self.vectors + other.vectors, "+")

    def __sub__(self, other: object) -> SteeringVector:
        if not isinstance(other, SteeringVector):
            return NotImplemented
        self._check_compatible(other, "subtract")
        return self._combine(other, self.vectors - other.vectors, "-")

    def __mul__(self, scale: object) -> SteeringVector:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            return NotImplemented
        return self._derive(
            self.vectors * float(scale), f"{float(scale):g}*{_as_operand(self.kind)}"
        )

    __rmul__ = __mul__

    def __neg__(self) -> SteeringVector:
        return self._derive(-self.vectors, f"-{_as_operand(self.kind)}")

    # ---------------------------------------------------------------------------------- queries

    def norms(self) -> Float[Tensor, " layer"]:
        """Euclidean norm of each layer's row (float32, or float64 for float64 vectors)."""
        return torch.linalg.vector_norm(
            self.vectors, dim=-1, dtype=_accumulation_dtype(self.vectors.dtype)
        )

    def normalized(self) -> SteeringVector:
        """Unit-norm rows, same dtype; an all-zero row stays zero."""
        norms = self.norms()
        safe = torch.where(norms > 0, norms, torch.ones_like(norms))
        unit = (self.vectors.to(norms.dtype) / safe[:, None]).to(self.vectors.dtype)
        return self._derive(unit, f"normalized({self.kind})")

    def cosine(self, other: SteeringVector) -> Float[Tensor, " layer"]:
        """Cosine similarity with ``other`` per layer; 0 where either row is zero."""
        self._check_compatible(other, "compare")
        dtype = torch.promote_types(
            _accumulation_dtype(self.vectors.dtype), _accumulation_dtype(other.vectors.dtype)
        )
        mine, theirs = (
            self.vectors.to(dtype),
            other.vectors.to(dtype=dtype, device=self.vectors.device),
        )
        norm_product = torch.linalg.vector_norm(mine, dim=-1) * torch.linalg.vector_norm(
            theirs, dim=-1
        )
        dots = (mine * theirs).sum(-1)
        return torch.where(
            norm_product > 0, dots / norm_product.clamp_min(torch.finfo(dtype).tiny), 0.0
        )

    def layer(self, model_layer: int) -> Float[Tensor, " d_model"]:
        """The row of model layer ``model_layer`` (a model index, not a row position)."""
        if model_layer not in self.layers:
            raise IndexError(f"no row for model layer {model_layer}; layers: {list(self.layers)}")
        return self.vectors[self.layers.index(model_layer)]

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> SteeringVector:
        """The same vector (same metadata) on another device and/or in another float dtype."""
        return replace(self, vectors=self.vectors.to(device=device, dtype=dtype))

    # -------------------------------------------------------------------------------------- I/O

    def metadata(self) -> dict[str, Any]:
        """Every field except ``vectors``, JSON-ready (the content of the sidecar)."""
        return {
            "layers": list(self.layers),
            "base_model": self.base_model,
            "tuned_model": self.tuned_model,
            "dataset": self.dataset,
            "n_samples": self.n_samples,
            "token_position": self.token_position,
            "kind": self.kind,
            "description": self.description,
            "created": self.created,
            "mahals_version": self.mahals_version,
            "extra": self.extra,
        }

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (safetensors, key ``"vectors"``) and ``path.with_suffix(".json")``.

        Both writes are atomic; the tensor file is written first, so a sidecar never describes
        a missing tensor file. The dtype is kept, so :meth:`load` returns identical bits.
        Returns the tensor file's path.
        """
        path = Path(path)
        sidecar = path.with_suffix(".json")
        if sidecar == path:
            raise ValueError(f"{path}: the tensor file cannot have a .json suffix (the sidecar's)")
        try:
            json.dumps(self.extra)
        except TypeError as error:
            raise TypeError(f"extra metadata is not JSON-serialisable: {error}") from error
        save_tensors(path, {TENSOR_KEY: self.vectors})
        atomic_write_json(
            sidecar,
            {
                "format": SIDECAR_FORMAT,
                "format_version": SIDECAR_FORMAT_VERSION,
                "tensor_file": path.name,
                "shape": list(self.vectors.shape),
                "dtype": str(self.vectors.dtype).removeprefix("torch."),
                **self.metadata(),
            },
        )
        return path

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> SteeringVector:
        """Read a vector written by :meth:`save`; errors name the offending file."""
        path = Path(path)
        sidecar = path.with_suffix(".json")
        if not path.is_file():
            raise FileNotFoundError(f"no steering-vector tensor file at {path}")
        if not sidecar.is_file():
            raise FileNotFoundError(
                f"{path}: metadata sidecar {sidecar} is missing (SteeringVector.save writes both)"
            )
        try:
            meta = json.loads(sidecar.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{sidecar}: not valid JSON ({error})") from error
        if meta.get("format") != SIDECAR_FORMAT:
            raise ValueError(
                f"{sidecar}: not a {SIDECAR_FORMAT} sidecar (format={meta.get('format')!r})"
            )
        tensors = load_tensors(path)
        if TENSOR_KEY not in tensors:
            raise ValueError(f"{path}: no {TENSOR_KEY!r} tensor (found {sorted(tensors)})")
        vectors = tensors[TENSOR_KEY]
        layers = meta.get("layers", [])
        if list(vectors.shape) != meta.get("shape") or len(layers) != vectors.shape[0]:
            raise ValueError(
                f"{path}: tensor of shape {tuple(vectors.shape)} does not match its sidecar "
                f"{sidecar} (shape {meta.get('shape')}, {len(layers)} layers)"
            )
        fields = {key: meta[key] for key in cls.__dataclass_fields__ if key in meta}
        return cls(vectors=vectors.to(device), **{**fields, "layers": tuple(layers)})

    def to_gguf(self, path: str | Path, *, model_hint: str) -> Path:
        """Write a llama.cpp control vector (``--control-vector path``), as repeng exports it.

        Tensor ``direction.{l}`` (float32) holds model layer ``l``'s row, applied by llama.cpp
        to the output of block ``l`` (see the module docstring for why there is no shift).
        Layer 0 cannot be expressed in the format and is left out, with a warning if its row is
        non-zero. ``model_hint`` is the target model's architecture name (repeng writes HF's
        ``config.model_type``, e.g. ``"llama"``). Atomic; returns the path.
        """
        path = Path(path)
        rows = {layer: row for layer, row in zip(self.layers, self.vectors, strict=True)}
        if 0 in rows and bool(rows.pop(0).any()):
            warnings.warn(
                f"{path}: llama.cpp control vectors cannot steer layer 0; its non-zero row is "
                "left out of the GGUF file",
                stacklevel=2,
            )
        if not rows:
            raise ValueError(f"{path}: no layer other than 0 to export")
        with tempfile.TemporaryDirectory() as scratch:
            scratch_file = Path(scratch) / path.name
            writer = gguf.GGUFWriter(scratch_file, GGUF_ARCH)
            writer.add_string(f"{GGUF_ARCH}.model_hint", model_hint)
            writer.add_uint32(f"{GGUF_ARCH}.layer_count", len(rows))
            for layer in sorted(rows):
                direction = rows[layer].detach().to(device="cpu", dtype=torch.float32).numpy()
                writer.add_tensor(f"direction.{layer}", np.ascontiguousarray(direction))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
            return atomic_write_bytes(path, scratch_file.read_bytes())


# ---------------------------------------------------------------------------------------- SVD


@dataclass(frozen=True)
class DSteerStats:
    """D-STEER's per-layer evidence for a single dominant difference direction.

    Attributes:
        singular_value_ratio: ``σ₂ / σ₁`` of the uncentred differences, ``[layer]``
            (small = one dominant direction; NaN where ``σ₁ = 0``).
        top_direction_alignment: ``|cos(u₁, v̄)|`` between the top right singular vector of
            the uncentred differences and the mean difference, ``[layer]`` in ``[0, 1]``.
        layers: model-layer index of each entry.
    """

    singular_value_ratio: Float[Tensor, " layer"]
    top_direction_alignment: Float[Tensor, " layer"]
    layers: tuple[int, ...]


@dataclass(frozen=True, eq=False)
class DifferenceSVD:
    """Per-layer SVD of the per-sample differences ``D = h_tuned - h_base`` (``[n, d_model]``).

    Attributes:
        singular_values: ``[layer, k]``, descending, in residual-stream units.
        components: right singular vectors ``[layer, k, d_model]``, unit norm (zero rows beyond
            the numerical rank), each sign-aligned so that its dot product with that layer's
            mean difference is ``>= 0``.
        explained_variance_ratio: ``S² / ‖D‖²_F`` per layer, ``[layer, k]``: the share of the
            total squared difference each direction carries. Sums to 1 over all components;
            less when ``k`` is truncated.
        centered: whether the per-layer mean difference was subtracted before the SVD.
        layers: model-layer index of each entry of dimension 0.
        n_samples: number of samples (rows of ``D``).
        method: ``"full"``, ``"gram"`` or ``"lowrank"`` (see the module docstring).
    """

    singular_values: Float[Tensor, "layer k"]
    components: Float[Tensor, "layer k d_model"]
    explained_variance_ratio: Float[Tensor, "layer k"]
    centered: bool
    layers: tuple[int, ...]
    n_samples: int
    method: Literal["full", "gram", "lowrank"]

    def _check_mean_vector(self, mean_vector: SteeringVector) -> None:
        if mean_vector.layers != self.layers:
            raise ValueError(
                f"mean vector layers {list(mean_vector.layers)} differ from the SVD's "
                f"{list(self.layers)}"
            )
        if mean_vector.vectors.shape[1] != self.components.shape[2]:
            raise ValueError(
                f"mean vector has d_model={mean_vector.vectors.shape[1]}, the SVD "
                f"{self.components.shape[2]}"
            )

    def component(self, k: int, mean_vector: SteeringVector) -> SteeringVector:
        """Component ``k`` as a steering vector, in the mean vector's units and direction.

        Per layer: the unit right singular vector ``k``, sign-flipped where its dot product
        with ``mean_vector`` is negative, times ``‖mean_vector[l]‖``. Provenance comes from
        ``mean_vector``; ``kind`` is ``"svd{k}"``.
        """
        if not 0 <= k < self.components.shape[1]:
            raise IndexError(f"component {k} out of range: {self.components.shape[1]} computed")
        self._check_mean_vector(mean_vector)
        mean = mean_vector.vectors
        direction = self.components[:, k].to(device=mean.device, dtype=torch.float32)
        mean32 = mean.to(torch.float32)
        sign = torch.where((direction * mean32).sum(-1) < 0, -1.0, 1.0)
        rescaled = direction * (sign * mean_vector.norms().to(torch.float32))[:, None]
        centring = "centred" if self.centered else "uncentred"
        return SteeringVector(
            vectors=rescaled,
            layers=self.layers,
            base_model=mean_vector.base_model,
            tuned_model=mean_vector.tuned_model,
            dataset=mean_vector.dataset,
            n_samples=mean_vector.n_samples,
            token_position=mean_vector.token_position,
            kind=f"svd{k}",
            description=(
                f"right singular vector {k} of the {centring} per-sample differences, "
                f"sign-aligned with and rescaled to the per-layer norm of {mean_vector.kind}"
            ),
            extra={
                "svd_component": k,
                "centered": self.centered,
                "svd_method": self.method,
                "explained_variance_ratio": self.explained_variance_ratio[:, k].tolist(),
            },
        )

    def dsteer_stats(self, mean_vector: SteeringVector) -> DSteerStats:
        """``σ₂/σ₁`` and ``|cos(u₁, v̄)|`` per layer (needs ``centered=False`` and ``k >= 2``)."""
        if self.centered:
            raise ValueError(
                "D-STEER statistics are defined on the uncentred differences: "
                "use difference_svd(..., centered=False)"
            )
        if self.singular_values.shape[1] < 2:
            raise ValueError("σ₂/σ₁ needs at least 2 singular values")
        self._check_mean_vector(mean_vector)
        s = self.singular_values.to(torch.float64)
        mean = mean_vector.vectors.to(device=s.device, dtype=torch.float64)
        top = self.components[:, 0].to(torch.float64)
        mean_norm = torch.linalg.vector_norm(mean, dim=-1)
        alignment = (top * mean).sum(-1).abs() / mean_norm.clamp_min(
            torch.finfo(torch.float64).tiny
        )
        return DSteerStats(
            singular_value_ratio=s[:, 1] / s[:, 0],
            top_direction_alignment=torch.where(mean_norm > 0, alignment, 0.0),
            layers=self.layers,
        )


def _null_mask(values: Tensor, scale: float) -> Tensor:
    """Entries of a descending ``[..., k]`` spectrum at or below ``scale`` times the largest."""
    return values <= scale * values[..., :1]


def _full_svd(differences: Tensor) -> tuple[Tensor, Tensor]:
    _, singular_values, right = torch.linalg.svd(differences, full_matrices=False)
    n, d = differences.shape[-2:]
    null = _null_mask(singular_values, max(n, d) * torch.finfo(differences.dtype).eps)
    return singular_values.masked_fill(null, 0.0), right.masked_fill(null[..., None], 0.0)


def _gram_svd(differences: Tensor) -> tuple[Tensor, Tensor]:
    """SVD through the eigendecomposition of the smaller Gram matrix, in float64."""
    n_layers, n, d = differences.shape
    rank = min(n, d)
    tolerance = max(n, d) * torch.finfo(torch.float64).eps
    chunk = max(1, _FLOAT64_CHUNK_ELEMENTS // (n * d + rank * rank))
    singular_blocks, right_blocks = [], []
    for start in range(0, n_layers, chunk):
        block = differences[start : start + chunk].to(torch.float64)
        gram = block @ block.mT if n <= d else block.mT @ block
        eigenvalues, eigenvectors = torch.linalg.eigh(gram)
        eigenvalues, eigenvectors = eigenvalues.flip(-1), eigenvectors.flip(-1)
        null = _null_mask(eigenvalues, tolerance)
        singular_values = eigenvalues.clamp_min(0.0).sqrt().masked_fill(null, 0.0)
        if n <= d:  # v_k = Dᵀ u_k / s_k
            scale = torch.where(null, 1.0, singular_values)
            right = (eigenvectors.mT @ block) / scale[..., None]
        else:
            right = eigenvectors.mT
        singular_blocks.append(singular_values)
        right_blocks.append(right.masked_fill(null[..., None], 0.0))
    return (
        torch.cat(singular_blocks).to(differences.dtype),
        torch.cat(right_blocks).to(differences.dtype),
    )


def _lowrank_svd(differences: Tensor, n_components: int) -> tuple[Tensor, Tensor]:
    n, d = differences.shape[-2:]
    q = min(n_components + _LOWRANK_OVERSAMPLING, n, d)
    _, singular_values, right = torch.svd_lowrank(differences, q=q, niter=_LOWRANK_POWER_ITERATIONS)
    right = right.mT
    null = _null_mask(singular_values, max(n, d) * torch.finfo(differences.dtype).eps)
    return singular_values.masked_fill(null, 0.0), right.masked_fill(null[..., None], 0.0)


def difference_svd(
    h_base: Float[Tensor, "n layer d_model"],
    h_tuned: Float[Tensor, "n layer d_model"],
    *,
    centered: bool,
    n_components: int | None = None,
    method: SVDMethod = "auto",
    compute_dtype: torch.dtype = torch.float32,
    layers: Sequence[int] | None = None,
) -> DifferenceSVD:
    """Per-layer SVD of ``D = h_tuned - h_base`` (each layer's ``[n, d_model]`` matrix).

    Args:
        h_base: pooled hidden states of the reference model, ``[n, layer, d_model]``.
        h_tuned: the same samples through the tuned model, same shape.
        centered: subtract each layer's mean difference first (PCA of the differences, as the
            seed's "SVD component k"); ``False`` keeps it (D-STEER's uncentred SVD, where the
            mean difference dominates ``u₁``).
        n_components: keep the top ``k`` (default all ``min(n, d_model)``; required for
            ``"lowrank"``).
        method: ``"auto"``, ``"full"``, ``"gram"`` or ``"lowrank"`` (module docstring).
        compute_dtype: float32 or float64; the Gram path forms its Gram matrix in float64
            regardless.
        layers: model-layer index of each entry of dimension 1; default ``0 .. layer-1``.

    Returns:
        :class:`DifferenceSVD` on the inputs' device, tensors in ``compute_dtype``.
    """
    if h_base.shape != h_tuned.shape:
        raise ValueError(
            f"shape mismatch: h_base {tuple(h_base.shape)}, h_tuned {tuple(h_tuned.shape)}"
        )
    if compute_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"compute_dtype must be float32 or float64, got {compute_dtype}")
    n_samples, n_layers, d_model = h_base.shape
    layers = tuple(range(n_layers)) if layers is None else tuple(layers)
    if len(layers) != n_layers:
        raise ValueError(f"{len(layers)} layer indices for {n_layers} layers of hidden states")
    rank = min(n_samples, d_model)
    if n_components is not None and not 1 <= n_components <= rank:
        raise ValueError(f"n_components must be in 1..min(n, d_model)={rank}, got {n_components}")
    if method == "auto":
        direct = compute_dtype == torch.float64 and rank <= _DIRECT_SVD_MAX_RANK
        method = "full" if direct else "gram"

    differences = (h_tuned.to(compute_dtype) - h_base.to(compute_dtype)).transpose(0, 1)
    mean_difference = differences.mean(1)
    if centered:
        differences = differences - mean_difference[:, None, :]
    differences = differences.contiguous()

    if method == "full":
        singular_values, components = _full_svd(differences)
    elif method == "gram":
        singular_values, components = _gram_svd(differences)
    elif method == "lowrank":
        if n_components is None:
            raise ValueError("method='lowrank' needs n_components")
        singular_values, components = _lowrank_svd(differences, n_components)
    else:
        raise ValueError(f"unknown method {method!r}; expected one of auto, full, gram, lowrank")
    if n_components is not None:
        singular_values = singular_values[:, :n_components]
        components = components[:, :n_components]

    alignment = torch.einsum("lkd,ld->lk", components, mean_difference)
    components = components * torch.where(alignment < 0, -1.0, 1.0)[..., None].to(compute_dtype)
    total = torch.linalg.vector_norm(differences, dim=(-2, -1), dtype=torch.float64).square()
    ratio = (
        singular_values.to(torch.float64).square()
        / total.clamp_min(torch.finfo(torch.float64).tiny)[:, None]
    )
    return DifferenceSVD(
        singular_values=singular_values,
        components=components,
        explained_variance_ratio=torch.where(total[:, None] > 0, ratio, 0.0).to(compute_dtype),
        centered=centered,
        layers=layers,
        n_samples=n_samples,
        method=method,
    )
