"""Pooled activations cached on disk with their identity, shared by Phase 1 and Phase 2.1.

A cache file is one safetensors block ``[n, layer, d_model]`` (key ``"activations"``), each
text's token count (``"n_tokens"``) and any per-text tensors the caller derives from the same
model and texts (e.g. surface baselines), whose metadata holds their identity: what was
captured (model key and source, a fingerprint of its weights, token position, the SHA-256 of
the exact texts, …), and the SHA-256 of every tensor (``sha256:<name>``). A block is reused
only when every identity entry matches, every checksum verifies and the activations are a
float32 ``[n, layer, d_model]`` block of the model's width; otherwise it is recomputed, and the
log says why.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jaxtyping import Float
from safetensors import safe_open
from torch import Tensor

from mahals._time import utc_timestamp
from mahals._version import __version__
from mahals.activations import SinkRule, capture
from mahals.io import load_tensors, save_tensors, tensor_sha256
from mahals.models import MahalsModel, weights_fingerprint
from mahals.registry import ModelSpec, Registry

__all__ = [
    "ACTIVATION_KEY",
    "N_TOKENS_KEY",
    "CACHE_FORMAT",
    "CachedBlock",
    "cache_identity",
    "cached_capture",
    "data_fingerprint",
    "item_identity",
    "model_identity",
    "read_activation_cache",
    "texts_sha256",
    "write_activation_cache",
]

log = logging.getLogger(__name__)

ACTIVATION_KEY = "activations"
N_TOKENS_KEY = "n_tokens"
CACHE_FORMAT = "mahals.pooled_activations"
CHECKSUM_PREFIX = "sha256:"
"""Metadata key prefix of each stored tensor's content checksum (``sha256:activations`` …)."""


def texts_sha256(texts: Sequence[str]) -> str:
    """A digest identifying an ordered list of texts (cache identity)."""
    return hashlib.sha256(json.dumps(list(texts)).encode("utf-8")).hexdigest()


def model_identity(spec: ModelSpec, prefix: str = "model") -> dict[str, str]:
    """``<prefix>_source`` and ``<prefix>_weights`` (:func:`~mahals.models.weights_fingerprint`)
    of ``spec``, and ``<prefix>_adapter`` (the adapter's fingerprint) when it has a LoRA
    adapter: which weights a result came from."""
    # spec.source is a hub id, path or pypi-gguf source, never a registry key: no lookup.
    identity = {
        f"{prefix}_source": spec.source,
        f"{prefix}_weights": weights_fingerprint(spec.source, registry=Registry()),
    }
    if spec.adapter:
        identity[f"{prefix}_adapter"] = _adapter_fingerprint(spec.adapter)
    return identity


def _adapter_fingerprint(adapter: str) -> str:
    if adapter.startswith("package:"):
        from importlib import resources

        adapter = str(resources.files("mahals").joinpath(adapter.removeprefix("package:")))
    return f"{adapter}|{weights_fingerprint(adapter, registry=Registry())}"


def data_fingerprint(source: str) -> str:
    """SHA-256 of a local data file's bytes (of every file, by relative name, for a folder);
    ``hub:<id>`` for a hub dataset id (its content is not checked)."""
    path = Path(source).expanduser()
    if not path.exists():
        return f"hub:{source}"
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.relative_to(path) if file != path else file.name}\0".encode())
        with file.open("rb") as handle:
            for block in iter(lambda handle=handle: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def item_identity(
    texts: Sequence[str] | None = None, *, data: str | None = None, **specs: ModelSpec
) -> dict[str, str]:
    """What a run's item (a model, a pair) was computed from: the SHA-256 of its rows
    (``texts``) or of its data source's files (``data``, when the rows are not read yet) and,
    per named model (``model=``, ``base=`` / ``tuned=``), its source and weights fingerprint."""
    identity = {}
    if texts is not None:
        identity |= {"texts_sha256": texts_sha256(texts), "n": str(len(texts))}
    if data is not None:
        identity["data_sha256"] = data_fingerprint(data)
    for role, spec in specs.items():
        identity.update(model_identity(spec, role))
    return identity


def cache_identity(
    spec: ModelSpec, pool: str, texts: Sequence[str], **extra: str
) -> dict[str, str]:
    """What a cached block must carry to stand for capturing ``texts`` with ``spec``'s model at
    token position ``pool``; ``extra`` adds run-specific entries (role, pairing rule, …)."""
    return {
        "format": CACHE_FORMAT,
        "model_key": spec.key,
        **model_identity(spec),
        "pool": pool,
        **extra,
        "n": str(len(texts)),
        "texts_sha256": texts_sha256(texts),
    }


def read_activation_cache(
    path: Path,
    identity: Mapping[str, str],
    n_rows: int,
    required: Sequence[str] = (),
    d_model: int | None = None,
) -> tuple[dict[str, Tensor], dict[str, str]] | None:
    """The tensors cached at ``path`` (the float32 ``[n_rows, layer, d_model]`` block under
    :data:`ACTIVATION_KEY`, and the others by name) and its metadata, if the metadata matches
    ``identity`` on every key, every tensor's checksum verifies and every name in ``required``
    is stored with ``n_rows`` rows; ``None`` (logging why) otherwise."""
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
    try:
        tensors = load_tensors(path)
    except Exception as error:  # a truncated body behind an intact header
        log.info("  cache %s unreadable (%s); recomputing", path.name, error)
        return None
    tensor = tensors.get(ACTIVATION_KEY)
    shape_ok = (
        tensor is not None
        and tensor.ndim == 3
        and tensor.shape[0] == n_rows
        and (d_model is None or tensor.shape[2] == d_model)
        and tensor.dtype == torch.float32
    )
    if not shape_ok:
        log.info(
            "  cache %s holds no float32 [n=%d, layer, d_model=%s] block; recomputing",
            path.name, n_rows, d_model,
        )  # fmt: skip
        return None
    garbled = [
        name
        for name, t in tensors.items()
        if stored.get(CHECKSUM_PREFIX + name) != tensor_sha256(t)
    ]
    if garbled:
        log.info("  cache %s fails its checksum (%s); recomputing", path.name, ", ".join(garbled))
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
    identity (and any other string metadata) and each tensor's SHA-256, atomically."""
    tensors = {**(extra or {}), ACTIVATION_KEY: activations}
    checksums = {CHECKSUM_PREFIX + name: tensor_sha256(t) for name, t in tensors.items()}
    save_tensors(path, tensors, {**metadata, "mahals_version": __version__, **checksums})


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
    d_model: int | None = None,
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
    ``use_cache=False`` neither reads nor writes the file. ``d_model`` (the model's width, when
    known) is checked on a cached block.
    """
    required = (N_TOKENS_KEY, *extra_tensors) if extra_tensors else ()
    cached = (
        read_activation_cache(path, identity, len(texts), required, d_model) if use_cache else None
    )
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
