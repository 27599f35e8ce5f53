"""probed as a process, for tests and benches: start it, talk to it with probectl, kill it; and QEMU's QMP.

`QemuGuest(..., extra_args=qmp_args(path))` gives a guest a QMP socket; `qmp_status(path)` then says
whether its CPUs run, without going through the gdbstub (whose `?` would change what is looked at).
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["DaemonProcess", "qmp", "qmp_args", "qmp_pc", "qmp_read_u32", "qmp_status", "rss_bytes", "wait_for"]


class DaemonProcess:
    """A `probed` process on a guest; its stderr is collected in `log` (drained by a thread, so a chatty
    daemon never blocks on a full pipe).

    Args:
        target: `--target`.
        control: `--control` (the state file goes beside it unless `extra` says otherwise).
        extra: more arguments.
        ready: wait for the "ready" line (False: for a daemon expected to refuse to start).

    Attributes:
        started: `time.monotonic()` just before the process was spawned.
        ready_at: when its "ready" line was read.
    """

    def __init__(self, target: str, control: Path, *extra: str, ready: bool = True, timeout: float = 60):
        self.control = control
        self.log: list[str] = []
        self._ready = threading.Event()
        self.ready_at: float | None = None
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "probed.front.daemon", "--target", target, "--control", str(control), *extra],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()
        if ready and not self._ready.wait(timeout):
            self.kill()
            raise AssertionError("probed did not start:\n" + self.text())

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)
            if "ready" in line and not self._ready.is_set():
                self.ready_at = time.monotonic()
                self._ready.set()
        self._ready.set()  # exited: stop waiting

    def text(self) -> str:
        """Everything it wrote to stderr so far."""
        return "".join(self.log)

    def ctl(self, *args: str, check: int | None = 0, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run probectl against this daemon; with `check`, assert its exit code."""
        out = subprocess.run([sys.executable, "-m", "probed.front.cli", "--control", str(self.control), *args],
                             capture_output=True, text=True, timeout=timeout)
        if check is not None:
            assert out.returncode == check, (out.returncode, out.stdout, out.stderr)
        return out

    def json(self, *args: str) -> object:
        """probectl's `--json` output of a verb, parsed."""
        return json.loads(self.ctl(*args, "--json").stdout)

    def call(self, method: str, params: dict | None = None) -> object:
        """One JSON-RPC request on the control socket, in this process (no probectl to start); its result.

        Raises:
            probed.front.cli.DaemonError: the daemon answered with an error.
        """
        from probed.front.cli import Client

        client = Client(self.control)
        try:
            return client.call(method, params)
        finally:
            client.close()

    def wait(self, timeout: float = 90) -> int:
        """Wait for it to exit; its exit code."""
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout)
        return code

    def stop(self, timeout: float = 90) -> int:
        """SIGTERM, then wait for it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        """SIGKILL, as the OOM killer would, and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.wait()

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def qmp_args(path: Path) -> Sequence[str]:
    """QEMU arguments for a QMP server on a unix socket at `path`."""
    return ["-qmp", f"unix:{path},server=on,wait=off"]


def qmp(path: Path, command: str, arguments: dict | None = None, timeout: float = 10):
    """One QMP command's `return` value."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        f = sock.makefile("rwb")
        f.readline()  # the greeting
        for execute, args in (("qmp_capabilities", None), (command, arguments)):
            f.write(json.dumps({"execute": execute, **({"arguments": args} if args else {})}).encode() + b"\n")
            f.flush()
            while True:
                reply = json.loads(f.readline())
                if "error" in reply:
                    raise RuntimeError(f"QMP {execute}: {reply['error']}")
                if "return" in reply:
                    break  # events (STOP, RESUME...) may come first
        return reply["return"]


def qmp_status(path: Path, timeout: float = 10) -> dict:
    """QMP's `query-status` (`{"running": bool, "status": "running" | "debug" | ...}`)."""
    return qmp(path, "query-status", timeout=timeout)


def qmp_read_u32(path: Path, address: int) -> int:
    """A 32-bit word of guest physical memory, through the monitor's `xp` (not through the gdbstub)."""
    out = qmp(path, "human-monitor-command", {"command-line": f"xp /1wx {address:#x}"})
    return int(out.split()[-1], 16)


def qmp_pc(path: Path) -> int:
    """The first vCPU's program counter, through the monitor's `info registers`."""
    out = qmp(path, "human-monitor-command", {"command-line": "info registers"})
    for word in out.split():
        if word.startswith(("EIP=", "RIP=")):
            return int(word[4:], 16)
    raise RuntimeError(f"no EIP/RIP in: {out[:200]}")


def rss_bytes(pid: int) -> int:
    """A process's resident set size."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no VmRSS for pid {pid}")


def wait_for(predicate, timeout: float = 30, interval: float = 0.05):
    """Poll `predicate` until it returns something true; that value (AssertionError after `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)

