"""The one-host engine: a shared-memory segment, lock files and a persisted ceiling (Linux)."""

from __future__ import annotations

from .engine import ShmNonce

__all__ = ["ShmNonce"]
