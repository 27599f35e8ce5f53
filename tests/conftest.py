"""Fixtures: real QEMU guests (the bundled deterministic ones), stopped before their first instruction."""

from __future__ import annotations

import pytest

from probed.qemu import QemuGuest


def _guest(arch: str, **kw):
    guest = QemuGuest(arch, **kw).start()
    try:
        yield guest
    finally:
        guest.close()


@pytest.fixture
def guest_i386():
    """The i386 multiboot guest, one CPU, stopped (-S)."""
    yield from _guest("i386")


@pytest.fixture
def guest_x86_64():
    """The x86_64 PVH guest, one CPU, stopped (-S)."""
    yield from _guest("x86_64")


@pytest.fixture
def guest_smp():
    """The i386 guest with two CPUs, both calling probe_target."""
    yield from _guest("i386", smp=2)


@pytest.fixture(params=["i386", "x86_64"])
def guest(request):
    """Each bundled guest in turn."""
    yield from _guest(request.param)


def pytest_configure(config):
    # tests/linux/ holds the Linux guest builder; make it importable as `linux`.
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
