"""`probed --metrics` scraped over HTTP, and `probectl top` in a real terminal (tmux), on the test guest."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.daemon import Daemon


def _scrape(url: str) -> dict[str, dict[tuple, float]]:
    text = urllib.request.urlopen(url, timeout=30).read().decode()
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def test_metrics_scraped(guest_i386, tmp_path):
    d = Daemon(guest_i386, tmp_path, "--stopped", "--metrics", "tcp:127.0.0.1:0")
    try:
        (url,) = [m.group(1) for line in d.log if (m := re.search(r"serving metrics on (http://\S+)", line))]
        before = _scrape(url)
        assert before["probed_target_connected"] == {(): 1.0}
        assert before["probed_target_state"] == {(("state", "stopped"),): 1.0}
        assert before["probed_debug_register_slots"] == {(("use", "free"),): 4.0, (("use", "held"),): 0.0}
        d.ctl("add", "-n", "pt", "probe_target", "a=$arg1:s32", "--if", "a <= 5")
        d.ctl("resume")
        assert len(d.ctl("events", "--probe", "pt", "--count", "5", "--json").stdout.splitlines()) == 5
        m = _scrape(url)
        key = (("name", "pt"), ("probe", "1"))
        hits, filtered = m["probed_probe_hits_total"][key], m["probed_probe_filtered_total"][key]
        # One scrape is one snapshot: every hit was reported (exactly 5), filtered out, or is the one hit of
        # this single-CPU guest between its count and its filter (a scrape may fall while it is stepped).
        assert hits - filtered - 5 in (0, 1) and hits >= 5
        assert m["probed_probe_missed_total"][key] == 0 and m["probed_probe_faults_total"][key] == 0
        assert m["probed_records_total"][()] == 5 and m["probed_stops_total"][()] >= hits
        assert m["probed_hit_latency_seconds_count"][()] == 5  # one per reported hit (each its own stop)
        assert 0 < m["probed_hit_latency_seconds_sum"][()] < 5
        # Running, or stopped for a hit at the moment of the scrape: one state, and still attached.
        ((labels, value),) = m["probed_target_state"].items()
        assert labels[0][1] in ("running", "stopped") and value == 1.0
        assert m["probed_target_connected"] == {(): 1.0}
    finally:
        assert d.stop() == 0


def test_metrics_only_on_loopback_unless_told(guest_i386, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "probed.front.daemon", "--target", guest_i386.target, "--control",
         str(tmp_path / "c.sock"), "--metrics", "tcp:0.0.0.0:9464"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "0.0.0.0 is not a loopback address; add --metrics-public" in out.stderr


def _tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=True, timeout=30).stdout


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install tmux)")
@pytest.mark.parametrize("quit_key", ["q", "C-c"])
def test_top_in_a_terminal(guest_i386, tmp_path, quit_key):
    d = Daemon(guest_i386, tmp_path, "--stopped", "--hw-slots", "4")
    server = f"probed-test-{tmp_path.name}"
    sock = ["-L", server]
    try:
        d.ctl("add", "-n", "pt", "probe_target", "a=$arg1:s32", "--if", "a <= 3")
        d.ctl("add", "--hw", "-n", "hw", "elsewhere")
        d.ctl("resume")
        assert len(d.ctl("events", "--probe", "pt", "--count", "3", "--json").stdout.splitlines()) == 3
        done = tmp_path / "top.exit"
        cmd = (f"{shlex.quote(sys.executable)} -m probed.front.cli --control {shlex.quote(str(d.control))} top "
               f"--interval 0.2; echo $? > {shlex.quote(str(done))}; tmux -L {server} wait-for -S top-done")
        _tmux(*sock, "new-session", "-d", "-x", "80", "-y", "24", "-s", "top", cmd)
        # The screen refreshes in place: poll it until it shows both probes.
        deadline = time.monotonic() + 60
        while True:
            screen = _tmux(*sock, "capture-pane", "-p", "-t", "top")
            if re.search(r"│ pt +│", screen) and re.search(r"│ hw +│", screen):
                break
            assert time.monotonic() < deadline, screen
            time.sleep(0.05)  # paces the polling of the pane; the condition above is what synchronises
        rows = {line.split("│")[2].strip(): [c.strip() for c in line.split("│")[1:-1]]
                for line in screen.splitlines() if line.count("│") >= 10}
        assert rows["pt"][6] == "0" and int(rows["pt"][7]) == int(rows["pt"][3]) - 3  # filtered = hits - 3
        assert rows["hw"][8] == "0" and rows["pt"][8] == "-"  # the hardware breakpoint's debug-register slot
        assert "slots 1/4" in screen
        listing = {p["name"]: p for p in json.loads(d.ctl("list", "--json").stdout)}
        assert int(rows["pt"][3]) <= listing["pt"]["hits"]
        _tmux(*sock, "send-keys", "-t", "top", quit_key)
        _tmux(*sock, "wait-for", "top-done")
        assert done.read_text().strip() == "0"
    finally:
        subprocess.run(["tmux", *sock, "kill-server"], capture_output=True)
        assert d.stop() == 0
