"""The one exception hierarchy of shmnonce."""

from __future__ import annotations

__all__ = ["LockTimeout", "NonceError", "StateError"]


class NonceError(Exception):
    """Base class of every error raised by shmnonce."""


class LockTimeout(NonceError, TimeoutError):
    """``serialized(timeout=...)`` could not enter the section in time."""


class StateError(NonceError):
    """The shared segment or the persisted state is missing, foreign or corrupt.

    The message names the file or segment and how to repair it. shmnonce never
    silently restarts a sequence from the clock when its state is damaged.
    """
