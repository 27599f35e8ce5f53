"""`probed` run as a user runs it, for the tests that drive it with `probectl` (test_cli, test_gdb,
test_docs)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

__all__ = ["Daemon"]


class Daemon:
    """`probed` as a process; its stderr is read on a thread into `log` for as long as it runs (a pipe
    nobody reads would stop the daemon once the pipe's buffer is full)."""

    def __init__(self, guest, tmp_path: Path, *extra: str):
        self.control = tmp_path / "ctl" / "control.sock"
        self.events = tmp_path / "hits.jsonl"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "probed.front.daemon", "--target", guest.target,
             *(["--symbols", str(guest.elf)] if guest.elf else []),
             "--control", str(self.control), "--events", str(self.events), *extra],
            stderr=subprocess.PIPE, text=True,
        )
        self.log: list[str] = []
        self._ready = threading.Event()
        self._drain = threading.Thread(target=self._read_stderr, daemon=True)
        self._drain.start()
        self._ready.wait(timeout=120)
        if not any("ready" in line for line in self.log):
            raise AssertionError("probed did not start:\n" + self.stderr())

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)
            if "ready" in line:
                self._ready.set()
        self._ready.set()  # (ended: the waiter looks at the log)
        self.proc.stderr.close()

    def stderr(self) -> str:
        """What the daemon wrote so far (all of it once it has exited and `wait()` was called)."""
        return "".join(self.log)

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout=timeout)
        self._drain.join(timeout=30)
        return code

    def ctl(self, *args: str, check: int | None = 0, input: str | None = None, cwd: Path | None = None
            ) -> subprocess.CompletedProcess:
        """probectl with these args (and `input` on its stdin, run in `cwd`); its exit code must be `check`."""
        out = subprocess.run([sys.executable, "-m", "probed.front.cli", "--control", str(self.control), *args],
                             capture_output=True, text=True, timeout=120, input=input, cwd=cwd)
        if check is not None:
            assert out.returncode == check, f"{out.stderr}\nthe daemon's log:\n{self.stderr()}"
        return out

    def records(self, probe: str, count: int) -> list[dict]:
        """The probe's next `count` hit records (from the ring first), as `probectl events --json` gives them."""
        out = self.ctl("events", "--probe", probe, "--count", str(count), "--json").stdout
        return [json.loads(line) for line in out.splitlines()]

    def kill(self) -> None:
        """SIGKILL if still running (a fixture's teardown after a test that did not stop it)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.wait(timeout=30)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout=30)
