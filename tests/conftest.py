"""Fixtures: real QEMU guests (the bundled deterministic ones), stopped before their first instruction.

Every test body also runs under a time limit (`PROBED_TEST_TIME_LIMIT` seconds, default 120; a test may set
its own with `@pytest.mark.time_limit(seconds)`), so a hung guest fails one test instead of the run.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest
from hypothesis import settings

from probed.testing.qemu import QemuGuest
from tests.linux.conftest_linux import linux_guest, linux_kaslr_guest, own_linux_guest  # noqa: F401  (the Linux guests)

# Property tests are judged by their examples, not their speed: a per-example deadline only measures how
# busy the host is (CI shares 2 cores with QEMU guests).
settings.register_profile("probed", deadline=None)
settings.load_profile("probed")

DEFAULT_TIME_LIMIT = float(os.environ.get("PROBED_TEST_TIME_LIMIT", "120"))


class TestTimeLimitExceeded(Exception):
    """A test body ran past its time limit."""

    __test__ = False  # not a test class, despite the name


def _guest(arch: str, **kw) -> Iterator[QemuGuest]:
    guest = QemuGuest(arch, **kw)
    try:
        yield guest.start()
    finally:
        guest.close()


@pytest.fixture
def guest_i386() -> Iterator[QemuGuest]:
    """The i386 multiboot guest, one CPU, stopped (-S)."""
    yield from _guest("i386")


@pytest.fixture
def guest_x86_64() -> Iterator[QemuGuest]:
    """The x86_64 PVH guest, one CPU, stopped (-S)."""
    yield from _guest("x86_64")


@pytest.fixture
def guest_smp() -> Iterator[QemuGuest]:
    """The i386 guest with two CPUs, both calling probe_target, stopped (-S)."""
    yield from _guest("i386", smp=2)


@pytest.fixture(params=["i386", "x86_64"])
def guest(request) -> Iterator[QemuGuest]:
    """Each bundled guest in turn, one CPU, stopped (-S)."""
    yield from _guest(request.param)


def pytest_configure(config):
    config.addinivalue_line("markers", "time_limit(seconds): this test's time limit instead of the default")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    # Only the test body is timed (fixtures such as a Linux boot are not); SIGALRM interrupts the main
    # thread wherever it waits, so the test fails and its fixtures still stop their QEMU.
    marker = item.get_closest_marker("time_limit")
    limit = float(marker.args[0]) if marker else DEFAULT_TIME_LIMIT

    def expire(signum, frame):
        raise TestTimeLimitExceeded(f"{item.nodeid} ran longer than {limit:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
