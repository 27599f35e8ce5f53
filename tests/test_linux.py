"""Probes on a real Linux kernel: Debian 12's x86_64 kernel under QEMU, symbols from its kallsyms dump."""

from __future__ import annotations

import pytest
import trio

from probed.api import attach

pytestmark = pytest.mark.linux


async def test_kallsyms_dump_is_complete(linux_guest):
    async with attach(linux_guest.target, symbols=[str(linux_guest.kallsyms)]) as engine:
        assert engine.arch.name == "x86_64"
        assert sum(len(f) for f in engine.symbols.files()) > 50_000
        openat2 = engine.symbols.lookup("do_sys_openat2")
        assert openat2.kind == "code" and openat2.address >= 0xFFFFFFFF81000000  # nokaslr: the default base
        assert engine.symbols.lookup("jiffies").kind == "data"
        assert [h["name"] for h in engine.hooks("do_sys_openat2")] == ["do_sys_openat2"]


async def test_open_probe_reads_filenames_from_user_memory(linux_guest):
    async with attach(linux_guest.target, symbols=[str(linux_guest.kallsyms)]) as engine:
        probe = await engine.add_probe(
            "do_sys_openat2", name="opens", pre=["dfd=%di:s32", "filename=+0(%si):ustring"],
            post=["ip=%ip:symbol"], condition='filename ~ "/etc/host*"',
        )
        with trio.fail_after(120):
            with engine.hub.subscribe(probe.id, maxsize=1000) as sub:
                records = [await sub.receive() for _ in range(3)]
    for rec in records:
        # busybox `cat /etc/hostname` opens it relative to the working directory: dfd is AT_FDCWD.
        assert rec["pre"] == {"dfd": -100, "filename": "/etc/hostname"}
        assert rec["where"] == "do_sys_openat2"
        assert rec["post"]["ip"].startswith("do_sys_openat2+0x")
        assert rec["error"] is None
    published = engine.hub.recent(probe.id)  # (the engine has detached: no hit is half done)
    # Every hit is either published or filtered out; and the filter did filter: between two `cat`s the loop
    # opens at least /dev/null (the redirections), /tmp/f (`echo x > /tmp/f`) and / (`ls /`), hits of
    # do_sys_openat2 that the filter drops.
    assert probe.hits == probe.filtered + len(published)
    assert all(rec in published for rec in records)
    seqs = [r["seq"] for r in published]
    assert all(b - a >= 3 for a, b in zip(seqs, seqs[1:], strict=False)), seqs


async def test_watch_jiffies_sees_the_timer(linux_guest):
    async with attach(linux_guest.target, symbols=[str(linux_guest.kallsyms)]) as engine:
        probe = await engine.add_watch("jiffies", length=8)
        with trio.fail_after(120):
            with engine.hub.subscribe(probe.id) as sub:
                got = [await sub.receive() for _ in range(3)]
    # The timer code moves jiffies forward (by the ticks that passed: more than one after an idle NOHZ
    # stretch), and every write is seen: each record's old value is the previous record's new one.
    for rec in got:
        assert rec["access"] == "write" and rec["new"] > rec["old"]
        assert rec["where"]  # the writing instruction is in a known kernel function
    assert got[1]["old"] == got[0]["new"] and got[2]["old"] == got[1]["new"]


async def test_return_probe_on_do_sys_openat2_sees_fds_and_enoent(linux_guest):
    await trio.to_thread.run_sync(linux_guest.shell, "echo probed > /tmp/retprobe-yes; rm -f /tmp/retprobe-no")
    async with attach(linux_guest.target, symbols=[str(linux_guest.kallsyms)]) as engine:
        # $arg2 is the filename pointer kept at the entry; it is read (user memory) at the return.
        probe = await engine.add_probe(
            "do_sys_openat2", name="opened", retprobe=True,
            pre=["dfd=$arg1:s32", "filename=+0($arg2):ustring", "fd=$retval:s64"],
            condition='filename ~ "/tmp/retprobe-*"',
        )
        with trio.fail_after(120):
            with engine.hub.subscribe(probe.id, maxsize=1000) as sub:
                out = await trio.to_thread.run_sync(linux_guest.shell, "cat /tmp/retprobe-yes; cat /tmp/retprobe-no || true")
                records = [await sub.receive() for _ in range(2)]
    assert out.startswith("probed\n") and "No such file" in out
    # busybox cat opens its file with fds 0, 1 and 2 taken (the shell channel's): the first free is 3.
    assert [r["pre"] for r in records] == [
        {"dfd": -100, "filename": "/tmp/retprobe-yes", "fd": 3},
        {"dfd": -100, "filename": "/tmp/retprobe-no", "fd": -2},  # -ENOENT
    ]
    func = engine.symbols.lookup("do_sys_openat2").address
    for r in records:
        assert r["kind"] == "return" and r["func"] == hex(func) and r["error"] is None
        assert r["where"] and not r["where"].startswith("do_sys_openat2")  # its caller, after the call
        assert r["duration_ns"] > 0
