"""Files the daemon makes or removes, checked the way OpenSSH's StrictModes checks its own.

- A private directory (the control socket's, the state file's) must be a real directory owned by the user
  running probed and writable by nobody else; every directory above it must be owned by root or that user
  and writable by nobody else unless it has the sticky bit (`/tmp`). Otherwise another local user could put
  their own socket where `probectl` looks for the daemon's, or rename the directory away.
- Only sockets are ever removed (a stale socket of a daemon that died); anything else at a socket's path is
  refused, never deleted.
- The events file is opened without following a symlink, must be a regular file of the user's, and is made
  owner-only (0600).
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import socket
import stat
from pathlib import Path
from typing import Any

from probed.errors import ProbedError

__all__ = [
    "SocketInUse",
    "UnsafePath",
    "check_loopback",
    "check_private_dir",
    "make_private_dir",
    "open_private_append",
    "prepare_socket_path",
]


class UnsafePath(ProbedError):
    """A path probed will not use: wrong owner, writable by others, a symlink, not a socket..."""

    def __init__(self, path: Path | str, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"refusing {path}: {reason}")

    def data(self) -> dict[str, Any]:
        return {**super().data(), "path": str(self.path), "reason": self.reason}


class SocketInUse(ProbedError):
    """Another daemon already listens on the socket."""

    def __init__(self, path: Path):
        self.path = path
        super().__init__(f"another daemon listens on {path}; stop it or use --control")

    def data(self) -> dict[str, Any]:
        return {**super().data(), "path": str(self.path)}


def _owner_name(uid: int) -> str:
    try:
        import pwd

        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (KeyError, ImportError):
        return f"uid {uid}"


def check_private_dir(path: Path) -> None:
    """Refuse a directory another user could tamper with (see the module docstring).

    Raises:
        UnsafePath: with the reason.
        FileNotFoundError: it does not exist.
    """
    uid = os.geteuid()
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePath(path, "it is a symlink; give the real directory")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePath(path, "it is not a directory")
    if st.st_uid != uid:
        raise UnsafePath(path, f"the directory is owned by {_owner_name(st.st_uid)}, not by {_owner_name(uid)}")
    if st.st_mode & 0o022:
        raise UnsafePath(path, f"the directory is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
                               f"chmod go-w {path}")
    for parent in Path(os.path.abspath(path)).parents:
        pst = os.stat(parent)
        if pst.st_uid not in (0, uid):
            raise UnsafePath(path, f"{parent} above it is owned by {_owner_name(pst.st_uid)}")
        if pst.st_mode & 0o022 and not pst.st_mode & stat.S_ISVTX:
            raise UnsafePath(path, f"{parent} above it is writable by group or others without the sticky bit "
                                   f"(mode {stat.S_IMODE(pst.st_mode):04o})")


def make_private_dir(path: Path) -> None:
    """Make `path` (mode 0700) unless it exists, then check it (`check_private_dir`).

    Raises:
        UnsafePath: it exists but is not safe.
        OSError: it cannot be made.
    """
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    check_private_dir(path)


def prepare_socket_path(path: Path) -> None:
    """Get `path` ready to bind a unix socket: refuse a live socket or a non-socket, remove a stale socket.

    Raises:
        SocketInUse: something accepts connections there.
        UnsafePath: something that is not a socket is there (it is left alone).
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "a directory" if stat.S_ISDIR(st.st_mode) else "not a socket"
        raise UnsafePath(path, f"{kind} is there (only a stale socket would be removed); move it or choose another path")
    probe = socket.socket(socket.AF_UNIX)
    try:
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise
        try:
            os.unlink(path)  # stale: left by a daemon that died, nobody listens
        except FileNotFoundError:
            pass
    else:
        raise SocketInUse(path)
    finally:
        probe.close()


def open_private_append(path: Path):
    """Open a file of the user's for appending text, never through a symlink, mode 0600.

    A FIFO or device is refused (and not waited on); an existing file readable by others is narrowed to 0600.

    Raises:
        UnsafePath: a symlink, not a regular file, or another user's file.
        OSError: it cannot be opened.
    """
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePath(path, "it is a symlink (not followed)") from exc
        if exc.errno == errno.ENXIO:
            raise UnsafePath(path, "it is a FIFO with no reader, not a regular file") from exc
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePath(path, "it is not a regular file")
        if st.st_uid != os.geteuid():
            raise UnsafePath(path, f"the file is owned by {_owner_name(st.st_uid)}")
        if stat.S_IMODE(st.st_mode) & 0o077:
            os.fchmod(fd, 0o600)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, "a", encoding="utf-8")
    except BaseException:
        os.close(fd)
        raise


def check_loopback(host: str) -> bool:
    """Whether `host` (an address or `localhost`) is a loopback address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
