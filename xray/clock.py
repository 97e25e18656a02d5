"""The one timestamp format of records and cards: ISO 8601 UTC, to the second.

A module of its own so that light processes (the training job's lease keeper) can stamp
records without importing torch through `xray.package`.
"""

from __future__ import annotations

from datetime import UTC, datetime


def utc_now() -> str:
    """The current time as an ISO 8601 UTC string."""
    return datetime.now(UTC).isoformat(timespec="seconds")
