"""Every example in docs/ runs: probectl lines against a daemon, Python blocks against a guest."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import trio

from probed.front.daemon import build_parser
from tests.daemon import Daemon

DOCS = Path(__file__).resolve().parent.parent / "docs"
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.M | re.S)


def blocks(kind: str, tag: str | None = None) -> list[tuple[str, str]]:
    out = []
    for doc in sorted(DOCS.glob("*.md")):
        for info, body in FENCE.findall(doc.read_text()):
            words = info.split()
            if words and words[0] == kind and (tag is None or tag in words[1:]):
                out.append((doc.name, body))
    return out


def probectl_lines(tag: str) -> list[tuple[str, list[str]]]:
    return [(name, shlex.split(line)[1:]) for name, body in blocks("probectl", tag) for line in body.splitlines()
            if line.startswith("probectl ")]


def kprobe_events_files() -> list[tuple[str, str]]:
    """(file name, text) of each ```kprobe_events FILENAME block."""
    out = []
    for doc in sorted(DOCS.glob("*.md")):
        for info, body in FENCE.findall(doc.read_text()):
            words = info.split()
            if words and words[0] == "kprobe_events":
                out.append((words[1], body))
    return out


def test_the_docs_have_examples():
    assert len(probectl_lines("guest")) >= 8 and len(probectl_lines("linux")) >= 5 and blocks("python")


def run_examples(guest, tmp_path, tag: str, *daemon_args: str) -> None:
    """Each `probectl` line of the docs' blocks tagged `tag`, against a daemon on `guest`: all exit 0.

    They run in a directory holding the docs' `kprobe_events FILENAME` blocks as files (for `probectl load`).
    """
    files = tmp_path / "files"
    files.mkdir(exist_ok=True)
    for info, body in kprobe_events_files():
        (files / info).write_text(body)
    daemon = Daemon(guest, tmp_path, *daemon_args)
    try:
        for doc, args in probectl_lines(tag):
            out = daemon.ctl(*args, check=None, cwd=files)
            assert out.returncode == 0, f"{doc}: probectl {' '.join(args)}: {out.stderr}"
    finally:
        code = daemon.stop()  # (an assert here would hide the failure that brought us here)
    assert code == 0, daemon.stderr()


def test_probectl_examples_on_the_test_guest(guest_i386, tmp_path):
    run_examples(guest_i386, tmp_path, "guest")


def test_probectl_examples_on_linux(linux_guest, tmp_path):
    class Kernel:  # what Daemon needs: the target and the symbol file
        target = linux_guest.target
        elf = linux_guest.kallsyms

    run_examples(Kernel, tmp_path, "linux")


def test_probectl_examples_on_linux_with_kaslr_and_no_symbol_file(linux_kaslr_guest, tmp_path):
    class Kernel:  # `probed --linux` with no symbol file: the kernel's own kallsyms
        target = linux_kaslr_guest.target
        elf = None

    assert len(probectl_lines("linux-kaslr")) >= 6
    run_examples(Kernel, tmp_path, "linux-kaslr", "--linux", "--kallsyms-cache", str(tmp_path / "kallsyms"))


def test_probectl_examples_of_user_probes(linux_guest, tmp_path, monkeypatch):
    """docs/uprobes.md: a daemon with --sysroot guest-files (host copies at the guest's paths), run from
    the directory that holds it, as the page shows."""
    from probed.testing.qemu import CACHE
    from tests.linux.uprogs import uprog_path

    (tmp_path / "guest-files" / "bin").mkdir(parents=True)
    for name in ("utarget", "utarget-pie", "ucopy", "utarget32"):
        (tmp_path / "guest-files" / "bin" / name).symlink_to(uprog_path(CACHE / "linux", name))
    # probectl runs in files/ (run_examples), the daemon here: both see guest-files/ as the page shows.
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "guest-files").symlink_to(tmp_path / "guest-files")
    monkeypatch.chdir(tmp_path)
    assert len(probectl_lines("uprobes")) >= 5

    class Kernel:
        target = linux_guest.target
        elf = linux_guest.kallsyms

    run_examples(Kernel, tmp_path, "uprobes", "--sysroot", "guest-files")


def test_python_examples(guest_i386):
    for doc, body in blocks("python"):
        scope: dict = {}
        exec(compile(body, doc, "exec"), scope)
        records = trio.run(scope["main"], guest_i386.target, str(guest_i386.elf))
        assert records, doc
        # The example's two probes share one hook point; the filtered one reports from a == 3 on.
        first = next(r for r in records if r["name"] == "probe_target")
        assert first["pre"] == {"name": "beta", "cpu": 0}
        assert first["post"]["where"] == "probe_target+0x1"
        assert [r["pre"]["a"] for r in records if r["name"] != "probe_target"] == [3, 4, 5][: len(records) - 3]


def test_record_example_has_the_fields_of_a_real_record(guest_i386):
    (doc, body), = blocks("json")
    example = json.loads(body)

    async def one():
        from probed.api import attach

        async with attach(guest_i386.target, symbols=[str(guest_i386.elf)]) as engine:
            probe = await engine.add_probe("probe_target", pre=["a=$arg1"])
            with engine.hub.subscribe(probe.id) as sub:
                return await sub.receive()

    assert set(example) == set(trio.run(one))


def test_probed_command_lines_in_the_docs_parse():
    lines = [line for _, body in blocks("sh") for line in body.splitlines() if line.startswith("probed ")]
    assert lines
    for line in lines:
        build_parser().parse_args(shlex.split(line)[1:])


def test_the_state_table_in_the_docs_is_the_codes():
    from probed.engine.state import TRANSITIONS, Event

    text = (DOCS / "architecture.md").read_text()
    section = text.split("## Who holds the guest", 1)[1].split("\n## ", 1)[0]
    rows = {tuple(cell.strip() for cell in line.strip("|").split("|")) for line in section.splitlines()
            if line.startswith("| ") and not line.startswith("| state") and not line.startswith("| ---")}
    code = {(state.name, event.value, new.name) for state, moves in TRANSITIONS.items()
            for event, new in moves.items() if event not in (Event.LOST, Event.DETACHED)}
    assert rows == code


def test_probectl_lines_mean_the_same_to_bash():
    """A line pasted into bash gets the words the docs test runs (no unquoted `(` or `$arg1`)."""
    lines = [line for _, body in blocks("probectl") for line in body.splitlines() if line.startswith("probectl ")]
    assert lines
    for line in lines:
        script = "printf '%s\\n' " + line.removeprefix("probectl ")
        out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
        assert out.returncode == 0, f"{line}: {out.stderr}"
        assert out.stdout.splitlines() == shlex.split(line)[1:], line
