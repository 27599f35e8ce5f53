"""A Linux guest that reboots under probed (Debian's real 6.1 kernel, KASLR on): the probes follow the kernel
to its new slide, in place (`reboot -f` in the guest, the gdbstub connection kept) and behind a reconnect
(QEMU killed and started again on the same socket).

The guest is this module's own (it reboots). Its workload runs /bin/probed-open over and over: the script
(comm "probed-open") opens itself, /etc/hostname, /dev/null and /nonexistent, in that order
(tests/linux/init.sh). Each boot dumps its own /proc/kallsyms: the slide and every address are checked
against it. A user probe on /bin/utarget-pie (tests/linux/uprogs/utarget.c: `utarget-pie 3` calls
utarget(i, i * i) for i = 1..3, at a random base) finds its file again in each new boot.
"""

from __future__ import annotations

import re

import pytest
import trio

from probed.api import attach
from probed.errors import TargetError
from probed.guest.linux.kaslr import LINK_TEXT
from probed.guest.linux.kernel import LinuxKernel
from probed.guest.linux.reboot import RESET_VECTOR
from probed.testing.qemu import CACHE
from tests.linux.conftest_linux import boot_linux_guest
from tests.linux.kallsyms import read_symbols
from tests.linux.probing import drain
from tests.linux.uprogs import uprog_path

pytestmark = [pytest.mark.linux, pytest.mark.time_limit(300)]

OPENED = ["/bin/probed-open", "/etc/hostname", "/dev/null", "/nonexistent"]
OPEN_ARGS = ["$comm", "$pid", "filename:ustring", "banner=@linux_banner:string"]
# Both placed, or (the likelier) the user probe waiting for its file: the kernel is placed once it schedules,
# before it unpacks the initramfs.
PLACED = r"(2 probe\(s\) re-placed|1 probe\(s\) re-placed, 1 waiting) \("
USER_ARGS = ["$comm", "$pid", "a=$arg1:s64", "b=$arg2:s64"]


@pytest.fixture(scope="module")
def rebooting_guest(tmp_path_factory):
    """A KASLR guest of this module's own that may reboot (QEMU without -no-reboot)."""
    yield from boot_linux_guest(tmp_path_factory, kaslr=True, reboot=True)


def _live(guest) -> dict[str, int]:
    return read_symbols(guest.kallsyms)


def test_a_boot_is_told_by_any_of_its_values():
    from probed.guest.linux.reboot import BootIdentity

    boot = BootIdentity(0xFFFF_FFFF_A000_0000, (0xFFFF_8880_0000_0000, 0xFFFF_C900_0000_0000, None), 0x1234)
    assert boot.same_boot(BootIdentity(boot.text, boot.bases[:2] + (0xFFFF_EA00_0000_0000,), None))  # unread
    assert not boot.same_boot(BootIdentity(boot.text + (2 << 20), boot.bases, boot.canary))  # another slide
    assert not boot.same_boot(BootIdentity(boot.text, (0xFFFF_9000_0000_0000, *boot.bases[1:]), boot.canary))
    assert not boot.same_boot(BootIdentity(boot.text, boot.bases, 0x5678))  # the same slide, another boot


async def _runs(sub, n: int, seen: list[dict], seconds: float = 120) -> list[list[dict]]:
    """`n` complete probed-open runs (seen from their first open), each its records in order; every record
    received goes to `seen`."""
    runs: dict[int, list[dict]] = {}
    done: list[list[dict]] = []
    with trio.fail_after(seconds):
        while len(done) < n:
            rec = await sub.receive()
            seen.append(rec)
            if rec["error"] is not None:
                continue
            pid = rec["pre"]["pid"]
            if pid in runs or rec["pre"]["filename"] == OPENED[0]:
                runs.setdefault(pid, []).append(rec)
                if len(runs[pid]) == len(OPENED):
                    done.append(runs[pid])
    return done


def _check_runs(runs: list[list[dict]], live: dict[str, int], banner: str) -> None:
    for recs in runs:
        pid = recs[0]["pre"]["pid"]
        assert [r["pre"] for r in recs] == [
            {"comm": "probed-open", "pid": pid, "filename": name, "banner": banner} for name in OPENED
        ]
        assert {r["pc"] for r in recs} == {f"{live['do_sys_openat2']:#x}"}


async def _placed_in(engine, guest, probe, old_slide: int, seconds: float = 120) -> int:
    """Wait until the engine has placed the probes in the guest's new boot; its slide (checked)."""
    live = _live(guest)
    slide = live["_text"] - LINK_TEXT
    with trio.fail_after(seconds):
        while engine.linux.slide != slide or engine.reboot.waiting or probe.pending:
            await trio.sleep(0.05)
    await engine.call_stopped(lambda: trio.sleep(0))  # a round trip: the breakpoints were set by then
    assert slide != old_slide  # KASLR picked another place (odds of the same: about 1 in 500)
    return slide


KERNEL_PLACES = ("do_sys_openat2", "do_init_module", "free_module", "uprobe_mmap", "uprobe_munmap", "uprobe_dup_mmap")


def _assert_nothing_stale(engine, live: dict[str, int], old: dict[str, int]) -> None:
    installed = {key[1] for key in engine.breakpoints.installed}
    assert installed == {live[name] for name in KERNEL_PLACES} | {RESET_VECTOR}  # no process maps utarget-pie
    assert not installed & {old[name] for name in KERNEL_PLACES}


async def _user_calls(engine, guest, user, sub) -> None:
    """`utarget-pie 3` in the guest: exactly its three calls, with their arguments."""
    out = await trio.to_thread.run_sync(guest.shell, "utarget-pie 3")
    with trio.fail_after(60):
        records = [await sub.receive() for _ in range(3)]
    await engine.call_stopped(lambda: trio.sleep(0))  # (a round trip: anything more would be published by now)
    with pytest.raises(trio.WouldBlock):
        sub.receive_nowait()
    pid = records[0]["pre"]["pid"]
    assert [r["pre"] for r in records] == [{"comm": "utarget-pie", "pid": pid, "a": i, "b": i * i} for i in (1, 2, 3)]
    assert {r["where"] for r in records} == {"/bin/utarget-pie:utarget"}, out
    assert user.state == "enabled"


async def test_reboot_in_place_and_qemu_restarted_probes_follow_the_kernel(rebooting_guest, tmp_path):
    guest = rebooting_guest
    first = _live(guest)
    # The first boot's /proc/kallsyms as the symbol file (its per-CPU `current_task` gives $comm): after each
    # reboot it is moved to the new slide and checked again against the new kernel.
    symbols = tmp_path / "kallsyms-first-boot"
    symbols.write_text(guest.kallsyms.read_text())
    async with attach(guest.target, symbols=[str(symbols)], linux=LinuxKernel()) as engine:
        probe = await engine.add_probe("do_sys_openat2", pre=OPEN_ARGS, condition='comm == "probed-open"')
        user = await engine.add_probe("/bin/utarget-pie:utarget", pre=USER_ARGS,
                                      file_copy=str(uprog_path(CACHE / "linux", "utarget-pie")))
        seen: list[dict] = []
        with engine.hub.subscribe(probe.id, maxsize=100_000) as sub, engine.hub.subscribe(user.id) as usub:
            await _user_calls(engine, guest, user, usub)
            before = await _runs(sub, 2, seen)
            banner = before[0][0]["pre"]["banner"]
            assert banner.startswith("Linux version ")
            _check_runs(before, first, banner)
            old_slide = engine.linux.slide
            assert old_slide == first["_text"] - LINK_TEXT

            # 1. `reboot -f` in the guest: the same connection, a new kernel at a new slide.
            await trio.to_thread.run_sync(guest.reboot)
            second = _live(guest)
            slide = await _placed_in(engine, guest, probe, old_slide)
            assert engine.status()["kaslr_slide"] == f"{slide:#x}"
            assert engine.status()["reconnects"] == 0 and engine.status()["reboots"] == 1
            assert re.search(f"kernel at new slide {slide:#x}; {PLACED}", engine.status()["reboot"])
            assert "reset in place" in engine.status()["reboot"]
            assert probe.address == second["do_sys_openat2"]
            _assert_nothing_stale(engine, second, first)
            after_reboot = await _runs(sub, 2, seen)
            _check_runs(after_reboot, second, banner)
            await _user_calls(engine, guest, user, usub)

            # 2. QEMU killed and started again on the same socket: a reconnect to another boot.
            guest.restart_qemu()  # (here: QEMU dies with the thread that started it)
            await trio.to_thread.run_sync(guest.wait_booted)
            third = _live(guest)
            slide3 = await _placed_in(engine, guest, probe, slide)
            status = engine.status()
            assert status["reconnects"] == 1 and status["reboots"] == 2
            assert re.search(f"kernel at new slide {slide3:#x}; {PLACED}", status["reboot"])
            assert probe.address == third["do_sys_openat2"]
            _assert_nothing_stale(engine, third, second)
            after_restart = await _runs(sub, 2, seen)
            _check_runs(after_restart, third, banner)
            await _user_calls(engine, guest, user, usub)
            seen += drain(sub)
            # 3. A reboot into another build (what the engine read of this build's banner made another's):
            # found as soon as the new kernel is mapped; the probes stay, unarmed, and status says why.
            engine.linux.banner = b"Linux version 6.1.0-other (someone@elsewhere) #1 SMP\0"
            guest.reboot(wait=False)
            with trio.fail_after(120):
                while engine.reboot.error is None:
                    await trio.sleep(0.05)
            await engine.call_stopped(lambda: trio.sleep(0))
            status = engine.status()
            assert status["reboot"].startswith("the guest reset in place (its CPU at the reset vector); probes kept "
                                               "but not armed: the new kernel is another build")
            assert status["reboots"] == 2 and not engine.reboot.waiting
            assert probe.state == user.state == "pending: the guest rebooted: waiting for its new kernel"
            assert set(engine.breakpoints.installed) == {("break", RESET_VECTOR, 0, "x")}
            assert [p.info()["state"] for p in engine.probes()] == [probe.state, user.state]
            # The symbols are the old build's: nothing more is placed by them.
            with pytest.raises(TargetError, match="the guest rebooted and its kernel is not placed: .*another build"):
                await engine.add_probe("vfs_read")
    # seq went on through both reboots (a hit the condition filtered out takes a seq too: hence the gaps).
    seqs = [r["seq"] for r in seen]
    assert all(a < b for a, b in zip(seqs, seqs[1:], strict=False))
    assert seqs[-1] <= probe.hits + user.hits
    assert probe.hits + user.hits == probe.filtered + engine.records and user.hits == 9
