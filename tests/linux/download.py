"""Debian 12's x86_64 kernel and busybox-static, downloaded with apt once and unpacked into a cache directory.

`linux-image-amd64` is a metapackage; the kernel itself is the `linux-image-6.1.0-N-amd64` it depends on.
A manifest written last (`packages.json`) marks a complete download, so an interrupted one is redone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["PackagesUnavailable", "DebianPackages", "fetch_module", "fetch_packages"]

METAPACKAGE = "linux-image-amd64"
BUSYBOX = "busybox-static"


class PackagesUnavailable(RuntimeError):
    """The kernel or busybox package cannot be had here (no apt, no package lists, no network)."""


@dataclass(frozen=True)
class DebianPackages:
    """What was downloaded, and where it was unpacked.

    Attributes:
        kernel_release: the kernel's `uname -r`, e.g. "6.1.0-56-amd64".
        kernel_package_version: the Debian version of the kernel package, e.g. "6.1.192-2".
        kernel_deb_bytes: size of the kernel .deb as downloaded.
        busybox_deb_bytes: size of the busybox-static .deb as downloaded.
    """

    kernel_release: str
    kernel_package_version: str
    kernel_deb_bytes: int
    busybox_deb_bytes: int

    def vmlinuz(self, cache: Path) -> Path:
        return cache / "boot" / f"vmlinuz-{self.kernel_release}"

    def system_map(self, cache: Path) -> Path:
        return cache / "boot" / f"System.map-{self.kernel_release}"

    def busybox(self, cache: Path) -> Path:
        return cache / "busybox" / "bin" / "busybox"


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    except FileNotFoundError as exc:
        raise PackagesUnavailable(f"{cmd[0]} is not installed: this needs a Debian-like host with apt") from exc


def _kernel_package() -> str:
    """The versioned kernel package the metapackage depends on (apt-get update first if apt knows nothing)."""
    out = _run(["apt-cache", "depends", METAPACKAGE])
    if "Depends: linux-image-" not in out.stdout and os.geteuid() == 0:
        _run(["apt-get", "update", "-qq"])
        out = _run(["apt-cache", "depends", METAPACKAGE])
    for line in out.stdout.splitlines():
        kind, _, name = line.strip().partition(" ")
        if kind == "Depends:" and name.startswith("linux-image-"):
            return name
    raise PackagesUnavailable(f"apt-cache knows no {METAPACKAGE} (no Debian package lists?): {out.stderr.strip()}")


def _unpack(deb: Path, dest: Path, only: str | None = None) -> None:
    """`dpkg-deb -x`, or with `only`, just that directory of the package's file tree."""
    dest.mkdir(parents=True, exist_ok=True)
    if only is None:
        done = _run(["dpkg-deb", "-x", str(deb), str(dest)])
    else:
        tree = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
        done = subprocess.run(["tar", "-x", "-C", str(dest), only], stdin=tree.stdout, capture_output=True, text=True)
        tree.stdout.close()
        tree.wait()
    if done.returncode != 0:
        raise PackagesUnavailable(f"unpacking {deb.name} failed: {done.stderr.strip()}")


def fetch_packages(cache: Path) -> DebianPackages:
    """Download and unpack the kernel package's /boot and busybox-static into `cache`, once.

    Args:
        cache: the directory to fill (created if missing): `boot/` and `busybox/` end up in it.

    Returns:
        What was fetched (read back from the manifest on later calls).

    Raises:
        PackagesUnavailable: apt cannot resolve or download the packages.
    """
    manifest = cache / "packages.json"
    if manifest.exists():
        return DebianPackages(**json.loads(manifest.read_text()))
    package = _kernel_package()
    work = cache / "download"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out = _run(["apt-get", "download", package, BUSYBOX], cwd=work)
    kernel_debs, busybox_debs = sorted(work.glob("linux-image-*.deb")), sorted(work.glob("busybox-static_*.deb"))
    if out.returncode != 0 or len(kernel_debs) != 1 or len(busybox_debs) != 1:
        raise PackagesUnavailable(f"apt-get download {package} {BUSYBOX} failed: {out.stderr.strip()[-400:]}")
    _unpack(kernel_debs[0], cache, only="./boot")  # the 300+ MB of modules are not needed
    _unpack(busybox_debs[0], cache / "busybox")
    version = _run(["dpkg-deb", "-f", str(kernel_debs[0]), "Version"]).stdout.strip()
    fetched = DebianPackages(
        kernel_release=package.removeprefix("linux-image-"),
        kernel_package_version=version,
        kernel_deb_bytes=kernel_debs[0].stat().st_size,
        busybox_deb_bytes=busybox_debs[0].stat().st_size,
    )
    shutil.rmtree(work)
    manifest.write_text(json.dumps(asdict(fetched), indent=1) + "\n")
    return fetched


def fetch_module(cache: Path, packages: DebianPackages, relative: str) -> Path:
    """One module of the kernel package (e.g. "kernel/drivers/net/dummy.ko"), unpacked into `cache` once.

    The first fetch_packages() keeps only /boot; a module is taken from the same kernel package (same
    Debian version, so its vermagic matches the kernel) when first asked for.

    Returns:
        The .ko's path under `cache/modules/`.

    Raises:
        PackagesUnavailable: apt cannot download the package, or the module is not in it.
    """
    inside = f"./lib/modules/{packages.kernel_release}/{relative}"
    out = cache / "modules" / Path(relative).name
    if out.exists():
        return out
    work = cache / f"download-module-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        package = f"linux-image-{packages.kernel_release}={packages.kernel_package_version}"
        got = _run(["apt-get", "download", package], cwd=work)
        debs = sorted(work.glob("linux-image-*.deb"))
        if got.returncode != 0 or len(debs) != 1:
            raise PackagesUnavailable(f"apt-get download {package} failed: {got.stderr.strip()[-400:]}")
        _unpack(debs[0], work / "tree", only=inside)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        shutil.copyfile(work / "tree" / inside, tmp)
        tmp.replace(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out
