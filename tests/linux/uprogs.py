"""User-space programs for the Linux guest: built on the host with gcc, put into the initramfs as /bin/*.

`utarget` (static, no PIE), `utarget-pie` (static-pie: the kernel maps it at a random base), and `ucopy`, the
very bytes of `utarget` under another name (another file: a probe on `utarget` must never fire in it).
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

__all__ = ["UPROGS_SOURCE", "build_uprogs"]

UPROGS_SOURCE = Path(__file__).parent / "uprogs" / "utarget.c"
_CFLAGS = ["-O1", "-g", "-fno-omit-frame-pointer", "-fcf-protection=none"]


def build_uprogs(cache: Path) -> dict[str, bytes]:
    """The programs by their guest name ("utarget", "utarget-pie", "ucopy"), built into `cache` when missing.

    Raises:
        subprocess.CalledProcessError: gcc failed (its output is in the exception).
    """
    source = UPROGS_SOURCE.read_bytes()
    tag = hashlib.sha256(source + repr(_CFLAGS).encode()).hexdigest()[:12]
    out = cache / f"uprogs-{tag}"
    variants = {"utarget": ["-static", "-no-pie"], "utarget-pie": ["-static-pie", "-fpie"]}
    for name, flags in variants.items():
        binary = out / name
        if not binary.exists():
            out.mkdir(parents=True, exist_ok=True)
            tmp = binary.with_suffix(".tmp")
            subprocess.run(["gcc", *_CFLAGS, *flags, "-o", str(tmp), str(UPROGS_SOURCE)], check=True,
                           capture_output=True, text=True)
            tmp.replace(binary)
    progs = {name: (out / name).read_bytes() for name in variants}
    progs["ucopy"] = progs["utarget"]
    return progs


def uprog_path(cache: Path, name: str) -> Path:
    """The host copy of a built program (the ELF file a user names for `PATH:SYMBOL` probes)."""
    build_uprogs(cache)
    tag = hashlib.sha256(UPROGS_SOURCE.read_bytes() + repr(_CFLAGS).encode()).hexdigest()[:12]
    return cache / f"uprogs-{tag}" / ("utarget" if name == "ucopy" else name)
