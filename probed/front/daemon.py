"""probed: the daemon. Attaches to QEMU's gdbstub, serves the control socket (and GDB), writes hit records.

SIGINT and SIGTERM end it cleanly: every breakpoint it set is removed, the guest resumes, it detaches and
exits 0.

A daemon that dies without that (SIGKILL, the OOM killer) leaves the guest stopped at its next breakpoint.
The state file (`--state`, beside the control socket by default) is what brings it back: a restarted probed
attaches (QEMU's `?` drops the breakpoints the dead one left), re-adds the saved probes while the guest is
still stopped, and resumes it. Run it under a supervisor that restarts it (docs/operations.md: systemd's
`Restart=always`).

A lost connection to QEMU is waited for and picked up again (docs/operations.md), unless
`--no-reconnect`.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import signal
import sys
import time
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import TextIO

import trio

from probed import __version__
from probed.engine.engine import HANDLER_TIMEOUT, Engine
from probed.errors import ProbedError, Unsupported
from probed.front.control import default_control_path, prepare_socket_path, serve_control
from probed.front.paths import UnsafePath, check_loopback, make_private_dir, open_private_append
from probed.front.paths import prepare_socket_path as prepare_unix_path
from probed.front.state import ProbeState, default_state_path, read_state
from probed.guest.linux.kernel import LinuxKernel, is_linux_kernel, use_linux
from probed.records.events import BUFFER_BYTES, SUBSCRIPTION_BYTES
from probed.records.size import MAX_RECORD_BYTES
from rsp.connection import parse_target

log = logging.getLogger("probed")


def build_parser() -> argparse.ArgumentParser:
    """probed's argument parser."""
    ap = argparse.ArgumentParser(prog="probed", description="Probe daemon for QEMU guests over the GDB remote protocol.")
    ap.add_argument("--target", required=True, help="QEMU's gdbstub: tcp:HOST:PORT or unix:PATH")
    ap.add_argument("--symbols", action="append", default=[], metavar="FILE[@BIAS]",
                    help="ELF, System.map or kallsyms dump; repeatable")
    ap.add_argument("--linux", action="store_true",
                    help="the guest is an x86_64 Linux kernel: find its KASLR slide, rebase --symbols files (or "
                         "read its symbols from guest memory without one), follow its modules (see docs/linux.md); "
                         "implied when a --symbols file is a Linux kernel's")
    ap.add_argument("--kallsyms-cache", type=Path, metavar="DIR",
                    help="where kernel symbols read from guests are cached by build (default $PROBED_CACHE/kallsyms "
                         "or ~/.cache/probed/kallsyms)")
    ap.add_argument("--no-kallsyms-cache", action="store_true", help="read the kernel's symbols from the guest every time")
    ap.add_argument("--control", type=Path, default=None, help=f"control socket (default {default_control_path()})")
    ap.add_argument("--events", type=Path, metavar="FILE.jsonl", help="append every hit record to this file")
    ap.add_argument("--stopped", action="store_true", help="keep the guest stopped until `probectl resume`")
    ap.add_argument("--hw-slots", type=int, default=4, metavar="N", help="hardware debug-register slots (default 4)")
    ap.add_argument("--buffer", type=int, default=65536, metavar="N", help="hit records kept for `probectl events`")
    ap.add_argument("--sysroot", type=Path, metavar="DIR",
                    help="host copies of the guest's files under DIR (DIR/bin/prog for /bin/prog): user probes' "
                         "symbols come from there")
    ap.add_argument("--buffer-bytes", type=_size, default=BUFFER_BYTES, metavar="BYTES",
                    help="bytes of hit records (JSON) kept for `probectl events` (default 64M; K, M, G suffixes)")
    ap.add_argument("--max-record-bytes", type=_size, default=MAX_RECORD_BYTES, metavar="BYTES",
                    help="refuse a probe whose hit record could be larger than this (default 1M)")
    state = ap.add_mutually_exclusive_group()
    state.add_argument("--state", type=Path, metavar="FILE",
                       help="keep the probes in this file and re-add them at start (default: state.json beside "
                            "the control socket)")
    state.add_argument("--no-state", action="store_true", help="keep no state file: probes live as long as the daemon")
    ap.add_argument("--gdb-listen", metavar="ADDR", nargs="?", const="unix:",
                    help="serve GDB here: unix:PATH, or tcp:127.0.0.1:PORT (loopback); alone, a unix socket "
                         "gdb.sock beside the control socket")
    ap.add_argument("--gdb-allow-remote", action="store_true",
                    help="let --gdb-listen bind a TCP address other than loopback (anyone who reaches it can read "
                         "and write guest memory)")
    ap.add_argument("--gdb-allow-monitor", action="store_true",
                    help="let GDB's `monitor` commands that end, reset or stop the guest through the stub")
    ap.add_argument("--guest-memory", choices=["auto", "proc-mem", "gdbstub"], default="auto",
                    help="auto: read guest RAM directly from QEMU's process when it runs on this host and "
                         "/proc/PID/mem is readable (RAM that QEMU maps shared from a file, as "
                         "memory-backend-memfd or -file with share=on, is mapped into probed: no system call "
                         "per read), else through the gdbstub (the log says why); proc-mem: the same, always "
                         "with pread on /proc/PID/mem; gdbstub: always through the gdbstub's m packets")
    ap.add_argument("--qemu-pid", type=int, metavar="PID", help="QEMU's pid, if not found from the gdbstub socket")
    ap.add_argument("--metrics", metavar="ADDR", help="serve Prometheus metrics here: tcp:127.0.0.1:PORT")
    ap.add_argument("--metrics-public", action="store_true", help="allow --metrics on a non-loopback address")
    ap.add_argument("--handler-timeout", type=float, default=HANDLER_TIMEOUT, metavar="SECONDS",
                    help=f"time limit of a Python handler, unless its probe has its own (default {HANDLER_TIMEOUT:g}; "
                         "0: none)")
    ap.add_argument("--target-timeout", type=float, default=10.0, metavar="SECONDS",
                    help="seconds QEMU may take to answer; past it the connection counts as lost (default 10)")
    ap.add_argument("--no-reconnect", dest="reconnect", action="store_false",
                    help="exit (status 1) when the connection to QEMU is lost, instead of waiting for it")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    ap.add_argument("--version", action="version", version=f"probed {__version__}")
    return ap


def _size(text: str) -> int:
    """`65536`, `64K`, `64M`, `1G` as bytes (argparse type)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    try:
        value = int(t[:-1]) * units[t[-1]] if t and t[-1] in units else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 65536, 64K, 64M)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"a size must be positive, not {text!r}")
    return value


async def write_events(engine: Engine, out: TextIO, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Append each hit record to `out` as a JSON line (flushed once per batch).

    The daemon opens the file without following a symlink and owner-only (see `open_private_append`).
    """
    with engine.hub.subscribe(maxsize=65536, max_bytes=SUBSCRIPTION_BYTES) as sub:
        task_status.started()
        async for line in sub.lines():
            out.write(line + "\n")
            while True:
                try:
                    out.write(sub.receive_line_nowait() + "\n")
                except trio.WouldBlock:
                    break
            out.flush()
        if sub.missed:
            log.warning("the events file missed %d records (writer too slow)", sub.missed)


class LinuxProgress:
    """A rich progress bar on stderr while the kernel's symbols are read from the guest (only if it is a
    terminal: logs stay clean)."""

    def __init__(self) -> None:
        self._bar = None
        self._task = None

    def update(self, what: str, done: int, total: int) -> None:
        if self._bar is None:
            from rich.console import Console
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

            console = Console(stderr=True)
            self._bar = Progress(TextColumn("probed: reading the kernel's {task.description} from the guest"),
                                 BarColumn(), DownloadColumn(), TransferSpeedColumn(), console=console,
                                 transient=True, disable=not console.is_terminal)
            self._bar.start()
            self._task = self._bar.add_task(what, total=total)
        self._bar.update(self._task, completed=done, total=total)
        if done >= total:
            self.close()  # before the daemon logs what it found

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _gdb_server():
    """The stub's `serve_gdb`, or None where the stub is not built in."""
    try:
        from stub.server import serve_gdb
    except ImportError:
        return None
    return serve_gdb


def gdb_address(listen: str, control: Path, allow_remote: bool) -> str:
    """Where GDB is served: `unix:` alone is `gdb.sock` beside the control socket; a unix path is made
    ready like the control socket's (only a stale socket is removed); TCP must be loopback unless allowed.

    Raises:
        UnsafePath: a non-loopback address without `allow_remote`, or something not a socket at the path.
        SocketInUse: something listens at the unix path.
    """
    if listen == "unix:":
        listen = f"unix:{control.parent / 'gdb.sock'}"
    try:
        kind, address = parse_target(listen)
    except ValueError as exc:
        raise UnsafePath(listen, str(exc)) from None
    if kind == "unix":
        prepare_unix_path(Path(address))
    elif not check_loopback(address[0]) and not allow_remote:
        raise UnsafePath(listen, "not a loopback address: anyone who reaches it could read and write guest memory "
                                 "and run monitor commands; use unix:PATH, or pass --gdb-allow-remote")
    elif not check_loopback(address[0]):
        log.warning("serving GDB on %s: every host that reaches it can debug the guest", listen)
    return listen


def _gdb_options(serve_gdb, allow_monitor: bool) -> dict[str, bool]:
    """`allow_monitor` for a stub that takes it; a stub without it has no monitor filter to pass it to."""
    if "allow_monitor" in inspect.signature(serve_gdb).parameters:
        return {"allow_monitor": allow_monitor}
    if allow_monitor:
        log.warning("--gdb-allow-monitor: this stub filters no monitor commands")
    return {}


async def run(args: argparse.Namespace) -> None:
    """Run the engine, the control socket, the events file and the GDB server until SIGINT or SIGTERM.

    With a state file, the engine attaches with the guest held stopped, the saved probes are re-added, and
    only then does the guest run (unless `--stopped`).

    Raises:
        ProbedError: the target cannot be attached, or it went away, or the control socket is taken.
        OSError: the control socket or events file cannot be made.
    """
    began = time.monotonic()
    serve_gdb = _gdb_server() if args.gdb_listen else None
    if args.gdb_listen and serve_gdb is None:
        raise Unsupported("--gdb-listen: not implemented yet")
    control = args.control or default_control_path()
    prepare_socket_path(control)  # refuse a second daemon, or an unsafe directory, before touching the target
    gdb_listen = gdb_address(args.gdb_listen, control, args.gdb_allow_remote) if serve_gdb is not None else None
    if args.metrics:
        from probed.records.metrics import parse_listen

        parse_listen(args.metrics, public=args.metrics_public)  # refuse a bad address before attaching
    state_path = None if args.no_state else (args.state or default_state_path(control))
    saved = None
    if state_path is not None:
        make_private_dir(state_path.parent)
        saved = read_state(state_path)
    engine = Engine(args.target, symbol_files=args.symbols, stopped=args.stopped or bool(saved), hw_slots=args.hw_slots,
                    buffer=args.buffer, guest_memory=args.guest_memory, qemu_pid=args.qemu_pid,
                    sysroot=args.sysroot, handler_timeout=args.handler_timeout, timeout=args.target_timeout,
                    reconnect=args.reconnect)
    engine.hub.buffer_bytes = args.buffer_bytes
    state = ProbeState(engine, state_path) if state_path is not None else None
    progress = None
    if args.linux or is_linux_kernel(engine.symbols):
        progress = LinuxProgress()
        cache = False if args.no_kallsyms_cache else args.kallsyms_cache
        use_linux(engine, LinuxKernel(cache=cache, progress=progress.update))
    with ExitStack() as files, trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        events = files.enter_context(open_private_append(args.events)) if args.events else None
        async with trio.open_nursery() as nursery:
            try:
                await nursery.start(engine.run)
            finally:
                if progress is not None:
                    progress.close()
            if state is not None:
                await _restore(engine, state, saved, hold=args.stopped)
                nursery.start_soon(state.watch)
            if events is not None:
                await nursery.start(write_events, engine, events)
            await nursery.start(partial(serve_control, engine, control, state=state,
                                        max_record_bytes=args.max_record_bytes))
            if args.metrics:
                await _start_metrics(nursery, engine, args)
            if serve_gdb is not None:
                options = _gdb_options(serve_gdb, args.gdb_allow_monitor)
                listeners = await nursery.start(partial(serve_gdb, engine, gdb_listen, **options))
                log.info("serving GDB on %s", ", ".join(_where(lst) for lst in listeners))
            log.info("ready: control socket %s (%.2f s after start)", control, time.monotonic() - began)
            async for signum in signals:
                log.info("%s: removing breakpoints, resuming the guest, detaching", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


async def _restore(engine: Engine, state: ProbeState, saved: dict | None, *, hold: bool) -> None:
    """Re-add the saved probes while the guest is held, then let it run (unless `--stopped` holds it)."""
    try:
        if saved:
            restored, errors = await state.restore(saved)
            for error in errors:
                log.error("state file %s: not restored: %s", state.path, error)
            log.info("state file %s: %d probe(s) re-added", state.path, restored)
        else:
            state.changed()
    finally:
        if saved and not hold:
            await engine.resume()  # whatever happened above: never leave the guest stopped because of us


async def _start_metrics(nursery: trio.Nursery, engine: Engine, args: argparse.Namespace) -> None:
    from probed.records.metrics import serve_metrics

    host, port = await nursery.start(partial(serve_metrics, engine, args.metrics, public=args.metrics_public))
    log.info("serving metrics on http://%s:%d/metrics", host, port)


def _where(listener) -> str:
    """`tcp:HOST:PORT` (the port bound, also when 0 was asked for) or `unix:PATH` of a listener."""
    name = listener.socket.getsockname()
    if isinstance(name, tuple):
        return f"tcp:{name[0]}:{name[1]}"
    return f"unix:{name}"


def main(argv: list[str] | None = None) -> int:
    """probed's entry point: 0 after a clean stop, 1 with a one-line error on stderr otherwise."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="probed: %(message)s", stream=sys.stderr)
    try:
        trio.run(run, args)
    except (ProbedError, OSError) as exc:
        print(f"probed: {exc}", file=sys.stderr)
        return 1
    except BaseExceptionGroup as group:
        errors = [e for e in _leaves(group) if isinstance(e, ProbedError | OSError)]
        if errors:
            print(f"probed: {errors[0]}", file=sys.stderr)
            return 1
        raise
    return 0


def _leaves(exc: BaseException):
    if isinstance(exc, BaseExceptionGroup):
        for e in exc.exceptions:
            yield from _leaves(e)
    else:
        yield exc


if __name__ == "__main__":
    sys.exit(main())
