"""Building the bundled test guests and running QEMU with a gdbstub (for the tests, the demo and benches).

QEMU gets its gdbstub's listening socket from us, already bound and listening (`-chardev socket,fd=N`), so a
client can connect the moment `start()` returns: no polling, no race. Every QEMU dies with its owner
(PR_SET_PDEATHSIG) and is killed by `close()` and, as a fallback, at interpreter exit.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path

__all__ = ["GuestBuildError", "QemuError", "QemuGuest", "build_guest", "GUEST_SOURCES"]

def _default_cache() -> Path:
    # A checkout keeps its cache beside the sources (.cache/, ignored by git); an installed package uses
    # the user's cache directory.
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").exists():
        return checkout / ".cache"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "probed"


GUEST_SOURCES = Path(__file__).resolve().parent / "guests"
CACHE = Path(os.environ["PROBED_CACHE"]) if os.environ.get("PROBED_CACHE") else _default_cache()

_ARCH_FLAGS = {
    "i386": (["-m32", "-march=i686"], ["-m", "elf_i386"]),
    "x86_64": (["-m64", "-mno-red-zone", "-mcmodel=small", "-mno-sse", "-mno-mmx"], ["-m", "elf_x86_64"]),
}
_CFLAGS = [
    "-ffreestanding", "-fno-pic", "-fno-pie", "-fno-stack-protector", "-fcf-protection=none",
    "-fno-asynchronous-unwind-tables", "-O1", "-fno-omit-frame-pointer", "-g", "-Wall", "-Werror",
]


class GuestBuildError(RuntimeError):
    """The guest did not build; the message carries the compiler's or linker's output."""


class QemuError(RuntimeError):
    """QEMU is missing or did not start."""


def build_guest(arch: str) -> Path:
    """Build the test guest for `arch` ("i386" or "x86_64") into the cache, if its sources changed.

    Returns:
        The guest ELF (also its symbol file).

    Raises:
        GuestBuildError: gcc or ld failed.
    """
    if arch not in _ARCH_FLAGS:
        raise GuestBuildError(f"no test guest for {arch!r}; there are: {', '.join(_ARCH_FLAGS)}")
    cflags, ldflags = _ARCH_FLAGS[arch]
    out = CACHE / "guests" / arch
    elf = out / "guest.elf"
    sources = [GUEST_SOURCES / n for n in ("guest.c", "common.S", f"start_{arch}.S", "guest.ld")]
    if elf.exists() and all(s.stat().st_mtime <= elf.stat().st_mtime for s in sources):
        return elf
    out.mkdir(parents=True, exist_ok=True)
    # Several test processes may build at once: each builds in its own directory, the last rename wins.
    with tempfile.TemporaryDirectory(prefix="build-", dir=out) as build:
        objs = []
        for src in sources[:3]:
            obj = Path(build) / (src.stem + ".o")
            _run(["gcc", *cflags, *_CFLAGS, f'-DGUEST_ARCH="{arch}"', "-c", str(src), "-o", str(obj)])
            objs.append(str(obj))
        linked = Path(build) / "guest.elf"
        _run(["ld", *ldflags, "-nostdlib", "-static", "-T", str(sources[3]), "-o", str(linked), *objs])
        linked.replace(elf)
    return elf


def _run(cmd: Sequence[str]) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise GuestBuildError(f"{cmd[0]} is not installed (apt-get install gcc binutils)") from exc
    if proc.returncode != 0:
        raise GuestBuildError(f"{' '.join(cmd)} failed:\n{proc.stderr}")


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


_LIVE: weakref.WeakSet[QemuGuest] = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:
    for guest in list(_LIVE):
        guest.close()


class QemuGuest:
    """A QEMU running a guest, its gdbstub listening on a socket we own.

    Args:
        arch: "i386" or "x86_64" (the bundled guest's architecture, and the QEMU binary).
        smp: number of CPUs.
        stopped: start with `-S` (no instruction runs until a debugger continues).
        gdb: "unix" (a socket in a private directory) or "tcp" (127.0.0.1, a free port).
        kernel: boot this instead of the bundled guest (e.g. a Linux bzImage), with `append`/`initrd`.
        bare: boot nothing (for reading a machine's registers and target description).
        reboot: a guest reset reboots the machine (else `-no-reboot`: QEMU exits when the guest resets).
        shared_ram: the guest's RAM is a memfd QEMU maps shared (`memory-backend-memfd,share=on`), as for
            virtiofs or vhost-user; probed then maps it into its own memory.

    Attributes:
        target: what `probed --target` takes: `unix:PATH` or `tcp:127.0.0.1:PORT`.
        elf: the bundled guest's ELF (None when `kernel` is given).
        serial_log: where COM1's output goes.
    """

    def __init__(
        self,
        arch: str = "i386",
        *,
        smp: int = 1,
        stopped: bool = True,
        gdb: str = "unix",
        kernel: str | os.PathLike | None = None,
        append: str | None = None,
        initrd: str | os.PathLike | None = None,
        memory: str = "64M",
        extra_args: Sequence[str] = (),
        workdir: str | os.PathLike | None = None,
        bare: bool = False,
        reboot: bool = False,
        shared_ram: bool = False,
    ):
        self.arch = arch
        self.shared_ram = shared_ram
        self.bare = bare
        self.reboot = reboot
        self.smp = smp
        self.stopped = stopped
        self.gdb = gdb
        self.kernel = Path(kernel) if kernel else None
        self.append = append
        self.initrd = Path(initrd) if initrd else None
        self.memory = memory
        self.extra_args = list(extra_args)
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="probed-qemu-"))
        os.chmod(self.workdir, 0o700)
        self.elf: Path | None = None
        self.serial_log = self.workdir / "serial.log"
        self.target = ""
        self.proc: subprocess.Popen | None = None
        self._listener: socket.socket | None = None

    @property
    def pid(self) -> int:
        """QEMU's process id (-1 before `start()`)."""
        return self.proc.pid if self.proc else -1

    def start(self) -> QemuGuest:
        """Build (if needed) and start; the gdbstub accepts connections when this returns.

        Raises:
            QemuError: QEMU is not installed or exited at once.
            GuestBuildError: the bundled guest did not build.
        """
        binary = f"qemu-system-{self.arch}"
        if shutil.which(binary) is None:
            raise QemuError(f"{binary} is not installed (apt-get install qemu-system-x86)")
        if self.kernel is None and not self.bare:
            self.elf = build_guest(self.arch)
        listener = self._listen()
        args = [
            binary, "-display", "none", "-nodefaults", *(() if self.reboot else ("-no-reboot",)), "-accel", "tcg",
            "-m", self.memory, "-smp", str(self.smp),
            "-serial", f"file:{self.serial_log}",
            # nodelay: without it, QEMU's reply written as `+` then `$...` waits on TCP's delayed ack
            # (about 40 ms a packet over TCP; unix sockets do not care).
            "-chardev", f"socket,id=gdb0,fd={listener.fileno()},server=on,wait=off,nodelay=on",
            "-gdb", "chardev:gdb0",
        ]
        if not self.bare:
            args += ["-kernel", str(self.kernel or self.elf)]
        if self.stopped:
            args.append("-S")
        if self.append:
            args += ["-append", self.append]
        if self.initrd:
            args += ["-initrd", str(self.initrd)]
        if self.shared_ram:
            args += ["-object", f"memory-backend-memfd,id=probed-ram,size={self.memory},share=on",
                     "-machine", "memory-backend=probed-ram"]
        args += self.extra_args
        with open(self.workdir / "qemu.stderr", "wb") as stderr:
            self.proc = subprocess.Popen(
                args, pass_fds=(listener.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=stderr, preexec_fn=_die_with_parent,
            )
        # QEMU has its own copy of the socket now.
        listener.close()
        self._listener = None
        _LIVE.add(self)
        if self.proc.poll() is not None:
            raise QemuError(f"QEMU exited at once: {self.stderr()}")
        return self

    def kill(self) -> None:
        """SIGKILL QEMU and wait for it (the guest is gone; `restart()` starts a new one on the same socket)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> QemuGuest:
        """Kill QEMU (if it runs) and start a new one whose gdbstub listens at the same `target` (the same
        unix path or TCP port); the new gdbstub accepts connections when this returns."""
        self.kill()
        return self.start()

    def _listen(self) -> socket.socket:
        if self.gdb == "unix":
            path = self.workdir / "gdb.sock"
            if path.is_socket():
                path.unlink()  # left by a QEMU we killed (restart)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(str(path))
            self.target = f"unix:{path}"
        elif self.gdb == "tcp":
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            port = int(self.target.rsplit(":", 1)[1]) if self.target else 0  # restart: the same port
            sock.bind(("127.0.0.1", port))
            self.target = f"tcp:127.0.0.1:{sock.getsockname()[1]}"
        else:
            raise ValueError(f"gdb must be 'unix' or 'tcp', not {self.gdb!r}")
        sock.listen(4)
        sock.set_inheritable(True)
        self._listener = sock
        return sock

    def stderr(self) -> str:
        """What QEMU wrote to its stderr so far (stripped)."""
        try:
            return (self.workdir / "qemu.stderr").read_text(errors="replace").strip()
        except OSError:
            return ""

    def serial_output(self) -> str:
        """What the guest wrote to COM1 so far."""
        try:
            return self.serial_log.read_text(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        """Whether QEMU is running."""
        return self.proc is not None and self.proc.poll() is None

    def close(self) -> None:
        """Kill QEMU and remove the work directory (idempotent)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        _LIVE.discard(self)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> QemuGuest:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
