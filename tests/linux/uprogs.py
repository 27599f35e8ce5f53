"""User-space programs for the Linux guest: built on the host with gcc, put into the initramfs as /bin/*.

`utarget` (static, no PIE), `utarget-pie` (static-pie: the kernel maps it at a random base), `ucopy`, the
very bytes of `utarget` under another name (another file: a probe on `utarget` must never fire in it), and
`utarget32`, a static 32-bit (i386) program run as a compat process (uprogs/utarget32.c, freestanding: no
32-bit libc, so no gcc-multilib).
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

__all__ = ["UPROGS32_SOURCE", "UPROGS_SOURCE", "build_uprogs", "uprog_path"]

UPROGS_SOURCE = Path(__file__).parent / "uprogs" / "utarget.c"
UPROGS32_SOURCE = Path(__file__).parent / "uprogs" / "utarget32.c"
_CFLAGS = ["-O1", "-g", "-fno-omit-frame-pointer", "-fcf-protection=none"]
# No libc to link, nor any of its functions for gcc to call in place of a loop (strlen...).
_CFLAGS32 = ["-m32", "-static", "-no-pie", "-fno-pic", "-nostdlib", "-ffreestanding", "-fno-builtin",
             "-fno-stack-protector", "-fno-tree-loop-distribute-patterns"]


def _tag() -> str:
    sources = UPROGS_SOURCE.read_bytes() + UPROGS32_SOURCE.read_bytes()
    return hashlib.sha256(sources + repr((_CFLAGS, _CFLAGS32)).encode()).hexdigest()[:12]


def build_uprogs(cache: Path) -> dict[str, bytes]:
    """The programs by their guest name ("utarget", "utarget-pie", "ucopy", "utarget32"), built into `cache` when
    missing.

    Raises:
        subprocess.CalledProcessError: gcc failed (its output is in the exception).
    """
    out = cache / f"uprogs-{_tag()}"
    variants = {"utarget": (["-static", "-no-pie"], UPROGS_SOURCE),
                "utarget-pie": (["-static-pie", "-fpie"], UPROGS_SOURCE),
                "utarget32": (_CFLAGS32, UPROGS32_SOURCE)}
    for name, (flags, source) in variants.items():
        binary = out / name
        if not binary.exists():
            out.mkdir(parents=True, exist_ok=True)
            tmp = binary.with_suffix(".tmp")
            subprocess.run(["gcc", *_CFLAGS, *flags, "-o", str(tmp), str(source)], check=True,
                           capture_output=True, text=True)
            tmp.replace(binary)
    progs = {name: (out / name).read_bytes() for name in variants}
    progs["ucopy"] = progs["utarget"]
    return progs


def uprog_path(cache: Path, name: str) -> Path:
    """The host copy of a built program (the ELF file a user names for `PATH:SYMBOL` probes)."""
    build_uprogs(cache)
    return cache / f"uprogs-{_tag()}" / ("utarget" if name == "ucopy" else name)
