"""The host's end of the Linux guest's shell channel (the guest's ttyS2, a unix socket on the host).

init.sh runs each line it reads there with sh and answers with the output, then "PROBED DONE <status>".
"""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

__all__ = ["GuestCommandError", "GuestShell"]

_DONE = re.compile(rb"PROBED DONE (\d+)\n")


class GuestCommandError(RuntimeError):
    """A command run in the guest exited non-zero."""


class GuestShell:
    """One connection to the guest's shell channel; commands run one at a time."""

    def __init__(self, path: Path):
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.connect(str(path))
        self._buffer = b""

    def send(self, command: str) -> None:
        """Send a command without waiting for its answer (one that may never come: a reboot)."""
        if "\n" in command:
            raise ValueError("one line per command")
        self._sock.sendall(command.encode() + b"\n")

    def run(self, command: str, timeout: float = 60) -> str:
        self.send(command)
        deadline = time.monotonic() + timeout
        while not (match := _DONE.search(self._buffer)):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the guest did not finish {command!r} in {timeout:g} s")
            self._sock.settimeout(left)
            chunk = self._sock.recv(65536)
            if not chunk:
                raise ConnectionError("the guest's shell channel closed")
            self._buffer += chunk
        output = self._buffer[: match.start()].decode(errors="replace")
        self._buffer = self._buffer[match.end():]
        if match.group(1) != b"0":
            raise GuestCommandError(f"{command!r} exited {int(match.group(1))}: {output}")
        return output

    def close(self) -> None:
        self._sock.close()
