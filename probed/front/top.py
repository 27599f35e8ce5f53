"""`probectl top`: the daemon's probes refreshing in place (rich), until q or Ctrl-C."""

from __future__ import annotations

import contextlib
import os
import select
import sys
import termios
import time
import tty
from collections.abc import Iterator
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Column, Table
from rich.text import Text

__all__ = ["render_top", "run_top"]

COLUMNS = ("id", "name", "spec", "hits", "hits/s", "missed", "faults", "filtered", "slot", "state")


def render_top(data: dict[str, Any], rates: dict[int, float]) -> Group:
    """The screen for one `counters` result and each probe's hits per second."""
    stats = data["stats"]
    slots = data.get("slots", [])
    held = sum(1 for s in slots if s.get("owner"))
    head = Text(
        f"probed top   stops {stats.get('stops', 0)}   hits {stats.get('hits', 0)}   records {stats.get('records', 0)}"
        f"   breakpoints {stats.get('breakpoints', 0)}   slots {held}/{len(slots)}   (q quits)"
    )
    # Numbers are never cut; the spec and the state give way first on a narrow terminal.
    table = Table(*(Column(c, no_wrap=True, min_width=len(c), overflow="ellipsis" if c in ("spec", "state") else "fold")
                    for c in COLUMNS), expand=False)
    for row in data["probes"]:
        table.add_row(
            str(row["id"]), row["name"], row["spec"], str(row["hits"]), f"{rates.get(row['id'], 0.0):.1f}",
            str(row["missed"]), str(row["faults"]), str(row["filtered"]),
            "-" if row["slot"] is None else str(row["slot"]), row["state"],
        )
    if not data["probes"]:
        table.add_row("-", "no probes", *[""] * (len(COLUMNS) - 2))
    return Group(head, table)


@contextlib.contextmanager
def _keyboard() -> Iterator[int | None]:
    """stdin in cbreak mode (keys arrive one by one, Ctrl-C still interrupts) while the view runs."""
    fd = sys.stdin.fileno() if sys.stdin is not None and sys.stdin.isatty() else None
    if fd is None:
        yield None
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _wait_key(fd: int | None, timeout: float) -> str | None:
    """A key pressed within `timeout` seconds, else None (the refresh period when there is no terminal)."""
    if fd is None:
        time.sleep(timeout)  # the refresh period; nothing to listen to
        return None
    ready, _, _ = select.select([fd], [], [], timeout)
    return os.read(fd, 32).decode(errors="replace") if ready else None


def run_top(client: Any, interval: float = 1.0) -> int:
    """Refresh every `interval` seconds until q (or Ctrl-C); returns probectl's exit code."""
    console = Console()
    previous: dict[int, tuple[int, float]] = {}
    try:
        with _keyboard() as fd, Live(console=console, screen=console.is_terminal, auto_refresh=False) as live:
            while True:
                data = client.call("counters")
                now = time.monotonic()
                rates = {}
                for row in data["probes"]:
                    hits0, t0 = previous.get(row["id"], (row["hits"], now))
                    rates[row["id"]] = (row["hits"] - hits0) / (now - t0) if now > t0 else 0.0
                    previous[row["id"]] = (row["hits"], now)
                live.update(render_top(data, rates), refresh=True)
                key = _wait_key(fd, interval)
                if key and key[0] in "qQ":
                    return 0
    except KeyboardInterrupt:
        return 0
