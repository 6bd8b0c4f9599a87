"""Atomic file output shared by the library and the pipelines.

Every file mahals writes goes through :func:`atomic_write_bytes` (write to a temporary file in
the same directory, fsync, ``os.replace``), so a crash leaves either the old file or the new
one, never a partial file. Tensors are stored as safetensors (never pickle).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

__all__ = [
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "load_tensors",
    "save_tensors",
    "tensor_sha256",
]


def _process_umask() -> int:
    """The process umask (reading it means setting it, so it is restored at once)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


_NEW_FILE_MODE = 0o666 & ~_process_umask()
"""Permissions of files mahals writes: what ``open()`` would give them (read at import)."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _NEW_FILE_MODE)  # mkstemp creates 0o600; give the usual umask mode
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically.

    Raises:
        ValueError: ``obj`` holds NaN or an infinity (not valid JSON; a score that is not a
            number is an error to report, not a value to store).
    """
    try:
        text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False)
    except ValueError as error:
        raise ValueError(f"refusing to write {path}: {error} (NaN or infinity)") from error
    return atomic_write_text(path, text + "\n")


def save_tensors(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Save named tensors as safetensors, atomically (tensors are made contiguous on CPU)."""
    payload = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    return atomic_write_bytes(path, save(payload, metadata=dict(metadata) if metadata else None))


def tensor_sha256(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes: the content checksum stored with cached
    and saved tensors and verified when they are read back."""
    data = tensor.detach().contiguous().cpu()
    digest = hashlib.sha256(f"{data.dtype}:{tuple(data.shape)}:".encode())
    if data.numel():
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a safetensors file written by :func:`save_tensors`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no safetensors file at {path}")
    try:
        return load_file(path)
    except Exception as error:  # safetensors' own errors do not name the file
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from error
