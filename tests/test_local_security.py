"""Local security of the daemon's files, with a real probed process on a real QEMU guest.

What another local user could otherwise do: plant a symlink where `--events` writes, pre-create the control
directory to stand in for the daemon, get a file deleted by naming it as a socket path, or reach the GDB stub
over the network.
"""

from __future__ import annotations

import os
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from probed.testing.daemon import DaemonProcess

NOBODY = 65534


@pytest.fixture
def tmp() -> Iterator[Path]:
    # Short paths: a unix socket's must fit in 108 bytes.
    with tempfile.TemporaryDirectory(prefix="psec") as d:
        yield Path(d)


def start(guest, control: Path, *extra: str, ready: bool = True) -> DaemonProcess:
    return DaemonProcess(guest.target, control, "--symbols", str(guest.elf), *extra, ready=ready)


def refused(guest, control: Path, *extra: str) -> str:
    """Start probed expecting it to refuse: exit 1 with one line on stderr; that line."""
    daemon = start(guest, control, *extra, ready=False)
    assert daemon.wait() == 1, daemon.text()
    assert daemon.text().startswith("probed: refusing "), daemon.text()
    return daemon.text()


def test_events_file_symlink_is_not_followed_and_the_file_is_owner_only(guest_i386, tmp):
    victim = tmp / "victim"
    victim.write_text("precious\n")
    link = tmp / "hits.jsonl"
    link.symlink_to(victim)
    text = refused(guest_i386, tmp / "ctl" / "control.sock", "--events", str(link))
    assert "it is a symlink (not followed)" in text
    assert victim.read_text() == "precious\n"

    link.unlink()
    link.write_text("")
    os.chmod(link, 0o644)
    with start(guest_i386, tmp / "ctl" / "control.sock", "--events", str(link), "--stopped") as daemon:
        assert stat.S_IMODE(os.stat(link).st_mode) == 0o600  # narrowed: hit records are the user's alone
        assert daemon.stop() == 0


def test_control_directory_of_another_user_or_writable_by_others_is_refused(guest_i386, tmp):
    control = tmp / "ctl" / "control.sock"
    control.parent.mkdir(mode=0o700)
    os.chown(control.parent, NOBODY, NOBODY)
    assert "the directory is owned by" in refused(guest_i386, control)

    os.chown(control.parent, os.geteuid(), os.getegid())
    os.chmod(control.parent, 0o777)
    assert "writable by group or others (mode 0777)" in refused(guest_i386, control)

    # A directory above it that anyone may rename things in (no sticky bit) is as bad.
    os.chmod(control.parent, 0o700)
    os.chmod(tmp, 0o777)
    try:
        assert "above it is writable by group or others without the sticky bit" in refused(guest_i386, control)
    finally:
        os.chmod(tmp, 0o700)

    # The state file's directory is held to the same rules.
    state = tmp / "shared" / "state.json"
    state.parent.mkdir(mode=0o775)
    os.chmod(state.parent, 0o775)
    assert "writable by group or others (mode 0775)" in refused(guest_i386, control, "--state", str(state))


def test_nothing_but_a_stale_socket_is_removed(guest_i386, tmp):
    control = tmp / "ctl" / "control.sock"
    control.parent.mkdir(mode=0o700)
    precious = tmp / "ctl" / "precious"
    precious.write_text("keep me\n")
    assert "not a socket is there" in refused(guest_i386, precious)
    assert "not a socket is there" in refused(guest_i386, control, "--gdb-listen", f"unix:{precious}")
    assert precious.read_text() == "keep me\n"

    # A socket nobody listens on (a dead daemon's) is removed and bound again.
    stale = tmp / "ctl" / "gdb.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))
    with start(guest_i386, control, "--gdb-listen", "--stopped") as daemon:
        assert stat.S_ISSOCK(os.lstat(stale).st_mode)
        assert stat.S_IMODE(os.lstat(stale).st_mode) == 0o600  # GDB's socket is the user's alone
        assert f"serving GDB on unix:{stale}" in daemon.text()
        # ... and a second daemon is refused on the live sockets.
        second = start(guest_i386, control, ready=False)
        assert second.wait() == 1 and "another daemon listens" in second.text()
        assert daemon.stop() == 0


def test_gdb_stub_binds_loopback_only_unless_told(guest_i386, tmp):
    control = tmp / "ctl" / "control.sock"
    text = refused(guest_i386, control, "--gdb-listen", "tcp:0.0.0.0:0")
    assert "not a loopback address" in text and "--gdb-allow-remote" in text
    with start(guest_i386, control, "--gdb-listen", "tcp:127.0.0.1:0", "--stopped") as daemon:
        assert "serving GDB on tcp:127.0.0.1:" in daemon.text()
        assert daemon.stop() == 0


def test_state_file_symlink_is_refused(guest_i386, tmp):
    control = tmp / "ctl" / "control.sock"
    control.parent.mkdir(mode=0o700)
    elsewhere = tmp / "elsewhere.json"
    elsewhere.write_text('{"version": 1, "probes": [], "symbols": []}')
    (control.parent / "state.json").symlink_to(elsewhere)
    assert "the state file is a symlink" in refused(guest_i386, control)
