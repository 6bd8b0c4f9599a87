"""Pooled activations cached on disk with their identity, shared by Phase 1 and Phase 2.1.

A cache file is one safetensors block ``[n, layer, d_model]`` (key ``"activations"``), each
text's token count (``"n_tokens"``) and any per-text tensors the caller derives from the same
model and texts (e.g. surface baselines), whose metadata holds their identity: what was captured (model key and source, token position, the
SHA-256 of the exact texts, …). A block is reused only when every identity entry matches;
otherwise it is recomputed, and the log says why.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from jaxtyping import Float
from safetensors import safe_open
from torch import Tensor

from mahals._time import utc_timestamp
from mahals._version import __version__
from mahals.activations import SinkRule, capture
from mahals.io import load_tensors, save_tensors
from mahals.models import MahalsModel
from mahals.registry import ModelSpec

__all__ = [
    "ACTIVATION_KEY",
    "N_TOKENS_KEY",
    "CACHE_FORMAT",
    "CachedBlock",
    "cache_identity",
    "cached_capture",
    "read_activation_cache",
    "texts_sha256",
    "write_activation_cache",
]

log = logging.getLogger(__name__)

ACTIVATION_KEY = "activations"
N_TOKENS_KEY = "n_tokens"
CACHE_FORMAT = "mahals.pooled_activations"


def texts_sha256(texts: Sequence[str]) -> str:
    """A digest identifying an ordered list of texts (cache identity)."""
    return hashlib.sha256(json.dumps(list(texts)).encode("utf-8")).hexdigest()


def cache_identity(
    spec: ModelSpec, pool: str, texts: Sequence[str], **extra: str
) -> dict[str, str]:
    """What a cached block must carry to stand for capturing ``texts`` with ``spec``'s model at
    token position ``pool``; ``extra`` adds run-specific entries (role, pairing rule, …)."""
    return {
        "format": CACHE_FORMAT,
        "model_key": spec.key,
        "model_source": spec.source,
        "pool": pool,
        **extra,
        "n": str(len(texts)),
        "texts_sha256": texts_sha256(texts),
    }


def read_activation_cache(
    path: Path, identity: Mapping[str, str], n_rows: int, required: Sequence[str] = ()
) -> tuple[dict[str, Tensor], dict[str, str]] | None:
    """The tensors cached at ``path`` (the ``[n_rows, layer, d_model]`` block under
    :data:`ACTIVATION_KEY`, and the others by name) and its metadata, if the metadata matches
    ``identity`` on every key and every name in ``required`` is stored with ``n_rows`` rows;
    ``None`` (logging why) otherwise."""
    if not path.is_file():
        return None
    try:
        with safe_open(path, framework="pt") as handle:
            stored = dict(handle.metadata() or {})
    except Exception as error:  # an unreadable or truncated file is recomputed, not trusted
        log.info("  cache %s unreadable (%s); recomputing", path.name, error)
        return None
    stale = [key for key, value in identity.items() if stored.get(key) != value]
    if stale:
        log.info("  cache %s is stale (%s differ); recomputing", path.name, ", ".join(stale))
        return None
    tensors = load_tensors(path)
    tensor = tensors.get(ACTIVATION_KEY)
    if tensor is None or tensor.ndim != 3 or tensor.shape[0] != n_rows:
        log.info("  cache %s holds no [n=%d, layer, d_model] block; recomputing", path.name, n_rows)
        return None
    missing = [name for name in required if getattr(tensors.get(name), "shape", (0,))[0] != n_rows]
    if missing:
        log.info("  cache %s lacks %s; recomputing", path.name, ", ".join(missing))
        return None
    return tensors, stored


def write_activation_cache(
    path: Path,
    activations: Float[Tensor, "n layer d_model"],
    metadata: Mapping[str, str],
    extra: Mapping[str, Tensor] | None = None,
) -> None:
    """Save activations (and ``extra`` per-text tensors, stored under their names) with their
    identity (and any other string metadata) atomically."""
    tensors = {**(extra or {}), ACTIVATION_KEY: activations}
    save_tensors(path, tensors, {**metadata, "mahals_version": __version__})


@dataclass(frozen=True)
class CachedBlock:
    """What :func:`cached_capture` returns.

    Attributes:
        tensor: float32 ``[n, layer, d_model]``.
        reused: whether it came from the cache file.
        metadata: the metadata stored with it (read back, or written now; empty when the
            cache is off).
        model: dtype and device of the model that captured it now (``None`` when reused).
        seconds: capture time (0 when reused).
        extra: the other per-text tensors stored with it: ``"n_tokens"`` (int64 ``[n]``, each
            text's token count; absent from caches written before it was stored) and those
            of ``cached_capture``'s ``extra_tensors``.
    """

    tensor: Float[Tensor, "n layer d_model"]
    reused: bool
    metadata: dict[str, str]
    model: str | None = None
    seconds: float = 0.0
    extra: dict[str, Tensor] = field(default_factory=dict)


def cached_capture(
    path: Path,
    identity: Mapping[str, str],
    texts: Sequence[str],
    model: Callable[[], MahalsModel],
    *,
    pool: str,
    sinks: SinkRule = "none",
    batch_size: int,
    max_batch_tokens: int | None,
    use_cache: bool = True,
    progress: bool | None = None,
    before_capture: Callable[[MahalsModel], Mapping[str, str] | None] | None = None,
    extra_tensors: Mapping[str, Callable[[MahalsModel], Tensor]] | None = None,
) -> CachedBlock:
    """The pooled activations of ``texts``: from the cache at ``path`` when it matches
    ``identity``, else captured (``model()`` is called only then) and cached.

    ``before_capture(model)`` runs after the model is obtained and before the capture; what it
    returns is stored with the block. ``extra_tensors`` (``{name: model → [n, ...]}``) are
    computed after the capture and stored in the same file; a reused file must hold them and
    ``"n_tokens"``.
    ``sinks`` is :func:`~mahals.capture`'s; the caller puts it in ``identity`` when it can differ.
    ``use_cache=False`` neither reads nor writes the file.
    """
    required = (N_TOKENS_KEY, *extra_tensors) if extra_tensors else ()
    cached = read_activation_cache(path, identity, len(texts), required) if use_cache else None
    if cached is not None:
        tensors, metadata = cached
        activations = tensors.pop(ACTIVATION_KEY)
        return CachedBlock(activations, True, metadata, extra=tensors)
    loaded = model()
    extra = dict((before_capture(loaded) if before_capture else None) or {})
    started = time.perf_counter()
    captured = capture(
        loaded,
        list(texts),
        pool=pool,
        sinks=sinks,
        batch_size=batch_size,
        max_batch_tokens=max_batch_tokens,
        progress=progress,
    )
    activations = captured.tensor
    seconds = time.perf_counter() - started
    per_text = {N_TOKENS_KEY: captured.n_tokens}
    per_text |= {name: compute(loaded) for name, compute in (extra_tensors or {}).items()}
    dtype = str(loaded.dtype).removeprefix("torch.")
    metadata: dict[str, str] = {}
    if use_cache:
        metadata = {
            **identity,
            **extra,
            "model_dtype": dtype,
            "model_device": str(loaded.device),
            "created": utc_timestamp(),
        }
        write_activation_cache(path, activations, metadata, per_text)
    return CachedBlock(activations, False, metadata, f"{dtype}, {loaded.device}", seconds, per_text)
