"""Layer selection, one rule for the whole library: sorted, no repeats, clear errors."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Literal

__all__ = ["LayerSelection", "select_layers"]

LayerSelection = int | Sequence[int] | Literal["all"] | None


def select_layers(
    layers: LayerSelection | object, n_layers: int, *, argument: str = "layers"
) -> tuple[int, ...]:
    """Model-layer indices chosen by ``layers`` in a model of ``n_layers`` layers.

    Args:
        layers: ``None`` or ``"all"`` (every layer), one index, or a sequence of indices;
            negative indices count from the end (``-1`` = the last layer). NumPy integers
            count as ints; anything else is refused here with a clear message (hence the
            annotation accepts any object).
        n_layers: number of layers of the model (or of the captured block).
        argument: the caller's argument name, used in error messages.

    Returns:
        Distinct non-negative indices in increasing order.

    Raises:
        TypeError: an index is not an int (``True``, ``1.0`` and ``"3"`` are refused).
        ValueError: the selection is empty, a string other than ``"all"``, or names a layer
            twice (``[4, -1]`` in a 5-layer model included): a repeat is a mistake in the
            caller's list, never silently merged.
        IndexError: an index is outside ``-n_layers .. n_layers - 1``.
    """
    if layers is None or layers == "all":
        return tuple(range(n_layers))
    if isinstance(layers, str):
        raise ValueError(f"{argument} must be 'all', an int or a list of ints, got {layers!r}")
    requested = [layers] if not isinstance(layers, Sequence) else list(layers)
    if not requested:
        raise ValueError(f"{argument} is empty: pass 'all' or None for every layer")
    not_ints = [
        index
        for index in requested
        if isinstance(index, bool) or not isinstance(index, numbers.Integral)
    ]
    if not_ints:
        raise TypeError(f"{argument} must be ints, got {not_ints!r}")
    out_of_range = [int(index) for index in requested if not -n_layers <= index < n_layers]
    if out_of_range:
        raise IndexError(
            f"{argument} {out_of_range} out of range for {n_layers} layers "
            f"(0..{n_layers - 1}, or -{n_layers}..-1 from the end)"
        )
    resolved = [int(index) % n_layers for index in requested]
    repeated = sorted({index for index in resolved if resolved.count(index) > 1})
    if repeated:
        raise ValueError(f"{argument} {list(requested)!r} name layers {repeated} more than once")
    return tuple(sorted(resolved))
