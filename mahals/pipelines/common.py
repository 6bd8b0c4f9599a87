"""What Phase 1 and Phase 2.1 share: the per-item loop with checkpoints, the summary they
return, and the command-line options and error handling of ``mahals phase1`` / ``phase2``."""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mahals.pipelines.checkpoint import (
    Checkpoint,
    CheckpointChoice,
    CheckpointError,
    add_checkpoint_flags,
)
from mahals.registry import RegistryError

__all__ = [
    "DEFAULT_MAX_BATCH_TOKENS",
    "CheckpointedRun",
    "RunSummary",
    "add_run_arguments",
    "run_options",
    "run_checkpointed",
    "run_command",
]

DEFAULT_MAX_BATCH_TOKENS = 4096
"""Padded tokens per forward pass: keeps activation memory near 1-2 GB on 7-9B models while an
H100 still runs at full throughput (see benchmarks/README.md)."""

#: Errors a user can fix (bad file, key, checkpoint or setting): the CLI prints them on one
#: line and exits with status 2; anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[Exception], ...] = (CheckpointError, RegistryError, FileNotFoundError)


@dataclass(frozen=True)
class RunSummary:
    """What a phase's ``run_phaseN`` returns.

    Attributes:
        out_dir: the run's output folder.
        summary_path: the summary JSON file.
        results: per completed item (model or pair key, run order), its JSON result as
            checkpointed.
        pending: items without a result (only after ``--skip``).
        plots: cross-item figure name → path.
    """

    out_dir: Path
    summary_path: Path
    results: dict[str, dict[str, Any]]
    pending: tuple[str, ...]
    plots: dict[str, Path]


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


def add_run_arguments(
    parser: argparse.ArgumentParser,
    *,
    mode_help: str,
    out: Path,
    pool: str,
    pools: Sequence[str],
    seed: int | None,
    seed_help: str,
) -> None:
    """The options both phases take, with the same names and meanings: ``--mode``,
    ``--pool``, ``--seed``, ``--batch-size``, ``--max-batch-tokens``, ``--no-cache``,
    ``--out``, ``--no-progress`` and ``--resume`` / ``--fresh`` / ``--skip``."""
    parser.add_argument("--mode", choices=("sanity", "full"), default="sanity", help=mode_help)
    parser.add_argument(
        "--pool", "--token", dest="pool", choices=pools, default=pool,
        help=f"token position whose hidden state is taken (default {pool})",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=seed, help=seed_help)
    parser.add_argument(
        "--batch-size", type=int, help="texts per forward pass (default: the registry's per model)"
    )
    parser.add_argument(
        "--max-batch-tokens", type=int, default=DEFAULT_MAX_BATCH_TOKENS,
        help=f"cap on padded tokens per forward pass (default {DEFAULT_MAX_BATCH_TOKENS}; 0 = no cap)",
    )  # fmt: skip
    parser.add_argument(
        "--no-cache", action="store_true", help="neither reuse nor write cached activations"
    )
    parser.add_argument("--out", type=Path, default=out, help=f"output folder (default {out})")
    parser.add_argument(
        "--no-progress", dest="progress", action="store_const", const=False, default=None,
        help="no progress bars (default: shown on a terminal)",
    )  # fmt: skip
    add_checkpoint_flags(parser)


def run_options(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields set by the options of :func:`add_run_arguments`."""
    return {
        "pool": args.pool,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "max_batch_tokens": args.max_batch_tokens or None,
        "use_cache": not args.no_cache,
        "out_dir": args.out,
        "checkpoint": args.checkpoint_choice,
        "progress": args.progress,
    }


def run_command(
    command: str,
    config: Callable[[], Any],
    run: Callable[[Any], Any],
    data_errors: tuple[type[Exception], ...] = (),
) -> int:
    """``run(config())`` for ``mahals <command>``: 0 on success; 2 with a one-line
    ``mahals <command>: error: …`` on standard error for a user error (:data:`USER_ERRORS`,
    ``data_errors``, or a ``ValueError`` from ``config()``, i.e. an invalid setting)."""
    try:
        settings = config()
    except (ValueError, *USER_ERRORS) as error:
        return _user_error(command, error)
    try:
        run(settings)
    except (*USER_ERRORS, *data_errors) as error:
        return _user_error(command, error)
    return 0


def _user_error(command: str, error: Exception) -> int:
    message = error.args[0] if isinstance(error, KeyError) and error.args else error
    print(f"mahals {command}: error: {message}", file=sys.stderr)
    return 2
