"""The Linux test guest itself: it boots Debian's kernel, its kallsyms dump is right, and GDB can stop it.

The builder's pure parts (cpio writer, dump decoder, symbol reader) are checked without QEMU.
"""

from __future__ import annotations

import gzip
import shutil
import subprocess

import pytest

from tests.linux.guest import LinuxGuest
from tests.linux.initramfs import newc_archive
from tests.linux.kallsyms import END_MARKER, KallsymsDumpError, decode_dump, read_symbols

KERNEL_TEXT = 0xFFFF_FFFF_8100_0000  # x86_64 link address of _text; with nokaslr the kernel runs there


# --- without QEMU ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio(1) is not installed")
def test_newc_archive_reads_back_with_cpio(tmp_path):
    archive = newc_archive([("etc", 0o040755, b""), ("etc/hostname", 0o100644, b"probed-guest\n"),
                            ("init", 0o100755, b"#!/bin/sh\n")])
    listing = subprocess.run(["cpio", "-itv", "--quiet"], input=archive, capture_output=True, check=True).stdout
    assert [line.split()[0] + " " + line.split()[-1] for line in listing.decode().splitlines()] == [
        "drwxr-xr-x etc", "-rw-r--r-- etc/hostname", "-rwxr-xr-x init"]
    subprocess.run(["cpio", "-id", "--quiet"], input=archive, cwd=tmp_path, check=True)
    assert (tmp_path / "etc" / "hostname").read_text() == "probed-guest\n"


def test_dump_decodes_only_once_the_marker_is_there():
    text = "ffffffff81000000 T _text\nffffffff82a079c0 D jiffies\n"
    stream = gzip.compress(text.encode())
    assert decode_dump(stream) is None
    assert decode_dump(stream + END_MARKER + b"\n") == text


def test_damaged_dump_is_an_error():
    stream = bytearray(gzip.compress(b"ffffffff81000000 T _text\n" * 100))
    stream[20] ^= 0xFF
    with pytest.raises(KallsymsDumpError, match="not a clean gzip stream|cut short"):
        decode_dump(bytes(stream) + END_MARKER + b"\n")


def test_global_definition_wins_over_static_namesakes(tmp_path):
    dump = tmp_path / "kallsyms"
    dump.write_text("ffffffff84083288 b acpi_gpe_count\nffffffff84083408 B acpi_gpe_count\n"
                    "ffffffff81000010 t helper\nffffffff81000020 t helper\nffffffffc0000000 t fn\t[mod]\n")
    assert read_symbols(dump) == {"acpi_gpe_count": 0xFFFFFFFF84083408, "helper": 0xFFFFFFFF81000010,
                                  "fn": 0xFFFFFFFFC0000000}


# --- the booted guest -----------------------------------------------------------------------------------------


@pytest.mark.linux
def test_guest_boots_into_its_workload(linux_guest):
    console = linux_guest.console_log.read_text()
    assert console.index("PROBED INIT") < console.index("WORKLOAD START")
    assert linux_guest.kernel_version == linux_guest.files.version
    assert linux_guest.kernel_version.startswith("6.1.0-") and linux_guest.kernel_version.endswith("-amd64")
    assert linux_guest.target.startswith("unix:")


@pytest.mark.linux
def test_kallsyms_dump_is_complete(linux_guest):
    lines = linux_guest.kallsyms.read_text().splitlines()
    assert len(lines) > 50_000
    kinds = {name: kind for _address, kind, name, *_ in (line.split() for line in lines)}
    assert (kinds["do_sys_openat2"], kinds["__x64_sys_openat"], kinds["__x64_sys_openat2"]) == ("t", "T", "T")
    assert kinds["jiffies"] == "D"
    symbols = read_symbols(linux_guest.kallsyms)
    assert symbols["_text"] == symbols["_stext"] == KERNEL_TEXT  # nokaslr: addresses are link addresses
    assert KERNEL_TEXT < symbols["do_sys_openat2"] < symbols["_etext"]


@pytest.mark.linux
def test_kallsyms_agrees_with_the_kernel_image(linux_guest):
    # The map is read from the bzImage's ELF (its export table), independently of the running kernel.
    exported = read_symbols(linux_guest.system_map)
    assert len(exported) > 10_000
    dumped = read_symbols(linux_guest.kallsyms)
    assert {name: dumped.get(name) for name in exported} == exported
    assert exported["jiffies"] == dumped["jiffies"] and exported["filp_open"] == dumped["filp_open"]


@pytest.mark.linux
def test_gdb_stops_the_kernel_in_do_sys_openat2(linux_guest):
    address = read_symbols(linux_guest.kallsyms)["do_sys_openat2"]
    socket_path = linux_guest.target.removeprefix("unix:")
    gdb = subprocess.run(
        ["gdb", "-batch", "-nx", "-ex", "set pagination off", "-ex", f"target remote {socket_path}",
         "-ex", f"break *{address:#x}", "-ex", "continue", "-ex", "info registers rip",
         "-ex", "delete", "-ex", "detach"],  # detach, not gdb's default kill: the session's guest lives on
        capture_output=True, text=True, timeout=60,
    )
    rip_lines = [line.split() for line in gdb.stdout.splitlines() if line.startswith("rip")]
    assert rip_lines and int(rip_lines[0][1], 16) == address, gdb.stdout + gdb.stderr
    assert "Breakpoint 1," in gdb.stdout


@pytest.mark.linux
def test_a_fresh_dump_equals_the_cached_one(linux_guest, tmp_path):
    # Reusing a cached dump is sound only if the same kernel file always dumps the same symbols (nokaslr).
    cached = linux_guest.kallsyms.read_text()
    with LinuxGuest(linux_guest.files, tmp_path, fresh_kallsyms=True) as fresh:
        assert not fresh.kallsyms_reused
        assert fresh.kallsyms == linux_guest.kallsyms  # the same cache file, rewritten by this boot
        assert fresh.kallsyms.read_text() == cached


def test_shell_channel_runs_commands_in_the_guest(linux_guest):
    assert linux_guest.shell("cat /etc/hostname") == "probed-guest\n"
    assert linux_guest.shell("/bin/utarget 2 && echo ran") == "ran\n"
    assert linux_guest.shell("cmp /bin/utarget /bin/ucopy && echo same") == "same\n"
