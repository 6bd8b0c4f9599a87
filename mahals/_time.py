"""The one timestamp format mahals writes into JSON and metadata."""

from __future__ import annotations

from datetime import UTC, datetime

__all__ = ["utc_timestamp"]


def utc_timestamp() -> str:
    """Now, as ISO-8601 UTC to the second (``2026-11-28T08:35:46+00:00``)."""
    return datetime.now(UTC).isoformat(timespec="seconds")
