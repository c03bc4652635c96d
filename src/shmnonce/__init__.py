"""shmnonce: one strictly increasing nonce sequence per key, shared by every process on a host."""

from __future__ import annotations

import logging

# The library logs through the "shmnonce" logger and configures no output: an application
# that configures logging sees the records; one that does not sees nothing (without this
# handler, Python's last-resort handler would print WARNING records as bare stderr lines).
logging.getLogger("shmnonce").addHandler(logging.NullHandler())

from ._errors import LockTimeout, NonceError, StateError  # noqa: E402
from .shm.engine import ShmNonce  # noqa: E402

__all__ = ["LockTimeout", "NonceError", "ShmNonce", "StateError", "__version__"]
__version__ = "0.1.0"
