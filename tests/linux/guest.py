"""A real Linux guest for tests: Debian 12's x86_64 kernel and a busybox initramfs, fetched and cached.

The kernel and busybox come from Debian's packages (`apt-get download`), unpacked into `.cache/linux/`. The
initramfs's /init dumps /proc/kallsyms (gzipped) to the second serial port, then loops forever doing file
and process work, so tests can probe `do_sys_openat2` and see "/etc/hostname" go by.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from probed.qemu import CACHE, QemuGuest

LINUX_CACHE = CACHE / "linux"
HOSTNAME = "probed-guest"

INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo 0 > /proc/sys/kernel/kptr_restrict
stty -F /dev/ttyS1 raw -echo
gzip -c /proc/kallsyms > /dev/ttyS1
echo KALLSYMS DONE
echo WORKLOAD START
while true; do
    cat /etc/hostname > /dev/null
    echo x > /tmp/f
    ls / > /dev/null
    /bin/true
    usleep 20000
done
"""


class LinuxUnavailable(RuntimeError):
    """The kernel or busybox package cannot be had here."""


@dataclass(frozen=True)
class LinuxFiles:
    vmlinuz: Path
    system_map: Path
    initramfs: Path
    version: str


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def _kernel_package() -> str:
    out = _run(["apt-cache", "depends", "linux-image-amd64"])
    if out.returncode != 0 or "Depends:" not in out.stdout:
        if os.geteuid() == 0:
            _run(["apt-get", "update", "-qq"])
            out = _run(["apt-cache", "depends", "linux-image-amd64"])
    for line in out.stdout.splitlines():
        line = line.strip()
        if line.startswith("Depends: linux-image-"):
            return line.split()[1]
    raise LinuxUnavailable("apt-cache knows no linux-image-amd64 (no Debian package lists here)")


def fetch_linux() -> LinuxFiles:
    """The kernel, its System.map and the initramfs, downloaded and built once.

    Raises:
        LinuxUnavailable: the packages cannot be downloaded.
    """
    LINUX_CACHE.mkdir(parents=True, exist_ok=True)
    stamp = LINUX_CACHE / "version"
    if not stamp.exists():
        package = _kernel_package()
        work = LINUX_CACHE / "download"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        out = _run(["apt-get", "download", package, "busybox-static"], cwd=work)
        debs = sorted(work.glob("*.deb"))
        if out.returncode != 0 or len(debs) != 2:
            raise LinuxUnavailable(f"apt-get download {package} busybox-static failed: {out.stderr.strip()[-300:]}")
        kernel_deb = next(d for d in debs if d.name.startswith("linux-image"))
        busybox_deb = next(d for d in debs if d.name.startswith("busybox"))
        tar = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(kernel_deb)], stdout=subprocess.PIPE)
        subprocess.run(["tar", "-x", "-C", str(LINUX_CACHE), "./boot"], stdin=tar.stdout, check=True)
        tar.wait()
        subprocess.run(["dpkg-deb", "-x", str(busybox_deb), str(LINUX_CACHE / "busybox")], check=True)
        shutil.rmtree(work)
        stamp.write_text(package.removeprefix("linux-image-"))
    version = stamp.read_text().strip()
    initramfs = LINUX_CACHE / "initramfs.cpio"
    if not initramfs.exists():
        build_initramfs(LINUX_CACHE / "busybox" / "bin" / "busybox", initramfs)
    return LinuxFiles(
        LINUX_CACHE / "boot" / f"vmlinuz-{version}", LINUX_CACHE / "boot" / f"System.map-{version}", initramfs, version
    )


def build_initramfs(busybox: Path, out: Path) -> None:
    """A newc cpio archive with busybox, /init and /etc/hostname."""
    entries: list[tuple[str, int, bytes]] = []
    for d in ("bin", "sbin", "etc", "proc", "sys", "dev", "tmp", "usr", "usr/bin", "usr/sbin"):
        entries.append((d, 0o040755, b""))
    entries.append(("bin/busybox", 0o100755, busybox.read_bytes()))
    entries.append(("init", 0o100755, INIT.encode()))
    entries.append(("etc/hostname", 0o100644, HOSTNAME.encode() + b"\n"))
    buf = io.BytesIO()
    for ino, (name, mode, data) in enumerate(entries + [("TRAILER!!!", 0, b"")], start=1):
        encoded = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1 if mode & 0o100000 else 2, 0, len(data), 0, 0, 0, 0, len(encoded), 0]
        buf.write(b"070701" + b"".join(b"%08x" % f for f in fields) + encoded)
        buf.write(b"\0" * (-buf.tell() % 4))
        buf.write(data)
        buf.write(b"\0" * (-buf.tell() % 4))
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(out)


class LinuxGuest:
    """A booted Linux guest: its gdbstub target, and the kallsyms dump it wrote."""

    def __init__(self, files: LinuxFiles, workdir: Path):
        self.files = files
        self.kallsyms = workdir / "kallsyms"
        self._raw = workdir / "kallsyms.gz"
        self.qemu = QemuGuest(
            "x86_64", kernel=files.vmlinuz, initrd=files.initramfs, memory="512M", stopped=False,
            append="console=ttyS0 nokaslr panic=-1 rdinit=/init",
            extra_args=["-serial", f"file:{self._raw}"],
        )
        self.boot_seconds = 0.0

    @property
    def target(self) -> str:
        return self.qemu.target

    @property
    def console_log(self) -> Path:
        return self.qemu.serial_log

    def start(self, deadline_s: float = 180) -> LinuxGuest:
        t0 = time.monotonic()
        self.qemu.start()
        # Poll the console for the guest's markers under a deadline (what the guest prints is the signal).
        while "WORKLOAD START" not in self.qemu.serial_output():
            if not self.qemu.alive():
                raise RuntimeError(f"QEMU exited while booting Linux: {self.qemu.stderr()}")
            if time.monotonic() - t0 > deadline_s:
                raise TimeoutError("Linux did not reach its workload in time:\n" + self.qemu.serial_output()[-2000:])
            time.sleep(0.2)
        self.boot_seconds = time.monotonic() - t0
        self.kallsyms.write_bytes(gzip.decompress(self._raw.read_bytes()))
        return self

    def close(self) -> None:
        self.qemu.close()
