"""What Phase 1 and Phase 2.1 share: the per-model loop with checkpoints, console output in the
seed's shape, and the model loader that tests and benchmarks replace with random-weight models."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from mahals._version import __version__
from mahals.io import load_tensors, save_tensors
from mahals.models import MahalsModel, load_model
from mahals.pipelines.checkpoint import Checkpoint, CheckpointChoice
from mahals.registry import ModelSpec

__all__ = [
    "DEFAULT_MAX_BATCH_TOKENS",
    "add_max_batch_tokens_flag",
    "RULE",
    "WIDE_RULE",
    "CheckpointedRun",
    "ModelLoader",
    "default_loader",
    "banner",
    "print_device",
    "print_table",
    "run_checkpointed",
    "texts_sha256",
    "read_activation_cache",
    "write_activation_cache",
    "loaded",
]

DEFAULT_MAX_BATCH_TOKENS = 4096
"""Padded tokens per forward pass: keeps activation memory near 1-2 GB on 7-9B models while an
H100 still runs at full throughput (see benchmarks/README.md)."""

RULE = "=" * 60
WIDE_RULE = "=" * 70
ModelLoader = Callable[[ModelSpec], MahalsModel]


def default_loader(spec: ModelSpec) -> MahalsModel:
    """Load a registry model by key (hub, local or PyPI GGUF)."""
    return load_model(spec.key)


def add_max_batch_tokens_flag(parser) -> None:
    parser.add_argument(
        "--max-batch-tokens", type=int, default=DEFAULT_MAX_BATCH_TOKENS,
        help=f"cap on padded tokens per forward pass (default {DEFAULT_MAX_BATCH_TOKENS}; 0 = no cap)",
    )  # fmt: skip


def banner(*lines: str, rule: str = RULE) -> None:
    print(f"\n{rule}")
    for line in lines:
        print(line)
    print(rule)


def print_device() -> None:
    """``GPU: <name>`` / ``Memory: <total> GB`` on CUDA, the CPU thread count otherwise."""
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        print(f"GPU: {props.name}\nMemory: {props.total_memory / 1e9:.1f} GB")
    else:
        print(f"Device: CPU ({torch.get_num_threads()} threads)")


def print_table(
    headers: Sequence[str],
    widths: Sequence[int],
    rows: Iterable[Sequence[Any]],
    rule: str = "-" * 60,
) -> None:
    """A fixed-width console table (the seed's results tables)."""
    print("".join(f"{h:<{w}}" for h, w in zip(headers, widths, strict=True)))
    print(rule)
    for row in rows:
        print("".join(f"{_cell(v):<{w}}" for v, w in zip(row, widths, strict=True)))
    print(rule)


def _cell(value: Any) -> str:
    return (
        f"{value:.4f}"
        if isinstance(value, float) and abs(value) < 10
        else (f"{value:.2f}" if isinstance(value, float) else str(value))
    )


@dataclass(frozen=True)
class CheckpointedRun:
    """What :func:`run_checkpointed` returns: results of every completed item, in item order."""

    results: dict[str, Any]
    checkpoint: Checkpoint


def run_checkpointed(
    *,
    out_dir: Path,
    checkpoint_name: str,
    items: Sequence[str],
    settings: Mapping[str, Any],
    choice: CheckpointChoice | str | None,
    compute: Callable[[str], Mapping[str, Any]],
    keep_on_fresh: Collection[str] = (),
) -> CheckpointedRun:
    """Run ``compute(item)`` for each pending item, recording each result as soon as it exists.

    A fresh start deletes the checkpoint and the per-item folders of earlier runs (their caches
    included), so nothing stale is mixed into the new results. Entries of a per-item folder
    named in ``keep_on_fresh`` survive it: only for caches that validate themselves on reuse
    (Phase 2.1's ``hidden_states_cache``, keyed by model, texts and pooling).

    Temporary files that a killed run left behind mid atomic write (``.<name>.*.tmp``) are
    removed from ``out_dir`` at the start and from an item's folder before it is computed.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_interrupted_writes(out_dir, recursive=False)
    checkpoint = Checkpoint.open(out_dir / checkpoint_name, items, settings, choice)
    if checkpoint.decision is CheckpointChoice.FRESH:
        for item in items:
            _clear_item_folder(out_dir / item, keep=keep_on_fresh)
    for item in checkpoint.pending:
        _remove_interrupted_writes(out_dir / item, recursive=True)
        started = time.time()
        result = dict(compute(item))
        result.setdefault("seconds", round(time.time() - started, 3))
        checkpoint.record(item, result)
    return CheckpointedRun(checkpoint.results, checkpoint)


def _clear_item_folder(folder: Path, *, keep: Collection[str]) -> None:
    """Delete ``folder``, or, when ``keep`` names some of its entries, everything else in it."""
    if not keep:
        shutil.rmtree(folder, ignore_errors=True)
        return
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if entry.name in keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _remove_interrupted_writes(folder: Path, *, recursive: bool) -> None:
    """Delete the ``.<name>.<random>.tmp`` files of atomic writes that a killed process left."""
    if not folder.is_dir():
        return
    for path in folder.rglob(".*.tmp") if recursive else folder.glob(".*.tmp"):
        if path.is_file():
            path.unlink(missing_ok=True)


ACTIVATION_KEY = "activations"


def texts_sha256(texts: Sequence[str]) -> str:
    """A digest identifying an ordered list of texts (cache identity)."""
    return hashlib.sha256(json.dumps(list(texts)).encode("utf-8")).hexdigest()


def read_activation_cache(
    path: Path, identity: Mapping[str, str], n_rows: int
) -> tuple[torch.Tensor, dict[str, str]] | None:
    """The cached ``[n_rows, layer, d_model]`` block at ``path`` and its metadata, if the
    metadata matches ``identity`` on every key; ``None`` (with a console note why) otherwise."""
    if not path.is_file():
        return None
    try:
        with safe_open(path, framework="pt") as handle:
            stored = dict(handle.metadata() or {})
    except Exception as error:  # an unreadable or truncated file is recomputed, not trusted
        print(f"  cache {path.name} unreadable ({error}); recomputing")
        return None
    stale = [key for key, value in identity.items() if stored.get(key) != value]
    if stale:
        print(f"  cache {path.name} is stale ({', '.join(stale)} differ); recomputing")
        return None
    tensor = load_tensors(path).get(ACTIVATION_KEY)
    if tensor is None or tensor.ndim != 3 or tensor.shape[0] != n_rows:
        print(f"  cache {path.name} holds no [n={n_rows}, layer, d_model] block; recomputing")
        return None
    return tensor, stored


def write_activation_cache(
    path: Path, activations: torch.Tensor, metadata: Mapping[str, str]
) -> None:
    """Save activations with their identity (and any other string metadata) atomically."""
    save_tensors(
        path, {ACTIVATION_KEY: activations}, {**metadata, "mahals_version": __version__}
    )


@contextmanager
def loaded(loader: ModelLoader, spec: ModelSpec) -> Iterator[MahalsModel]:
    """The model of ``spec`` for the duration of a ``with`` block, freed afterwards."""
    model = loader(spec)
    try:
        yield model
    finally:
        model.free()
