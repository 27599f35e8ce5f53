"""Time from `probed --linux` starting to its first armed probe, on Debian's kernel with KASLR under TCG.

One guest (tests/linux: Debian 12's kernel, KASLR on, 2 CPUs) serves every run. Each round starts the daemon
four ways, one after the other, and times from spawning it to `add do_sys_openat2` answered over the control
socket (the probe is then set in QEMU):

- baseline: `--symbols DUMP` of this boot's /proc/kallsyms (the file already has the right addresses; a
  kernel's file implies --linux, which finds a slide of 0 relative to it);
- file: `--linux --symbols DUMP-nokaslr` (a file from another boot: the slide is found and checked);
- first: `--linux`, no file, an empty cache (the kernel's kallsyms tables read from guest memory);
- cached: `--linux`, no file, the cache the first run wrote.

Printed: the median of each and its ratio to the baseline.

    python bench/linux_attach.py [--rounds N]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from probed.front.cli import Client  # noqa: E402
from tests.linux.guest import LinuxGuest, fetch_linux  # noqa: E402


def attach_seconds(target: str, workdir: Path, *extra: str) -> tuple[float, float | None]:
    """(seconds from spawning probed to the probe armed, seconds its Linux setup took as it logged them)."""
    control = workdir / "control.sock"
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "probed.front.daemon", "--target", target, "--control",
                             str(control), *extra], stderr=subprocess.PIPE, text=True)
    try:
        log = []
        setup = None
        for line in proc.stderr:
            log.append(line)
            if "linux: _text at" in line:
                setup = float(line.rsplit(" in ", 1)[1].split()[0])
            if "ready" in line:
                break
        else:
            raise RuntimeError("probed did not start:\n" + "".join(log))
        client = Client(control)
        try:
            client.call("add", {"spec": "do_sys_openat2"})
        finally:
            client.close()
        return time.monotonic() - started, setup
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stderr.close()


def unslid(dump: Path, out: Path) -> Path:
    """This boot's dump moved back to link addresses, as a nokaslr boot dumps it (per-cpu symbols stay)."""
    lines = dump.read_text().splitlines()
    text = next(int(line.split()[0], 16) for line in lines if line.endswith(" _text"))
    slide = text - 0xFFFF_FFFF_8100_0000
    moved = []
    for line in lines:
        address, rest = line.split(" ", 1)
        value = int(address, 16)
        moved.append(f"{value - slide if value >= text else value:016x} {rest}")
    out.write_text("\n".join(moved) + "\n")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="probed-bench-linux-"))
    guest = LinuxGuest(fetch_linux(), work, kaslr=True, smp=2).start()
    try:
        other_boot = unslid(guest.kallsyms, work / "kallsyms-nokaslr.txt")
        times: dict[str, list[float]] = {"baseline": [], "file": [], "first": [], "cached": []}
        setups: dict[str, list[float]] = {name: [] for name in times}
        for _ in range(args.rounds):
            cache = work / "cache"
            shutil.rmtree(cache, ignore_errors=True)
            runs = {
                # The best case with a file: this boot's own dump (a kernel's file implies --linux: the
                # slide relative to it is 0, checked).
                "baseline": ("--symbols", str(guest.kallsyms)),
                "file": ("--linux", "--no-kallsyms-cache", "--symbols", str(other_boot)),
                "first": ("--linux", "--kallsyms-cache", str(cache)),
                "cached": ("--linux", "--kallsyms-cache", str(cache)),
            }
            for name, extra in runs.items():
                total, setup = attach_seconds(guest.target, work, *extra)
                times[name].append(total)
                if setup is not None:
                    setups[name].append(setup)
        base = statistics.median(times["baseline"])
        print(f"probed start -> first probe armed, Debian {guest.kernel_version}, KASLR, 2 vCPUs, TCG, "
              f"median of {args.rounds}")
        for name, values in times.items():
            med = statistics.median(values)
            inside = f"  linux setup in the daemon {statistics.median(setups[name]):.2f} s" if setups[name] else ""
            print(f"  {name:9s} {med:6.2f} s  (x{med / base:.2f} of baseline)  runs: "
                  + " ".join(f"{v:.2f}" for v in values) + inside)
    finally:
        guest.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
