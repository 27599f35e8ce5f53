"""The `linux_guest` fixture: one booted Debian kernel per test session (booting costs seconds).

Wired in tests/conftest.py with `from tests.linux.conftest_linux import linux_guest` (tests/ is a package).
"""

from __future__ import annotations

import pytest

from .guest import LinuxGuest, LinuxUnavailable, fetch_linux


def boot_linux_guest(tmp_path_factory, **options):
    """Boot a Linux guest (nokaslr unless `kaslr=True`; `options` as LinuxGuest's: `cmdline="pti=on"`, `cpu`...)
    for a fixture; skips where the Debian packages cannot be had."""
    try:
        files = fetch_linux()
    except LinuxUnavailable as exc:
        pytest.skip(f"no Debian kernel for the Linux guest: {exc}")
    guest = LinuxGuest(files, tmp_path_factory.mktemp("linux-guest"), **options).start()
    try:
        yield guest
    finally:
        guest.close()


@pytest.fixture(scope="session")
def linux_guest(tmp_path_factory):
    """A running Linux guest (nokaslr) doing its workload: `.target`, `.kallsyms`, `.system_map`,
    `.console_log`, `.kernel_version`. Skips if the Debian packages cannot be had; QEMU is killed at teardown.
    """
    yield from boot_linux_guest(tmp_path_factory)


@pytest.fixture(scope="module")
def own_linux_guest(tmp_path_factory):
    """A Linux guest of this test module's own: for tests whose exact counts would see processes or
    mappings that other modules' tests left in the session's guest."""
    yield from boot_linux_guest(tmp_path_factory)


@pytest.fixture(scope="session")
def linux_kaslr_guest(tmp_path_factory):
    """A running Linux guest with KASLR on (no `nokaslr`) and two CPUs, its workload plus the module loop
    (dummy.ko loaded, /proc/net/dev read 5 times, unloaded, over and over). `.kallsyms` is this boot's
    own /proc/kallsyms. Skips if the Debian packages cannot be had; QEMU is killed at teardown.
    """
    try:
        files = fetch_linux()
    except LinuxUnavailable as exc:
        pytest.skip(f"no Debian kernel for the Linux guest: {exc}")
    guest = LinuxGuest(files, tmp_path_factory.mktemp("linux-kaslr-guest"), kaslr=True, smp=2,
                       module_loop=True).start()
    try:
        yield guest
    finally:
        guest.close()
