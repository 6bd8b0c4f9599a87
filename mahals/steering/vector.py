"""A typed steering vector: one direction per model layer, with where it came from.

**Layer convention.** Row *i* of :attr:`SteeringVector.vectors` belongs to model layer
``layers[i]``, and model layer *l* means the **output of decoder block l** (0-based), the same
convention as :func:`mahals.capture`. That is HF's ``hidden_states[l + 1]`` (``hidden_states[0]``
is the embedding output), except that for the last block HF applies the final norm and mahals
does not.
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from mahals._time import utc_timestamp
from mahals._version import __version__
from mahals.io import atomic_write_json, load_tensors, save_tensors, tensor_sha256
from mahals.steering.gguf import write_control_vector

__all__ = ["Pool", "SteeringVector", "FLOAT64_CHUNK_ELEMENTS"]

Pool = Literal["last", "mean"]

SIDECAR_FORMAT = "mahals.SteeringVector"
#: Version 2 names the token position ``pool`` (version 1: ``token_position``); both are read.
SIDECAR_FORMAT_VERSION = 2
TENSOR_KEY = "vectors"

#: Elements per chunk when a float64 copy is made (2**24 float64 = 128 MiB).
FLOAT64_CHUNK_ELEMENTS = 2**24


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
        pool: token position the hidden states were taken at: ``"last"`` (last real token)
            or ``"mean"`` (mean over real tokens).
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
    pool: Pool | None = None
    kind: str = "mean_diff"
    description: str = ""
    created: str = field(default_factory=utc_timestamp)
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
        if self.pool not in (None, "last", "mean"):
            raise ValueError(f"pool must be 'last' or 'mean', got {self.pool!r}")
        finite = torch.isfinite(self.vectors).all(dim=-1)
        if not bool(finite.all()):
            bad = [layers[i] for i in torch.nonzero(~finite).flatten().tolist()]
            raise ValueError(f"vectors hold NaN or infinity at layers {bad}")

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
                ``pool``, ...); ``kind`` defaults to ``"mean_diff"``. ``n_samples``
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
        chunk = max(1, FLOAT64_CHUNK_ELEMENTS // (n_layers * d_model))
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
            pool=_agreed(self.pool, other.pool),
            kind=f"{_as_operand(self.kind)} {symbol} {_as_operand(other.kind)}",
            description=_agreed(self.description, other.description) or "",
            extra={k: v for k, v in self.extra.items() if k in other.extra and other.extra[k] == v},
        )

    def _derive(self, vectors: Tensor, kind: str) -> SteeringVector:
        """Same provenance, new rows and kind, fresh timestamp and version."""
        return replace(
            self, vectors=vectors, kind=kind, created=utc_timestamp(), mahals_version=__version__
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
            "pool": self.pool,
            "kind": self.kind,
            "description": self.description,
            "created": self.created,
            "mahals_version": self.mahals_version,
            "extra": self.extra,
        }

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (safetensors, key ``"vectors"``) and ``path.with_suffix(".json")``.

        Both writes are atomic; the tensor file is written first, so a sidecar never describes
        a missing tensor file, and both carry the tensor's SHA-256, so a crash between the two
        writes (new tensor, old sidecar) is refused by :meth:`load`. The dtype is kept, so
        :meth:`load` returns identical bits. Returns the tensor file's path.
        """
        path = Path(path)
        sidecar = path.with_suffix(".json")
        if sidecar == path:
            raise ValueError(f"{path}: the tensor file cannot have a .json suffix (the sidecar's)")
        try:
            json.dumps(self.extra)
        except TypeError as error:
            raise TypeError(f"extra metadata is not JSON-serialisable: {error}") from error
        checksum = tensor_sha256(self.vectors)
        save_tensors(path, {TENSOR_KEY: self.vectors}, {"tensor_sha256": checksum})
        atomic_write_json(
            sidecar,
            {
                "format": SIDECAR_FORMAT,
                "format_version": SIDECAR_FORMAT_VERSION,
                "tensor_file": path.name,
                "shape": list(self.vectors.shape),
                "dtype": str(self.vectors.dtype).removeprefix("torch."),
                "tensor_sha256": checksum,
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
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{sidecar}: not valid UTF-8 JSON ({error})") from error
        if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise ValueError(f"{sidecar}: not a {SIDECAR_FORMAT} sidecar (format={found!r})")
        tensors = load_tensors(path)
        if TENSOR_KEY not in tensors:
            raise ValueError(f"{path}: no {TENSOR_KEY!r} tensor (found {sorted(tensors)})")
        vectors = tensors[TENSOR_KEY]
        if "tensor_sha256" in meta and meta["tensor_sha256"] != tensor_sha256(vectors):
            raise ValueError(
                f"{path}: its content does not match the checksum in its sidecar {sidecar} "
                "(one of the two was replaced, or a save was interrupted between them); "
                "save the vector again"
            )
        layers = meta.get("layers")
        if (
            list(vectors.shape) != meta.get("shape")
            or not isinstance(layers, list)
            or len(layers) != vectors.shape[0]
        ):
            raise ValueError(
                f"{path}: tensor of shape {tuple(vectors.shape)} does not match its sidecar "
                f"{sidecar} (shape {meta.get('shape')}, layers {layers!r})"
            )
        if meta.get("format_version") not in (1, SIDECAR_FORMAT_VERSION):
            raise ValueError(
                f"{sidecar}: format_version {meta.get('format_version')!r}; this mahals reads 1 "
                f"and {SIDECAR_FORMAT_VERSION}"
            )
        fields = {key: meta[key] for key in cls.__dataclass_fields__ if key in meta}
        if "token_position" in meta:  # format version 1
            fields["pool"] = meta["token_position"]
        try:
            return cls(vectors=vectors.to(device), **{**fields, "layers": tuple(layers)})
        except (TypeError, ValueError) as error:  # e.g. NaN values, malformed sidecar fields
            raise ValueError(f"{path} (sidecar {sidecar}): {error}") from error

    def to_gguf(self, path: str | Path, *, model_hint: str) -> Path:
        """Write a llama.cpp control vector (``--control-vector path``), as repeng exports it.

        Tensor ``direction.{l}`` (float32) holds model layer ``l``'s row, applied by llama.cpp
        to the output of block ``l`` (:mod:`mahals.steering.gguf` explains why there is no
        shift). Layer 0 cannot be expressed in the format and is left out, with a warning if
        its row is non-zero. ``model_hint`` is the target model's architecture name (repeng
        writes HF's ``config.model_type``, e.g. ``"llama"``). Atomic; returns the path.
        """
        directions = dict(zip(self.layers, self.vectors, strict=True))
        return write_control_vector(path, directions, model_hint=model_hint)
