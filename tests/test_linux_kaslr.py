"""probed --linux on Debian's real kernel with KASLR on and two CPUs: the slide, symbols with and without a
file, the host's symbol cache, and probes on a module that comes and goes.

The guest (`linux_kaslr_guest`) dumps its own /proc/kallsyms at boot: every address probed finds is checked
against it. Its workload loads dummy.ko, reads /proc/net/dev 5 times and unloads it, over and over.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from probed.api import attach
from probed.errors import TargetError
from probed.guest.linux.kaslr import LINK_TEXT, KernelMismatch
from probed.guest.linux.kernel import KERNEL_FILE, LinuxKernel
from tests.linux.kallsyms import read_symbols
from tests.linux.probing import drain

pytestmark = [pytest.mark.linux, pytest.mark.time_limit(180)]

MODLOOP_READS = 5  # tests/linux/init.sh


def _dump(guest) -> list[tuple[int, str, str]]:
    return [(int(a, 16), kind, name) for a, kind, name, *_ in (line.split() for line in guest.kallsyms.read_text().splitlines())]


def _slide(guest) -> int:
    return read_symbols(guest.kallsyms)["_text"] - LINK_TEXT


async def test_symbols_from_guest_memory_equal_its_kallsyms_and_come_from_the_cache_next_time(linux_kaslr_guest, tmp_path):
    guest = linux_kaslr_guest
    assert _slide(guest) != 0  # KASLR is on (a zero slide has odds of 1 in 500 or so)
    dump = _dump(guest)
    expected = sorted((address, name) for address, kind, name in dump if kind in "tTwW")
    for source in ("guest kallsyms", "cache"):
        kernel = LinuxKernel(cache=tmp_path, modules=False)
        async with attach(guest.target, linux=kernel) as engine:
            assert kernel.source == source
            assert kernel.slide == _slide(guest) and kernel.text == read_symbols(guest.kallsyms)["_text"]
            assert engine.status()["kaslr_slide"] == f"{_slide(guest):#x}"
            kernel_file = engine.symbols.file(KERNEL_FILE)
            assert kernel_file.bias == _slide(guest)
            found = sorted((s.address, s.name) for s in kernel_file.symbols() if s.kind == "code")
            assert found == expected
            assert len(kernel_file) + len(kernel.percpu) == len(dump)


async def test_unslid_dump_is_rebased_by_the_slide_and_probes_fire(linux_kaslr_guest, linux_guest):
    # linux_guest booted the same kernel with nokaslr: its dump holds link addresses, as from another boot.
    kernel = LinuxKernel(cache=False, modules=False)
    async with attach(linux_kaslr_guest.target, symbols=[str(linux_guest.kallsyms)], linux=kernel) as engine:
        (sf,) = engine.symbols.files()
        assert sf.bias == kernel.slide == _slide(linux_kaslr_guest)
        assert kernel.source == "file" and any("__ksymtab" in line for line in kernel.evidence)
        live = read_symbols(linux_kaslr_guest.kallsyms)
        for name in ("do_sys_openat2", "vfs_read", "jiffies", "linux_banner"):
            assert engine.symbols.lookup(name).address == live[name]
        probe = await engine.add_probe("do_sys_openat2", pre=["filename=+0(%si):ustring"],
                                       condition='filename == "/etc/hostname"')
        with trio.fail_after(60), engine.hub.subscribe(probe.id) as sub:
            rec = await sub.receive()
        assert rec["pre"] == {"filename": "/etc/hostname"} and rec["where"] == "do_sys_openat2"
        assert rec["pc"] == f"{live['do_sys_openat2']:#x}"


async def test_a_file_of_this_boot_has_slide_zero_and_changes_nothing(linux_kaslr_guest):
    async with attach(linux_kaslr_guest.target, symbols=[str(linux_kaslr_guest.kallsyms)],
                      linux=LinuxKernel(cache=False, modules=False)) as engine:
        (sf,) = engine.symbols.files()
        assert sf.bias == 0
        assert engine.symbols.lookup("vfs_read").address == read_symbols(linux_kaslr_guest.kallsyms)["vfs_read"]


async def test_a_file_of_another_build_is_refused(linux_kaslr_guest, tmp_path):
    # Another build: the same names, but everything from .rodata on 0x1040 further (more code before it).
    other = tmp_path / "System.map-other"
    lines = []
    slide = _slide(linux_kaslr_guest)
    for address, kind, name in _dump(linux_kaslr_guest):
        moved = address - slide
        moved += 0x1040 if moved >= LINK_TEXT + 0x100_0000 else 0
        lines.append(f"{moved:016x} {kind} {name}\n")
    other.write_text("".join(lines))
    with pytest.raises(KernelMismatch, match="is not the running kernel: at its linux_banner"):
        async with attach(linux_kaslr_guest.target, symbols=[str(other)], linux=LinuxKernel(cache=False)):
            pass


async def test_an_export_list_is_checked_against_the_kernels_kallsyms(linux_kaslr_guest, tmp_path):
    # The exported symbols of the bzImage (link addresses, no linux_banner, no __start___ksymtab): the only
    # check left is the kernel's own table.
    exports = str(linux_kaslr_guest.system_map)
    kernel = LinuxKernel(cache=tmp_path, modules=False)
    async with attach(linux_kaslr_guest.target, symbols=[exports], linux=kernel) as engine:
        (sf,) = engine.symbols.files()
        assert sf.bias == kernel.slide == _slide(linux_kaslr_guest)
        assert len(kernel.evidence) == 1 and kernel.evidence[0].split(": ", 1)[1].startswith("kallsyms: ")
        assert engine.symbols.lookup("filp_open").address == read_symbols(linux_kaslr_guest.kallsyms)["filp_open"]


async def test_a_file_that_cannot_be_checked_is_refused(linux_kaslr_guest, tmp_path):
    bare = tmp_path / "System.map-bare"
    bare.write_text("ffffffff81000000 T _text\nffffffff81000100 T some_function\n")
    with pytest.raises(TargetError, match="only 1 names in common .* cannot check that it is the running kernel"):
        async with attach(linux_kaslr_guest.target, symbols=[str(bare)], linux=LinuxKernel(cache=tmp_path)):
            pass


async def test_module_probe_waits_is_set_taken_out_and_set_again(linux_kaslr_guest, tmp_path):
    kernel = LinuxKernel(cache=tmp_path)
    async with attach(linux_kaslr_guest.target, linux=kernel) as engine:
        tracker = kernel.modules
        probe = await engine.add_probe("dummy:dummy_get_stats64+0x0", pre=["dev=%di"])
        with trio.fail_after(120), engine.hub.subscribe(probe.id, maxsize=1000) as sub:
            # Start from an unload: the probe waits for its module.
            start = await tracker.wait_for("unload", "dummy", after=len(tracker.history))
            assert probe.state == "pending: module dummy unloaded"
            assert not engine.symbols.has_file("dummy")
            drain(sub)  # hits of the cycle we joined halfway
            cycles = []
            after = start + 1
            for _ in range(2):
                loaded = await tracker.wait_for("load", "dummy", after=after)
                assert probe.state == "enabled"
                address = engine.symbols.lookup("dummy_get_stats64", "dummy").address
                assert address == probe.address and address >= 0xFFFF_FFFF_C000_0000
                unloaded = await tracker.wait_for("unload", "dummy", after=loaded + 1)
                assert probe.state == "pending: module dummy unloaded"
                cycles.append(drain(sub))
                after = unloaded + 1
    for records in cycles:
        assert {r["where"] for r in records} == {"dummy_get_stats64"}
        # Each `cat /proc/net/dev` asks dummy0 for its stats once; registering and unregistering dummy0 each
        # send a netlink message with its stats too (rtmsg_ifinfo): both fall inside the probe's time.
        assert len(records) == MODLOOP_READS + 2, [r["seq"] for r in records]
        assert len({r["pre"]["dev"] for r in records}) == 1  # one net_device per load


async def test_pending_probe_on_a_module_that_never_loads_lists_as_pending(linux_kaslr_guest):
    async with attach(linux_kaslr_guest.target, linux=LinuxKernel(cache=False)) as engine:
        probe = await engine.add_probe("nosuchmod:some_function")
        assert probe.state == "pending: module nosuchmod not loaded"
        assert [p.info()["state"] for p in engine.probes()] == ["pending: module nosuchmod not loaded"]
        await engine.remove_probe(probe.id)
        assert engine.probes() == []


def test_kernel_cache_dir_default(monkeypatch, tmp_path):
    from probed.guest.linux.symcache import default_cache_dir

    monkeypatch.setenv("PROBED_CACHE", str(tmp_path))
    assert default_cache_dir() == Path(tmp_path) / "kallsyms"
