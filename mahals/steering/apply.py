"""Applying steering vectors inside mahals' own nnsight traces.

``with mahals.steer(model, Steering(vector, alpha=0.5)):`` makes every trace of ``model`` —
:func:`mahals.capture`, :func:`mahals.aqi.evaluate`, ``model.generate`` and the scores of
:mod:`mahals.evaluation` — run steered until the block exits; nothing about the model is
changed, so it is bit-identical afterwards. The edit is an :class:`~mahals.tracing.Intervention`
applied by :mod:`mahals.tracing` in the same trace that reads, so a capture at a steered layer
sees the steered values (a torch forward hook would run after nnsight served ``.output``).

Modes, per steered layer *l* with vector ``v = vector[l]``, unit direction ``r = v / ‖v‖`` and
coefficient ``α = alpha[l]`` (all in the residual stream's units):

* ``add``:        ``h ← h + α v``
* ``ablate``:     ``h ← h − (h·r) r`` (removes the component along ``v``; ``α`` unused)
* ``ablate_add``: ``h ← h − (h·r) r + α v`` (sets the component along ``v`` to ``α‖v‖``)

``preserve_norm=True`` then rescales each steered token to its norm before the edit.

Several λ in one forward: ``alpha`` may be a sequence ``(α_0, …, α_{k−1})`` (or a 1-D tensor) of
*row blocks*: a batch of ``B`` rows is read as ``k`` consecutive blocks of ``B / k`` rows (block
*j* = rows ``j·B/k … (j+1)·B/k − 1``) and block *j* is steered with ``α_j``. Run the same texts
once per block (block-major) and one forward carries ``k`` λ values; ``k = B`` gives every row its
own coefficient. Block *j*'s edit is bit-identical to a scalar ``alpha=α_j`` (the same float64
product cast to the layer's dtype); a batch whose size is not a multiple of ``k`` is an error.

Positions: ``"all"`` every token of every forward pass (prompt and generated); ``"prompt"`` the
prompt pass only; ``"generated"`` every position whose output predicts a generated token — the
last prompt token on the prompt pass (it predicts the first generated token) and every
decoding step. Within a prompt pass, ``"all"`` also edits padding positions, which no real
token attends to.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from mahals.steering.vector import SteeringVector
from mahals.tracing import Batch

if TYPE_CHECKING:
    from mahals.models import MahalsModel

__all__ = ["MODES", "POSITIONS", "Steering", "SteeringIntervention", "steer"]

Mode = Literal["add", "ablate", "ablate_add"]
Positions = Literal["all", "prompt", "generated"]
MODES: tuple[str, ...] = ("add", "ablate", "ablate_add")
POSITIONS: tuple[str, ...] = ("all", "prompt", "generated")


@dataclass(frozen=True)
class Steering:
    """What to apply: a vector, how strongly, where, and how.

    Attributes:
        vector: the :class:`SteeringVector` (``[layer, d_model]``, residual-stream units).
        alpha: one coefficient for every steered layer, ``{layer: coefficient}`` (then only
            those layers are steered), or a sequence / 1-D tensor of per-row-block coefficients
            (see the module docstring).
        layers: the model layers to steer, a subset of ``vector.layers``; ``None`` = all of
            them (or the keys of ``alpha``).
        positions: ``"all"`` | ``"prompt"`` | ``"generated"`` (see the module docstring).
        mode: ``"add"`` | ``"ablate"`` | ``"ablate_add"``.
        preserve_norm: rescale each steered token to its pre-edit norm.
    """

    vector: SteeringVector
    alpha: float | Mapping[int, float] | Sequence[float] | Tensor = 1.0
    layers: Sequence[int] | None = None
    positions: Positions = "all"
    mode: Mode = "add"
    preserve_norm: bool = False

    def __post_init__(self) -> None:
        if self.positions not in POSITIONS:
            raise ValueError(f"positions={self.positions!r} is not one of {POSITIONS}")
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is not one of {MODES}")
        alpha = self.alpha
        if isinstance(alpha, Tensor):
            if alpha.ndim != 1:
                raise ValueError(
                    f"a tensor alpha must be 1-D (one per row block), got shape {tuple(alpha.shape)}"
                )
            alpha = tuple(float(a) for a in alpha.tolist())
        elif isinstance(alpha, Sequence) and not isinstance(alpha, str):
            if any(isinstance(a, bool) or not isinstance(a, int | float) for a in alpha):
                raise TypeError(f"per-block alpha must hold numbers, got {alpha!r}")
            alpha = tuple(float(a) for a in alpha)
        if isinstance(alpha, tuple) and not alpha:
            raise ValueError("per-block alpha is empty: give at least one coefficient")
        if isinstance(alpha, bool) or not isinstance(alpha, int | float | Mapping | tuple):
            raise TypeError(
                f"alpha must be a number, {{layer: number}} or a sequence, got {alpha!r}"
            )
        object.__setattr__(self, "alpha", alpha)

    @property
    def blocks(self) -> int:
        """Row blocks of a batch this spec steers differently (1 unless ``alpha`` is a sequence)."""
        return len(self.alpha) if isinstance(self.alpha, tuple) else 1

    def steered_layers(self) -> tuple[int, ...]:
        """The model layers this spec edits, ascending."""
        available = set(self.vector.layers)
        chosen = (
            self.layers
            if self.layers is not None
            else (list(self.alpha) if isinstance(self.alpha, Mapping) else self.vector.layers)
        )
        missing = sorted(set(chosen) - available)
        if missing:
            raise ValueError(
                f"layers {missing} are not in the steering vector, which has layers "
                f"{list(self.vector.layers)}"
            )
        if isinstance(self.alpha, Mapping):
            chosen = [layer for layer in chosen if layer in self.alpha]
        return tuple(sorted(set(chosen)))

    def alpha_at(self, layer: int) -> float | tuple[float, ...]:
        """The coefficient at ``layer`` (a tuple, one per row block, for per-block alphas)."""
        if isinstance(self.alpha, tuple):
            return self.alpha
        return float(self.alpha[layer] if isinstance(self.alpha, Mapping) else self.alpha)

    def fingerprint(self) -> str:
        """SHA-256 of the vector's values and every setting (stable across processes)."""
        digest = hashlib.sha256()
        vectors = self.vector.vectors.detach().to("cpu", torch.float64).contiguous()
        digest.update(vectors.numpy().tobytes())
        settings = {
            "layers": list(self.vector.layers),
            "steered": list(self.steered_layers()),
            "alpha": {str(layer): self.alpha_at(layer) for layer in self.steered_layers()},
            "positions": self.positions,
            "mode": self.mode,
            "preserve_norm": self.preserve_norm,
        }
        digest.update(json.dumps(settings, sort_keys=True).encode("utf-8"))
        return digest.hexdigest()

    def bind(self, model: MahalsModel) -> SteeringIntervention:
        """The :class:`SteeringIntervention` for ``model``: shapes checked, rows cast once to
        each steered layer's dtype and device."""
        d_model = self.vector.vectors.shape[-1]
        deepest = max(self.vector.layers)
        if d_model != model.d_model or deepest >= model.n_layers:
            raise ValueError(
                f"steering vector of shape {tuple(self.vector.vectors.shape)} with layers up to "
                f"{deepest} (d_model {d_model}) does not fit model {model.name!r} with "
                f"{model.n_layers} layers x d_model {model.d_model}"
            )
        blocks = model.adapter.decoder_layers(model.hf)
        rows: dict[int, Tensor] = {}
        units: dict[int, Tensor] = {}
        for layer in self.steered_layers():
            parameter = next(blocks[layer].parameters())
            row = self.vector.vectors[self.vector.layers.index(layer)].detach()
            alpha = torch.tensor(self.alpha_at(layer), dtype=torch.float64)
            # [d] for one coefficient, [blocks, d] for per-block ones: the same float64 product.
            rows[layer] = (alpha.unsqueeze(-1) * row.double()).to(parameter.device, parameter.dtype)
            norm = row.double().norm()
            if self.mode != "add" and norm == 0:
                raise ValueError(f"cannot ablate along a zero vector (layer {layer})")
            units[layer] = (
                (row.double() / norm).to(parameter.device, torch.float32) if norm else row
            )
        return SteeringIntervention(self, tuple(rows), rows, units)


@dataclass(frozen=True)
class SteeringIntervention:
    """A :class:`Steering` bound to one model (an :class:`~mahals.tracing.Intervention`)."""

    spec: Steering
    layers: tuple[int, ...]
    scaled_rows: dict[int, Tensor] = field(repr=False)
    unit_rows: dict[int, Tensor] = field(repr=False)

    def fingerprint(self) -> str:
        return self.spec.fingerprint()

    def _position_mask(self, hidden: Tensor, batch: Batch) -> Tensor | None:
        """``[batch, tokens, 1]`` mask of the positions to edit; ``None`` = every position."""
        positions = self.spec.positions
        if positions == "all" or (positions == "generated" and not batch.is_prompt):
            return None
        mask = torch.zeros(hidden.shape[:2] + (1,), dtype=hidden.dtype, device=hidden.device)
        if positions == "prompt" and batch.is_prompt:
            mask[..., 0] = batch.attention_mask.to(hidden.dtype)
        elif positions == "generated":  # the prompt pass: only the position predicting token 1
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            mask[rows, batch.last, 0] = 1
        return mask

    def _offsets(self, layer: int, hidden: Tensor) -> Tensor:
        """``α v`` at ``layer``: ``[d]``, or ``[batch, 1, d]`` (each block's row repeated)."""
        scaled = self.scaled_rows[layer]
        if scaled.ndim == 1:
            return scaled
        return scaled.repeat_interleave(hidden.shape[0] // scaled.shape[0], dim=0).unsqueeze(1)

    def __call__(self, layer: int, hidden: Tensor, batch: Batch) -> Tensor | None:
        if self.spec.positions == "prompt" and not batch.is_prompt:
            return None
        blocks = self.spec.blocks
        if hidden.shape[0] % blocks:
            raise ValueError(
                f"a batch of {hidden.shape[0]} rows cannot be split into the {blocks} row blocks "
                "of this Steering's per-block alpha: run each text once per block"
            )
        mask = self._position_mask(hidden, batch)
        spec = self.spec
        if spec.mode == "add" and not spec.preserve_norm and mask is None:
            scaled = self.scaled_rows[layer]
            if scaled.ndim == 1:
                hidden.add_(scaled)
            else:  # a view [blocks, rows per block, tokens, d]: block j gets its own α_j v
                hidden.unflatten(0, (blocks, -1)).add_(scaled[:, None, None, :])
            return None
        before = hidden.float()
        edited = before
        if spec.mode != "add":
            unit = self.unit_rows[layer]
            edited = edited - (edited @ unit).unsqueeze(-1) * unit
        if spec.mode != "ablate":
            edited = edited + self._offsets(layer, hidden).float()
        if spec.preserve_norm:
            scale = before.norm(dim=-1, keepdim=True) / edited.norm(dim=-1, keepdim=True).clamp_min(
                torch.finfo(torch.float32).tiny
            )
            edited = edited * scale
        if mask is not None:
            edited = torch.where(mask.bool(), edited, before)
        return edited.to(hidden.dtype)


@contextmanager
def steer(model: MahalsModel, *specs: Steering) -> Iterator[list[SteeringIntervention]]:
    """Run every trace of ``model`` steered by ``specs`` (in order, stacked) inside the block.

    Yields the bound interventions. On exit the model's active steering is what it was before
    (blocks nest). Raises ``ValueError`` when a vector does not fit the model, naming both
    shapes.
    """
    if not specs:
        raise ValueError("steer() needs at least one Steering spec")
    bad = [type(spec).__name__ for spec in specs if not isinstance(spec, Steering)]
    if bad:
        raise TypeError(f"steer() takes Steering specs, got {bad}")
    bound = [spec.bind(model) for spec in specs]
    before = list(model.active_interventions)
    model.active_interventions = before + bound
    try:
        yield bound
    finally:
        model.active_interventions = before
