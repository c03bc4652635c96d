"""shmnonce: one strictly increasing nonce sequence per key, shared by every process on a host."""

from __future__ import annotations

from ._engine import ShmNonce
from ._errors import LockTimeout, NonceError, StateError

__all__ = ["LockTimeout", "NonceError", "ShmNonce", "StateError", "__version__"]
__version__ = "0.1.0"
