"""Which process is QEMU: found from the gdbstub connection's peer, and its memory opened.

Reading a guest's RAM directly needs QEMU's pid. The connection to the gdbstub tells it:
- unix socket: `SO_PEERCRED` names the process that called `listen()`, which is QEMU unless the socket was
  made by someone else and handed to QEMU (`-chardev socket,fd=N`, as `probed.testing.qemu` does). So the
  answer is checked: QEMU's side of the connection is a socket bound to the same path (`/proc/net/unix`
  lists accepted sockets with their listener's path, state 03 = connected), and the process holding it
  (`/proc/PID/fd/*` -> `socket:[INODE]`) is QEMU.
- TCP: the peer's socket is the `/proc/net/tcp{,6}` line whose local address is our peer and whose remote
  address is us; its inode leads to the process the same way.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["GuestMemoryUnavailable", "SharedBacking", "find_qemu_pid", "open_process_memory", "open_shared_backing"]


class GuestMemoryUnavailable(Exception):
    """Guest RAM cannot be read directly; the message says why (the stub's `m` is used instead)."""


def find_qemu_pid(sock: socket.socket) -> int:
    """QEMU's pid, from a connected socket to its gdbstub.

    Raises:
        GuestMemoryUnavailable: the peer is not on this host, or its process cannot be found.
    """
    if sock.family == socket.AF_UNIX:
        return _unix_peer_pid(sock)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        return _tcp_peer_pid(sock)
    raise GuestMemoryUnavailable(f"the gdbstub connection is neither unix nor TCP (family {sock.family})")


def open_process_memory(pid: int) -> int:
    """A read-only descriptor of `/proc/PID/mem` (reads with `os.pread` at host-virtual addresses).

    Raises:
        GuestMemoryUnavailable: no such process, or no permission (ptrace access mode: root or the same user
            with ptrace allowed by Yama).
    """
    try:
        return os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise GuestMemoryUnavailable(f"no process {pid}") from None
    except OSError as exc:
        raise GuestMemoryUnavailable(f"cannot open /proc/{pid}/mem: {exc.strerror}") from None


@dataclass(frozen=True)
class SharedBacking:
    """A file QEMU maps shared at some host addresses (its RAM as `memory-backend-memfd` or
    `memory-backend-file` with `share=on`): an open descriptor of it, and the file offset of the host
    address asked about."""

    fd: int
    offset: int
    path: str


@dataclass(frozen=True)
class _Vma:
    start: int
    end: int
    shared: bool
    offset: int
    device: tuple[int, int]
    inode: int
    path: str


def _vmas(pid: int) -> list[_Vma]:
    out = []
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) < 5:
                    continue
                start, end = (int(x, 16) for x in parts[0].split("-"))
                major, minor = (int(x, 16) for x in parts[3].split(":"))
                path = parts[5].rstrip("\n") if len(parts) > 5 else ""
                out.append(_Vma(start, end, parts[1][3:4] == "s", int(parts[2], 16), (major, minor), int(parts[4]), path))
    except OSError as exc:
        raise GuestMemoryUnavailable(f"cannot read /proc/{pid}/maps: {exc.strerror}") from None
    return out


def open_shared_backing(pid: int, host: int, length: int) -> SharedBacking:
    """The file behind QEMU's host memory `[host, host+length)`, when it is one file mapped shared there (the
    guest's RAM then is that file, and can be mapped into this process: no system call per read).

    Opened read-only by its path if that is the same file, else through QEMU's descriptor of it
    (`/proc/PID/fd/N`, which needs the same access as `/proc/PID/mem`: a deleted file, a memfd), else through
    `/proc/PID/map_files` (root).

    Raises:
        GuestMemoryUnavailable: the memory is not all one shared file mapping, or the file cannot be opened.
    """
    vmas = _vmas(pid)
    first = next((v for v in vmas if v.start <= host < v.end), None)
    if first is None:
        raise GuestMemoryUnavailable(f"QEMU's memory at {host:#x} is not mapped in /proc/{pid}/maps")
    if not first.shared or not first.inode:
        raise GuestMemoryUnavailable("QEMU's RAM is not a file mapped shared (memory-backend-memfd or -file with share=on)")
    # The range may span several VMAs of the same file (QEMU's madvise calls split them), offsets contiguous.
    at, index = first.end, vmas.index(first)
    while at < host + length:
        index += 1
        nxt = vmas[index] if index < len(vmas) else None
        if nxt is None or nxt.start != at or (nxt.device, nxt.inode) != (first.device, first.inode) or not nxt.shared \
                or nxt.offset != first.offset + (nxt.start - first.start):
            raise GuestMemoryUnavailable(f"QEMU's RAM at {host:#x} is not one shared file mapping throughout")
        at = nxt.end
    offset = first.offset + (host - first.start)
    for candidate in _backing_paths(pid, first):
        try:
            fd = os.open(candidate, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        st = os.fstat(fd)
        if (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino) == (*first.device, first.inode):
            return SharedBacking(fd, offset, first.path)
        os.close(fd)
    raise GuestMemoryUnavailable(f"cannot open QEMU's RAM file {first.path!r} (neither by its path nor through /proc/{pid})")


def _backing_paths(pid: int, vma: _Vma) -> Iterable[str]:
    if vma.path.startswith("/") and not vma.path.endswith(" (deleted)"):
        yield vma.path
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        fds = []
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == vma.path:
                yield f"/proc/{pid}/fd/{fd}"
        except OSError:
            continue
    yield f"/proc/{pid}/map_files/{vma.start:x}-{vma.end:x}"


def _unix_peer_pid(sock: socket.socket) -> int:
    path = sock.getpeername()
    if isinstance(path, bytes):
        path = path.decode(errors="surrogateescape")
    if not path:
        raise GuestMemoryUnavailable("the gdbstub's unix socket has no path to find QEMU by")
    shown = "@" + path[1:] if path.startswith("\0") else path
    inodes = set()
    try:
        with open("/proc/net/unix") as f:
            next(f)
            for line in f:
                parts = line.split(None, 7)
                if len(parts) == 8 and parts[5] == "03" and parts[7].rstrip("\n") == shown:
                    inodes.add(int(parts[6]))
    except OSError as exc:
        raise GuestMemoryUnavailable(f"cannot read /proc/net/unix: {exc.strerror}") from None
    cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    hint = struct.unpack("3i", cred)[0]
    return _holder_of(inodes, hint, f"the gdbstub socket {path}")


def _tcp_peer_pid(sock: socket.socket) -> int:
    local, peer = sock.getsockname()[:2], sock.getpeername()[:2]
    want_local, want_remote = _endpoint(*peer), _endpoint(*local)
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if _parse_endpoint(parts[1]) == want_local and _parse_endpoint(parts[2]) == want_remote:
                        inodes.add(int(parts[9]))
        except OSError:
            continue
    if not inodes:
        raise GuestMemoryUnavailable(f"the gdbstub at {peer[0]}:{peer[1]} is not a socket on this host")
    return _holder_of(inodes, None, f"the gdbstub at {peer[0]}:{peer[1]}")


def _endpoint(host: str, port: int) -> tuple[ipaddress.IPv6Address, int]:
    ip = ipaddress.ip_address(host)
    if isinstance(ip, ipaddress.IPv4Address):
        ip = ipaddress.IPv6Address(f"::ffff:{ip}")
    return ip, port


def _parse_endpoint(text: str) -> tuple[ipaddress.IPv6Address, int]:
    """`0100007F:1F90` (IPv4) or 32 hex digits (IPv6): each 32-bit word in host (little-endian) order."""
    addr, _, port = text.partition(":")
    raw = b"".join(struct.pack("<I", int(addr[i : i + 8], 16)) for i in range(0, len(addr), 8))
    ip = ipaddress.ip_address(raw)
    if isinstance(ip, ipaddress.IPv4Address):
        ip = ipaddress.IPv6Address(f"::ffff:{ip}")
    return ip, int(port, 16)


def _holder_of(inodes: set[int], hint: int | None, what: str) -> int:
    """The process (not us) holding a socket with one of these inodes; `hint` is tried first."""
    if not inodes:
        raise GuestMemoryUnavailable(f"no process on this host serves {what} (another network namespace?)")
    names = {f"socket:[{i}]" for i in inodes}
    me = os.getpid()
    candidates: Iterable[str] = ([str(hint)] if hint and hint != me else []) + sorted(
        (p for p in os.listdir("/proc") if p.isdigit() and int(p) != me), key=int
    )
    for pid in candidates:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in names:
                    return int(pid)
            except OSError:
                continue
    raise GuestMemoryUnavailable(f"cannot see which process serves {what} (its /proc/PID/fd is not readable)")
