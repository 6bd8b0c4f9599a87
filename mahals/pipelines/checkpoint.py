"""Resumable checkpoints of the study's multi-item runs.

:class:`Checkpoint` records a multi-item run (one item per model or model pair) so that an
interrupted run resumes where it stopped; Phase 1 and Phase 2.1 share it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from mahals._time import utc_timestamp
from mahals.io import atomic_write_json

__all__ = [
    "Checkpoint",
    "CheckpointChoice",
    "CheckpointError",
    "add_checkpoint_flags",
    "ask_checkpoint_choice",
    "stdin_is_terminal",
]


log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "mahals.checkpoint"
CHECKPOINT_VERSION = 1
_RULE = "=" * 60


class CheckpointChoice(StrEnum):
    """What to do with an existing checkpoint (CLI flags ``--resume`` / ``--fresh`` / ``--skip``).

    * ``RESUME`` — keep the completed items, compute the pending ones;
    * ``FRESH`` — delete the checkpoint and compute every item again;
    * ``SKIP`` — compute nothing new, summarise the completed items only.
    """

    RESUME = "resume"
    FRESH = "fresh"
    SKIP = "skip"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used: unreadable, not a mahals checkpoint, or other settings."""


_ANSWERS: dict[str, CheckpointChoice] = {
    "r": CheckpointChoice.RESUME,
    "resume": CheckpointChoice.RESUME,
    "f": CheckpointChoice.FRESH,
    "fresh": CheckpointChoice.FRESH,
    "s": CheckpointChoice.SKIP,
    "skip": CheckpointChoice.SKIP,
}


def add_checkpoint_flags(parser: argparse.ArgumentParser) -> None:
    """Add the mutually exclusive ``--resume`` / ``--fresh`` / ``--skip`` flags to ``parser``.

    The parsed value is ``args.checkpoint_choice``: a :class:`CheckpointChoice`, or ``None``
    when no flag was given (then :meth:`Checkpoint.open` asks on a terminal, else resumes).
    """
    group = parser.add_mutually_exclusive_group()
    for choice, help_text in (
        (CheckpointChoice.RESUME, "resume from an existing checkpoint without asking"),
        (CheckpointChoice.FRESH, "delete an existing checkpoint and start over"),
        (CheckpointChoice.SKIP, "compute nothing new; summarise the checkpointed items only"),
    ):
        group.add_argument(
            f"--{choice.value}",
            dest="checkpoint_choice",
            action="store_const",
            const=choice,
            help=help_text,
        )
    parser.set_defaults(checkpoint_choice=None)


def stdin_is_terminal() -> bool:
    """Whether standard input is an interactive terminal (``False`` if it is closed or absent)."""
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (ValueError, OSError):  # closed or detached stdin
        return False


def ask_checkpoint_choice(
    ask: Callable[[str], str] = input, say: Callable[[str], None] = print
) -> CheckpointChoice:
    """Show the [R]/[F]/[S] menu and read an answer with ``ask``, re-asking on invalid input.

    End of input (``EOFError``) counts as resume, so a closed stdin never blocks or crashes.
    """
    say("[R] Resume from checkpoint")
    say("[F] Fresh start (delete checkpoint)")
    say("[S] Skip (use cached results)")
    while True:
        try:
            answer = ask("Select option: ")
        except EOFError:
            say("No answer (end of input): resuming from checkpoint.")
            return CheckpointChoice.RESUME
        choice = _ANSWERS.get(answer.strip().lower())
        if choice is not None:
            return choice
        say(f"Invalid option {answer.strip()!r}: enter R, F or S.")


def _json_roundtrip(obj: Any, what: str) -> Any:
    """``obj`` as it will read back from JSON (tuples become lists); refuses non-JSON values,
    NaN and infinities included (they are not JSON)."""
    try:
        return json.loads(json.dumps(obj, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise TypeError(f"{what} must be JSON-serialisable: {err}") from err


def _settings_differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """One ``key: stored -> current`` line per key whose value differs (absent keys included)."""
    absent = "<absent>"
    return [
        f"{key}: {stored.get(key, absent)!r} -> {current.get(key, absent)!r}"
        for key in sorted(set(stored) | set(current))
        if stored.get(key, absent) != current.get(key, absent)
    ]


def _read_checkpoint_document(path: Path) -> dict[str, Any]:
    """Parse and validate a checkpoint file; any problem raises :class:`CheckpointError`."""
    hint = "pass --fresh to discard it and start over"
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(
            f"checkpoint {path} is corrupt (not valid JSON: {err}); {hint}"
        ) from err
    valid = (
        isinstance(document, dict)
        and document.get("format") == CHECKPOINT_FORMAT
        and isinstance(document.get("settings"), dict)
        and isinstance(document.get("items"), list)
        and isinstance(document.get("results"), dict)
        and all(
            isinstance(entry, dict) and "result" in entry for entry in document["results"].values()
        )
    )
    if not valid:
        raise CheckpointError(f"checkpoint {path} is not a mahals checkpoint file; {hint}")
    if document.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {document.get('version')!r}, this mahals "
            f"reads version {CHECKPOINT_VERSION}; {hint}"
        )
    return document


class Checkpoint:
    """Per-item progress of a run over an ordered list of items (model keys), in one JSON file.

    The file records the run's ``settings``, the ``items`` in order, and for every completed
    item its JSON result with timestamps. It is rewritten atomically after each
    :meth:`record`, so a crash at any point leaves the previous complete checkpoint.

    Open it with :meth:`open`, which decides what to do with an existing file (resume, fresh
    start or skip). Results stored for items that are not in this run's ``items`` are kept in
    the file but not reported by :attr:`completed` or :attr:`results`.
    """

    def __init__(
        self,
        path: Path,
        items: Sequence[str],
        settings: Mapping[str, Any],
        *,
        stored_results: Mapping[str, Mapping[str, Any]] | None = None,
        created_at: str | None = None,
        decision: CheckpointChoice | None = None,
    ) -> None:
        """Prefer :meth:`open`; this constructor neither reads nor writes the file."""
        if len(set(items)) != len(items):
            raise ValueError(f"checkpoint items must be unique, got {list(items)}")
        self.path = path
        self.items: tuple[str, ...] = tuple(items)
        self.settings: dict[str, Any] = _json_roundtrip(dict(settings), "checkpoint settings")
        self.created_at = created_at or utc_timestamp()
        self.decision = decision
        """The option in force (``--resume/--fresh/--skip`` or the answer); ``None`` if no
        option was given and there was no checkpoint. ``FRESH`` means per-item outputs left
        by earlier runs are stale and should be recomputed, not reused."""
        self._entries: dict[str, dict[str, Any]] = {
            item: dict(entry) for item, entry in (stored_results or {}).items()
        }

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        items: Sequence[str],
        settings: Mapping[str, Any],
        choice: CheckpointChoice | str | None = None,
        *,
        ask: Callable[[str], str] = input,
        is_terminal: Callable[[], bool] = stdin_is_terminal,
        say: Callable[[str], None] = log.info,
    ) -> Checkpoint:
        """Open the checkpoint at ``path`` for a run over ``items`` with ``settings``.

        With no file there, returns an empty checkpoint (written at the first :meth:`record`)
        whose :attr:`decision` is ``choice``. With a file there, reports (``say``) which items are
        completed and pending, then decides: ``choice`` if given (from
        ``--resume/--fresh/--skip``); otherwise asks with ``ask`` when ``is_terminal()``;
        otherwise resumes and says so — it never waits for input that cannot come.

        * resume — completed items are kept, :attr:`pending` lists the rest;
        * fresh — the file is deleted and every item is pending; the caller should discard
          per-item outputs of earlier runs;
        * skip — :attr:`pending` is empty: the run summarises the completed items only.

        Raises:
            CheckpointError: the file is not valid JSON or not a mahals checkpoint (unless
                fresh), or it was written with different ``settings`` (unless fresh; the
                message names the differing keys).
        """
        path = Path(path)
        choice = CheckpointChoice(choice) if choice is not None else None
        if not path.exists():
            if choice is CheckpointChoice.SKIP:
                say(f"No checkpoint at {path}: --skip leaves nothing to summarise.")
            return cls(path, items, settings, decision=choice)

        say(_RULE)
        say(f"Checkpoint found: {path.name}")
        try:
            document = _read_checkpoint_document(path)
        except CheckpointError:
            if choice is not CheckpointChoice.FRESH:
                say(_RULE)
                raise
            say("The checkpoint is unreadable; deleting it (--fresh).")
            say(_RULE)
            path.unlink()
            return cls(path, items, settings, decision=CheckpointChoice.FRESH)

        current = cls(
            path,
            items,
            settings,
            stored_results=document["results"],
            created_at=document.get("created_at"),
        )
        differences = _settings_differences(document["settings"], current.settings)
        say(f"Completed models: {list(current.completed)}")
        say(f"Pending models: {list(current.pending)}")
        if differences:
            say(f"Settings differ from the checkpoint: {', '.join(differences)}")
        say(_RULE)

        if choice is not None:
            say(f"Checkpoint option: --{choice.value}")
        elif is_terminal():
            choice = ask_checkpoint_choice(ask, say)
        else:
            choice = CheckpointChoice.RESUME
            say("No terminal on stdin: resuming from checkpoint (use --fresh or --skip otherwise).")

        if choice is CheckpointChoice.FRESH:
            path.unlink(missing_ok=True)
            say(f"Fresh start: deleted {path}")
            return cls(path, items, settings, decision=choice)
        if differences:
            raise CheckpointError(
                f"checkpoint {path} was written with different settings "
                f"({'; '.join(differences)}); rerun with the same settings, "
                "or pass --fresh to discard it"
            )
        current.decision = choice
        return current

    @property
    def skipping(self) -> bool:
        """Whether the run computes nothing new (``--skip``)."""
        return self.decision is CheckpointChoice.SKIP

    @property
    def completed(self) -> tuple[str, ...]:
        """This run's items that have a recorded result, in item order."""
        return tuple(item for item in self.items if item in self._entries)

    @property
    def pending(self) -> tuple[str, ...]:
        """This run's items still to compute, in item order (empty when skipping)."""
        if self.skipping:
            return ()
        return tuple(item for item in self.items if item not in self._entries)

    @property
    def results(self) -> dict[str, Any]:
        """Recorded results of the completed items, in item order."""
        return {item: self._entries[item]["result"] for item in self.completed}

    def result(self, item: str) -> Any:
        """The recorded result of ``item``; ``KeyError`` if it has none."""
        if item not in self._entries:
            raise KeyError(f"no checkpointed result for {item!r} in {self.path}")
        return self._entries[item]["result"]

    def completed_at(self, item: str) -> str:
        """ISO-8601 UTC time at which ``item``'s result was recorded."""
        if item not in self._entries:
            raise KeyError(f"no checkpointed result for {item!r} in {self.path}")
        return self._entries[item]["completed_at"]

    def identity(self, item: str) -> dict[str, str]:
        """What ``item``'s result was computed from, as recorded with it (empty if nothing)."""
        return dict(self._entries.get(item, {}).get("identity", {}))

    def forget(self, item: str) -> None:
        """Make ``item`` pending again (its result no longer stands); the file is rewritten at
        the next :meth:`record`."""
        self._entries.pop(item, None)

    def record(
        self,
        item: str,
        result: Any,
        *,
        started_at: datetime | None = None,
        identity: Mapping[str, str] | None = None,
    ) -> None:
        """Store ``item``'s JSON-able ``result`` and rewrite the checkpoint file atomically.

        ``result`` is kept as it reads back from JSON, so :meth:`result` returns the same
        value before and after a reopen. ``started_at`` (aware datetime) is stored if given;
        ``identity`` (what the result was computed from) too.
        """
        if item not in self.items:
            raise ValueError(f"{item!r} is not one of this checkpoint's items {list(self.items)}")
        if self.skipping:
            raise CheckpointError(
                f"checkpoint {self.path} was opened with --skip: nothing is recorded"
            )
        entry: dict[str, Any] = {"result": _json_roundtrip(result, f"the result of {item!r}")}
        if started_at is not None:
            entry["started_at"] = started_at.astimezone(UTC).isoformat(timespec="seconds")
        if identity is not None:
            entry["identity"] = dict(identity)
        entry["completed_at"] = utc_timestamp()
        self._entries[item] = entry
        self._write()

    def adopt(self, item: str, entry: Mapping[str, Any]) -> None:
        """Take ``item``'s entry (``result``, ``identity``, timestamps) as read from its item
        result file, without writing; :meth:`save` rewrites the checkpoint file. Allowed when
        skipping: the derived view of a ``--skip`` run then lists the finished items."""
        if item not in self.items:
            raise ValueError(f"{item!r} is not one of this checkpoint's items {list(self.items)}")
        if "result" not in entry or "completed_at" not in entry:
            raise ValueError(f"the entry of {item!r} needs 'result' and 'completed_at'")
        self._entries[item] = _json_roundtrip(dict(entry), f"the entry of {item!r}")

    def entry(self, item: str) -> dict[str, Any]:
        """``item``'s recorded entry (``result``, ``identity``, timestamps); ``KeyError`` if none."""
        if item not in self._entries:
            raise KeyError(f"no checkpointed result for {item!r} in {self.path}")
        return dict(self._entries[item])

    def save(self) -> None:
        """Rewrite the checkpoint file atomically from the entries held (nothing when skipping)."""
        if not self.skipping:
            self._write()

    def _write(self) -> None:
        atomic_write_json(
            self.path,
            {
                "format": CHECKPOINT_FORMAT,
                "version": CHECKPOINT_VERSION,
                "created_at": self.created_at,
                "updated_at": utc_timestamp(),
                "settings": self.settings,
                "items": list(self.items),
                # this run's items in item order (parallel workers finish in any order)
                "results": {
                    **{item: self._entries[item] for item in self.completed},
                    **self._entries,
                },
            },
        )
