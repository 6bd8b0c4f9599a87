"""Export of steering vectors as llama.cpp control vectors (:meth:`SteeringVector.to_gguf`).

The file is llama.cpp's control-vector format, the
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
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

import gguf
import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from mahals.io import atomic_write_bytes

__all__ = ["GGUF_ARCH", "write_control_vector"]

GGUF_ARCH = "controlvector"


def write_control_vector(
    path: str | Path,
    directions: Mapping[int, Float[Tensor, " d_model"]],
    *,
    model_hint: str,
) -> Path:
    """Write ``directions`` (model layer → row) as a llama.cpp control vector, atomically.

    Layer 0 cannot be expressed in the format: its row is left out, with a warning when it is
    non-zero. Returns the path.
    """
    path = Path(path)
    rows = dict(directions)
    if 0 in rows and bool(rows.pop(0).any()):
        warnings.warn(
            f"{path}: llama.cpp control vectors cannot steer layer 0; its non-zero row is "
            "left out of the GGUF file",
            stacklevel=3,
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
