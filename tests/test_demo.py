"""`make demo` does its job: QEMU, the daemon, two probes on one hook point, hits, a clean stop."""

from __future__ import annotations

import re
import subprocess
import sys


def test_the_demo_runs_and_stops_everything():
    out = subprocess.run([sys.executable, "-m", "probed.front.demo"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    hits = [line for line in out.stdout.splitlines() if line.startswith("#")]
    args = [line for line in hits if " args " in line]
    assert len(args) > 10
    # Each `args` record has the arguments the guest passed: b == 3a + 1.
    for line in args[:50]:
        a, b = (int(x) for x in re.search(r"a=(\d+) b=(\d+)", line).groups())
        assert b == 3 * a + 1
    assert "probed exited with 0" in out.stdout
