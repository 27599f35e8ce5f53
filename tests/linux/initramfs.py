"""The test initramfs: busybox, tests/linux/init.sh as /init and a known /etc/hostname, as a newc cpio archive.

The archive is written here rather than with cpio(1) so its bytes depend only on its inputs (no mtimes, no
host uids): the cache name carries a hash of those inputs and a changed init.sh rebuilds it.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

__all__ = ["INIT_SCRIPT", "HOSTNAME", "build_initramfs", "newc_archive"]

INIT_SCRIPT = Path(__file__).with_name("init.sh")
HOSTNAME = "probed-guest"

_DIRS = ("bin", "sbin", "etc", "proc", "sys", "dev", "tmp", "usr", "usr/bin", "usr/sbin")
_DIR, _FILE = 0o040755, 0o100755
_NEWC_MAGIC = b"070701"


def newc_archive(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A cpio archive in the kernel's "newc" format (see the kernel's Documentation/driver-api/early-userspace).

    Args:
        entries: (path without leading "/", st_mode, file contents) in archive order; parents first.

    Returns:
        The archive, trailer included.
    """
    out = bytearray()
    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        encoded = name.encode() + b"\0"
        nlink = 2 if mode & 0o170000 == 0o040000 else 1
        # ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
        fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
        out += _NEWC_MAGIC + b"".join(b"%08x" % f for f in fields) + encoded
        out += b"\0" * (-len(out) % 4)  # header+name, then the data, each padded to 4 bytes
        out += data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


def build_initramfs(busybox: Path, cache: Path, programs: dict[str, bytes] | None = None,
                    modules: list[Path] = ()) -> Path:
    """The initramfs for this busybox and the current init.sh, built into `cache` if not there yet.

    Args:
        busybox: a static busybox binary.
        cache: directory for `initramfs-<hash>.cpio`; ones unused for a day are removed (not sooner: other
            checkouts sharing the cache may be booting theirs).
        programs: more executables for /bin, by name.
        modules: kernel modules to carry as /lib/modules/NAME.ko (for the workload's insmod).

    Returns:
        The archive's path.
    """
    busybox_bytes, init = busybox.read_bytes(), INIT_SCRIPT.read_bytes()
    entries = [(d, _DIR, b"") for d in _DIRS]
    entries += [("bin/busybox", _FILE, busybox_bytes), ("init", _FILE, init),
                ("etc/hostname", 0o100644, HOSTNAME.encode() + b"\n")]
    entries += [(f"bin/{name}", _FILE, data) for name, data in sorted((programs or {}).items())]
    if modules:
        entries += [("lib", _DIR, b""), ("lib/modules", _DIR, b"")]
        entries += [(f"lib/modules/{m.name}", 0o100644, m.read_bytes()) for m in modules]
    digest = hashlib.sha256(repr([(n, m, hashlib.sha256(d).hexdigest()) for n, m, d in entries]).encode())
    out = cache / f"initramfs-{digest.hexdigest()[:12]}.cpio"
    if not out.exists():
        for stale in cache.glob("initramfs*.cpio"):
            if time.time() - stale.stat().st_atime > 86400:
                stale.unlink(missing_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_bytes(newc_archive(entries))
        tmp.replace(out)
    return out
