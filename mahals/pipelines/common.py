"""What Phase 1 and Phase 2.1 share: the per-item loop with checkpoints, the summary they
return, and the command-line options and error handling of ``mahals phase1`` / ``phase2``."""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import functools
import json
import logging
import math
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from mahals._time import utc_timestamp
from mahals.cluster import ClusterError, FanOut, Split
from mahals.io import atomic_write_json
from mahals.pipelines.checkpoint import (
    CHECKPOINT_VERSION,
    Checkpoint,
    CheckpointChoice,
    CheckpointError,
    add_checkpoint_flags,
)
from mahals.registry import RegistryError

__all__ = [
    "DEFAULT_MAX_BATCH_TOKENS",
    "LOCK_NAME",
    "ITEM_RESULT_NAME",
    "CheckpointedRun",
    "ItemTask",
    "OutputFolderLocked",
    "RunSummary",
    "TRACEBACK_VARIABLE",
    "USER_ERRORS",
    "exit_status",
    "holds_output_lock",
    "lock_output_folder",
    "add_cluster_arguments",
    "add_run_arguments",
    "compute_item",
    "result_fields",
    "run_options",
    "run_checkpointed",
    "run_command",
    "worker_name",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH_TOKENS = 4096
"""Padded tokens per forward pass: keeps activation memory near 1-2 GB on 7-9B models while an
H100 still runs at full throughput (see benchmarks/README.md)."""

#: Errors a user can fix (bad file, key, argument, data, checkpoint or setting): the CLI prints
#: them on one line and exits with status 2 (:func:`exit_status`); anything else is a bug and
#: keeps its traceback. mahals raises ``ValueError`` (its data errors are subclasses) for an
#: invalid argument or input and ``OSError`` for a file, folder, cache or hub problem, whether
#: the setting is parsed or the phase is running; ``TypeError``, ``KeyError``, ``IndexError``,
#: ``AttributeError``, ``RuntimeError`` … are programming errors.
USER_ERRORS: tuple[type[Exception], ...] = (
    ValueError,
    OSError,  # missing/unwritable files and folders, broken caches, hub failures
    CheckpointError,
    RegistryError,
    FloatingPointError,  # non-finite activations: the message says which dtype to use
    ClusterError,  # Ray missing for --ray-address, or the cluster unreachable
)

TRACEBACK_VARIABLE = "MAHALS_TRACEBACK"
"""Environment variable: set to ``1`` to see user errors' full tracebacks too."""

LOCK_NAME = ".mahals.lock"
"""The lock file of an output folder: one writer at a time (:func:`lock_output_folder`)."""


class OutputFolderLocked(CheckpointError):
    """Another process holds the output folder's lock (it is writing a run there)."""


_held_locks: dict[Path, int] = {}
"""Output folders locked by this process → how many nested holders (the lock is reentrant)."""


@contextlib.contextmanager
def lock_output_folder(out_dir: Path, *, wait: bool = False) -> Iterator[None]:
    """Hold the exclusive lock of ``out_dir`` for the duration of the block.

    The lock is an OS lock (``fcntl.flock``) on ``out_dir/.mahals.lock``, so it is released
    when its process ends, crash or SIGKILL included; the file records the holder's PID.
    Without ``wait``, a folder locked by another process raises :class:`OutputFolderLocked`
    naming that PID at once; with ``wait``, the block waits for the lock. Nested use in one
    process is allowed (the outer holder keeps the lock).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    key = out_dir.resolve()
    if key in _held_locks:
        _held_locks[key] += 1
        try:
            yield
        finally:
            _held_locks[key] -= 1
        return
    path = key / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            if not wait:
                raise OutputFolderLocked(
                    f"output folder {out_dir} is in use by another mahals run (PID {holder}); "
                    "wait for it to finish, pass --wait to wait for it, or choose another --out"
                ) from None
            log.info("Output folder %s is in use (PID %s): waiting for it", out_dir, holder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        _held_locks[key] = 1
        try:
            yield
        finally:
            del _held_locks[key]
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the flock


_Run = TypeVar("_Run", bound=Callable[..., Any])


def holds_output_lock(run: _Run) -> _Run:
    """Decorate a phase's ``run_phaseN(config, ...)``: the whole run holds the lock of
    ``config.out_dir`` (waiting for it when ``config.wait_for_lock``)."""

    @functools.wraps(run)
    def locked(config: Any, *args: Any, **kwargs: Any) -> Any:
        with lock_output_folder(config.out_dir, wait=getattr(config, "wait_for_lock", False)):
            return run(config, *args, **kwargs)

    return locked  # type: ignore[return-value]


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
    identity: Callable[[str], Mapping[str, str]] | None = None,
    item_files: Collection[str] = (),
    result_problem: Callable[[Any], str | None] | None = None,
    wait_for_lock: bool = False,
    fan_out: FanOut | None = None,
    split: Split | None = None,
) -> CheckpointedRun:
    """Run ``compute(item)`` for each pending item, recording each result as soon as it exists.

    Each finished item writes its own result file, ``<out_dir>/<item>/item_result.json``
    (:func:`compute_item`): the result with the run's ``settings`` and the item's identity.
    Those files are the source of truth; the checkpoint file is derived from them (rewritten
    after every finished item). A resumed run takes an item as finished when its result file
    is valid, was written under the same settings and identity, and its ``item_files`` are
    there; a checkpoint entry without a result file (written by an older mahals) is kept and
    its result file written from it, if its identity and files still stand.

    The whole call holds the output folder's lock (:func:`lock_output_folder`; ``wait_for_lock``
    waits for another run to finish instead of refusing). With ``fan_out``
    (:class:`mahals.cluster.FanOut`), pending items run as parallel tasks (Ray) that write
    their result files; this process, holding the lock, derives the checkpoint from them.
    ``split`` (:class:`mahals.cluster.Split`) lets the fan-out spread an item's parts over
    several workers first; the sequential loop ignores it (``compute`` computes the parts).

    A fresh start deletes the checkpoint and the per-item folders of earlier runs (their caches
    included), so nothing stale is mixed into the new results. Entries of a per-item folder
    named in ``keep_on_fresh`` survive it: only for caches that validate themselves on reuse
    (Phase 2.1's ``hidden_states_cache``, keyed by model, texts and pooling).

    ``identity(item)`` says what an item's result was computed from (rows' SHA-256, model
    source, weights fingerprint …); a finished item whose recorded identity differs from the
    current one is computed again (the log names what changed), as is one whose
    ``item_files`` (names inside its folder) are missing or empty, or whose recorded result
    ``result_problem(result)`` finds malformed (it returns what is wrong, e.g. a missing
    ``AQI``, or ``None``), so a damaged result never reaches the summary.

    Temporary files that a killed run left behind mid atomic write (``.<name>.*.tmp``) are
    removed from ``out_dir`` at the start and from an item's folder before it is computed; only
    under the lock, so never from under another run.
    """
    folders = {item: _item_folder(out_dir, item) for item in items}
    with lock_output_folder(out_dir, wait=wait_for_lock):
        _remove_interrupted_writes(out_dir, recursive=False)
        checkpoint = Checkpoint.open(out_dir / checkpoint_name, items, settings, choice)
        if checkpoint.decision is CheckpointChoice.FRESH:
            for item in items:
                _clear_item_folder(out_dir, item, keep=keep_on_fresh)
        identities = {item: dict(identity(item)) for item in items} if identity else {}
        for item in items:
            _derive_entry(
                checkpoint, item, folders[item], identities.get(item), item_files, result_problem
            )
        checkpoint.save()
        tasks = [
            ItemTask(
                item, folders[item], checkpoint_name, checkpoint.settings, identities.get(item)
            )
            for item in checkpoint.pending
        ]

        def finished(item: str, entry: Mapping[str, Any]) -> None:
            checkpoint.adopt(item, entry)
            checkpoint.save()

        if fan_out is None or not tasks:
            for task in tasks:
                finished(task.item, compute_item(compute, task))
        else:
            fan_out.run(compute, tasks, finished, split)
        return CheckpointedRun(checkpoint.results, checkpoint)


ITEM_RESULT_NAME = "item_result.json"
"""Each item's result file, inside its folder: the source of truth of a run's progress."""
ITEM_RESULT_FORMAT = "mahals.item_result"


@dataclass(frozen=True)
class ItemTask:
    """One item to compute and where its result file goes; sent as is to a parallel worker.

    Attributes:
        item: the item (model key, pair key or ``pair/side/point``).
        folder: the item's folder; its result file is ``folder/item_result.json``.
        run: the run's checkpoint name (which phase wrote the file).
        settings: the run's settings, as checkpointed.
        identity: what the item is computed from (``None``: not tracked).
    """

    item: str
    folder: Path
    run: str
    settings: Mapping[str, Any]
    identity: Mapping[str, str] | None = None

    @property
    def result_path(self) -> Path:
        return self.folder / ITEM_RESULT_NAME


def compute_item(compute: Callable[[str], Mapping[str, Any]], task: ItemTask) -> dict[str, Any]:
    """``compute(task.item)``, then its result file written atomically; returns the entry
    written (``result``, ``identity``, ``started_at``, ``completed_at``). Runs in the process
    that computes the item: the run's own, or a parallel worker."""
    _remove_interrupted_writes(task.folder, recursive=True)
    started = time.time()
    started_at = utc_timestamp()
    result = dict(compute(task.item))
    result.setdefault("seconds", round(time.time() - started, 3))
    entry: dict[str, Any] = {"result": result, "started_at": started_at}
    if task.identity is not None:
        entry["identity"] = dict(task.identity)
    entry["completed_at"] = utc_timestamp()
    _write_item_result(
        task, {**entry, "worker": {"host": socket.gethostname(), "pid": os.getpid()}}
    )
    return entry


def worker_name() -> str:
    """``host:pid`` of this process: which worker wrote a file."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _write_item_result(task: ItemTask, entry: Mapping[str, Any]) -> None:
    atomic_write_json(
        task.result_path,
        {
            "format": ITEM_RESULT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "item": task.item,
            "run": task.run,
            "settings": dict(task.settings),
            **entry,
        },
    )


def _read_item_result(
    folder: Path, item: str, run: str, settings: Mapping[str, Any]
) -> tuple[dict[str, Any] | None, str | None]:
    """``(entry, None)`` from a valid result file of this run's settings; ``(None, why)``
    when it is unreadable or was written by another run; ``(None, None)`` when absent."""
    path = folder / ITEM_RESULT_NAME
    if not path.is_file():
        return None, None
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return None, f"its result file {path} is unreadable ({error})"
    if not (
        isinstance(document, dict)
        and document.get("format") == ITEM_RESULT_FORMAT
        and document.get("version") == CHECKPOINT_VERSION
        and isinstance(document.get("result"), dict)
        and isinstance(document.get("completed_at"), str)
    ):
        return None, f"{path} is not a mahals item result file of this version"
    if document.get("item") != item or document.get("run") != run:
        return (
            None,
            f"{path} belongs to another run ({document.get('run')}, {document.get('item')})",
        )
    if document.get("settings") != settings:
        return None, f"{path} was written with other settings"
    keys = ("result", "identity", "started_at", "completed_at")
    return {key: document[key] for key in keys if key in document}, None


def _derive_entry(
    checkpoint: Checkpoint,
    item: str,
    folder: Path,
    current: Mapping[str, str] | None,
    item_files: Collection[str],
    result_problem: Callable[[Any], str | None] | None,
) -> None:
    """Make ``checkpoint``'s entry of ``item`` what its result file says: adopted when the file
    is valid and stands (same identity, well-formed result, output files there), forgotten
    otherwise."""
    task = ItemTask(item, folder, checkpoint.path.name, checkpoint.settings, current)
    entry, unusable = _read_item_result(folder, item, task.run, checkpoint.settings)
    legacy = entry is None and unusable is None and item in checkpoint.completed
    source = checkpoint.path if legacy else task.result_path
    if legacy:  # a checkpoint of an older mahals: its entry stands in for the result file
        entry = checkpoint.entry(item)
    action = "left out (--skip)" if checkpoint.skipping else "computing it again"
    if entry is None:
        if unusable:
            log.warning("%s: %s; %s", item, unusable, action)
        checkpoint.forget(item)
        return
    stale = _stale_reason(entry, source, folder, current, item_files, result_problem)
    if stale:
        log.warning("%s: %s; %s", item, stale, action)
        checkpoint.forget(item)
        return
    if legacy and not checkpoint.skipping:
        _write_item_result(task, entry)
    checkpoint.adopt(item, entry)


def _stale_reason(
    entry: Mapping[str, Any],
    source: Path,
    folder: Path,
    current: Mapping[str, str] | None,
    item_files: Collection[str],
    result_problem: Callable[[Any], str | None] | None,
) -> str | None:
    """Why a finished item's recorded ``entry`` (read from ``source``) cannot stand (``None``
    if it can)."""
    problem = result_problem(entry["result"]) if result_problem else None
    if problem:
        return f"its result recorded in {source} is malformed ({problem})"
    recorded = entry.get("identity", {})
    if current is not None:
        changed = sorted(
            key for key in set(current) | set(recorded) if current.get(key) != recorded.get(key)
        )
        if changed:
            return "its inputs changed since its result was recorded (" + ", ".join(changed) + ")"
    missing = [
        name
        for name in item_files
        if not (folder / name).is_file() or not (folder / name).stat().st_size
    ]
    if missing:
        return f"its output files {missing} are missing or empty"
    return None


def result_fields(
    required: Collection[str], *, finite: Collection[str] = ()
) -> Callable[[Any], str | None]:
    """A ``result_problem`` check for :func:`run_checkpointed`: a result must be a JSON object
    holding every ``required`` field, each of ``finite`` a finite number."""

    def problem(result: Any) -> str | None:
        if not isinstance(result, Mapping):
            return f"not a JSON object but {type(result).__name__}"
        missing = [name for name in required if name not in result]
        if missing:
            return f"it lacks {missing}"
        for name in finite:
            value = result[name]
            if isinstance(value, bool) or not isinstance(value, int | float):
                return f"{name} is {value!r}, not a number"
            if not math.isfinite(value):
                return f"{name} is {value!r}"
        return None

    return problem


def require_positive(config: Any, names: Sequence[str]) -> None:
    """Raise naming the first of ``config``'s fields ``names`` that is below 1."""
    for name in names:
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")


def results_under(results: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The results of items ``<prefix>/<name>``, keyed by ``<name>``."""
    return {
        item.removeprefix(f"{prefix}/"): result
        for item, result in results.items()
        if item.startswith(f"{prefix}/")
    }


def _item_folder(out_dir: Path, item: str) -> Path:
    """``out_dir/item``, refused unless ``item`` is a relative path of plain folder names
    (``pair`` or ``pair/tuned/lambda_1``: no ``..``, ``.``, empty part, not absolute) whose
    parent resolves inside ``out_dir``, so clean-up never reaches outside it."""
    folder = out_dir / item
    parts = item.split("/")
    root = out_dir.resolve()
    parent = folder.parent.resolve()
    if (
        item.startswith("/")
        or any(part in ("", ".", "..") or "\\" in part for part in parts)
        or not (parent == root or root in parent.parents)
    ):
        raise CheckpointError(
            f"refusing to use {folder}: item {item!r} is not a relative path of folder names "
            f"inside the output folder {out_dir}"
        )
    return folder


def _clear_item_folder(out_dir: Path, item: str, *, keep: Collection[str]) -> None:
    """Delete ``out_dir/item``, or, when ``keep`` names some of its entries, everything else
    in it. ``item`` must name an entry directly inside ``out_dir`` (a link is removed, never
    followed), so nothing outside the output folder is ever removed."""
    folder = _item_folder(out_dir, item)
    if folder.is_symlink():
        folder.unlink()
        return
    if not folder.is_dir():
        return
    if not keep:
        shutil.rmtree(folder, ignore_errors=True)
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
    ``--out``, ``--wait``, ``--no-progress``, ``--resume`` / ``--fresh`` / ``--skip`` and
    ``--workers`` / ``--ray-address`` (:func:`add_cluster_arguments`)."""
    parser.add_argument("--mode", choices=("sanity", "full"), default="sanity", help=mode_help)
    parser.add_argument(
        "--pool", "--token", dest="pool", choices=pools, default=pool,
        help=f"token position whose hidden state is taken (default {pool})",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=seed, help=seed_help)
    parser.add_argument(
        "--batch-size", type=_positive_int,
        help="texts per forward pass (default: the registry's per model)",
    )  # fmt: skip
    parser.add_argument(
        "--max-batch-tokens", type=_non_negative_int, default=DEFAULT_MAX_BATCH_TOKENS,
        help=f"cap on padded tokens per forward pass (default {DEFAULT_MAX_BATCH_TOKENS}; 0 = no cap)",
    )  # fmt: skip
    parser.add_argument(
        "--no-cache", action="store_true", help="neither reuse nor write cached activations"
    )
    parser.add_argument("--out", type=Path, default=out, help=f"output folder (default {out})")
    parser.add_argument(
        "--wait", dest="wait_for_lock", action="store_true",
        help="if another run is writing to --out, wait for it instead of refusing",
    )  # fmt: skip
    parser.add_argument(
        "--no-progress", dest="progress", action="store_const", const=False, default=None,
        help="no progress bars (default: shown on a terminal)",
    )  # fmt: skip
    add_checkpoint_flags(parser)
    add_cluster_arguments(parser)


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """``--workers N`` and ``--ray-address auto|ADDR`` (:mod:`mahals.cluster`); parsed as
    ``args.workers`` / ``args.ray_address``."""
    parser.add_argument(
        "--workers", type=_positive_int,
        help="Ray workers computing items in parallel, each reserving the GPUs a model needs "
        "(default 1: one after another, no Ray; with --ray-address: as many as the cluster holds)",
    )  # fmt: skip
    parser.add_argument(
        "--ray-address", metavar="auto|ADDR",
        help="run the items on an existing Ray cluster ('auto' or its address)",
    )  # fmt: skip


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0 = no cap), got {value}")
    return value


def run_options(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields set by the options of :func:`add_run_arguments`."""
    return {
        "pool": args.pool,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "max_batch_tokens": args.max_batch_tokens or None,
        "use_cache": not args.no_cache,
        "out_dir": args.out,
        "wait_for_lock": args.wait_for_lock,
        "checkpoint": args.checkpoint_choice,
        "progress": args.progress,
        "workers": args.workers,
        "ray_address": args.ray_address,
    }


def exit_status(
    command: str,
    action: Callable[[], int | None],
    extra_errors: tuple[type[Exception], ...] = (),
) -> int:
    """Run ``mahals <command>``'s ``action``: its exit status (``None`` counts as 0), or 2 after
    printing ``mahals <command>: error: …`` as one line on standard error when it raises a user
    error (:data:`USER_ERRORS` or ``extra_errors``). Other exceptions propagate with their
    traceback, as do user errors when ``$MAHALS_TRACEBACK`` is ``1``."""
    try:
        return action() or 0
    except (*USER_ERRORS, *extra_errors) as error:
        if os.environ.get(TRACEBACK_VARIABLE) == "1":
            raise
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"mahals {command}: error: {' '.join(str(message).split())}", file=sys.stderr)
        return 2


def run_command(
    command: str,
    config: Callable[[], Any],
    run: Callable[[Any], Any],
    data_errors: tuple[type[Exception], ...] = (),
) -> int:
    """``run(config())`` for ``mahals <command>`` through :func:`exit_status`: 0 on success, 2
    with a one-line message for a user error, while the settings are read or the phase runs
    (``data_errors``: further exception types that count as user errors)."""

    def action() -> None:
        run(config())

    return exit_status(command, action, data_errors)
