from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest

from shmnonce import ShmNonce


@pytest.fixture
def state_dir(tmp_path: object) -> str:
    path = os.path.join(str(tmp_path), "state")
    return path


@pytest.fixture
def eng(state_dir: str) -> Iterator[ShmNonce]:
    e = ShmNonce.attach("t", state_dir)
    yield e
    with contextlib.suppress(Exception):
        ShmNonce.attach("t", state_dir).unlink()
    e.close()


@pytest.fixture(autouse=True)
def _key_index(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """A private API-key index per test (inherited by its subprocesses).

    The host-wide one (/var/tmp/shmnonce-keys) would carry one test's key sequences
    into the next test, as it must for real processes.
    """
    monkeypatch.setenv("SHMNONCE_KEY_INDEX", os.path.join(str(tmp_path), "key-index"))


@pytest.fixture(autouse=True)
def _cleanup_segments(state_dir: str) -> Iterator[None]:
    """Remove every segment a test created under its state_dir."""
    yield
    from shmnonce._paths import segment_name

    real = os.path.realpath(state_dir)
    if not os.path.isdir(real):
        return
    for entry in os.listdir(real):
        if entry.endswith(".lock"):
            seg = segment_name(entry[: -len(".lock")], real)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"/dev/shm/{seg}")
