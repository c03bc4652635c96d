"""Crash sweeps the suite lacked (adversarial review): next() persisting a new ceiling,
jump_forward, and a creating attach of an API-key sequence (key index claim).

Same method as tests/test_crash_sweep.py (its fork server and helpers): the child is
killed by strace at every call of every system call name the operation makes; after
each kill a fresh attach must work and its next() must be above every value issued.
These pass on the current code (coverage, not findings).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.test_crash_sweep import HOUR, Issued, Server, _ahead, _issued, _reboot, _sweep


@pytest.fixture
def sweep_server(tmp_path: object) -> Iterator[Server]:
    srv = Server(str(tmp_path))
    yield srv
    srv.close()

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("op", ["extend", "jump"])
def test_ceiling_extension_killed_at_every_system_call(
    sweep_server: Server, state_dir: str, op: str
) -> None:
    server = sweep_server
    name = "cx"
    out = os.path.join(server.tmp, "issued")
    issued = Issued()
    issued.add([_ahead(state_dir, name)])

    def before() -> None:
        pass

    def after(code: int, syscall: str, n: int) -> None:
        issued.add(_issued(out))
        issued.check(state_dir, name, f"{op}: {syscall} #{n}")

    swept = _sweep(server, op, name, state_dir, out, before, after)
    assert {"openat", "write", "fsync", "rename"} <= set(swept), swept
    print(f"{op}: {sum(swept.values())} kill points over {len(swept)} system calls: {swept}")


def test_key_sequence_creation_killed_at_every_system_call(
    tmp_path: object, state_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    index = os.path.join(str(tmp_path), "index")
    os.mkdir(index, 0o700)
    monkeypatch.setenv("SHMNONCE_KEY_INDEX", index)
    name = "key-" + "ab" * 16
    srv = Server(str(tmp_path))
    try:
        out = os.path.join(srv.tmp, "issued")
        issued = Issued()
        issued.add([_ahead(state_dir, name)])

        def before() -> None:
            _reboot(state_dir, name)
            for entry in os.listdir(index):  # the first attach registers the key again
                os.unlink(os.path.join(index, entry))

        def after(code: int, syscall: str, n: int) -> None:
            issued.add(_issued(out))
            issued.check(state_dir, name, f"key attach: {syscall} #{n}")
            leftovers = [e for e in os.listdir(index) if e.startswith(".")]
            assert len(leftovers) <= 1, leftovers  # at most the killed run's temporary file

        swept = _sweep(srv, "attach", name, state_dir, out, before, after)
        assert {"linkat", "fsync"} <= set(swept), swept
        print(f"key attach: {sum(swept.values())} kill points over {len(swept)} system calls")
    finally:
        srv.close()
    assert HOUR
