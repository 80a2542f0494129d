"""Kubernetes timestamps (RFC 3339, UTC, whole seconds: metav1.Time) to and from datetimes."""

from __future__ import annotations

from datetime import datetime


def format_time(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None
