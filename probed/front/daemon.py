"""probed: the daemon. Attaches to QEMU's gdbstub, serves the control socket (and GDB), writes hit records.

SIGINT and SIGTERM end it cleanly: every breakpoint it set is removed, the guest resumes, it detaches and
exits 0.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

import trio

from probed import __version__
from probed.engine.engine import Engine
from probed.errors import ProbedError, Unsupported
from probed.front.control import default_control_path, prepare_socket_path, serve_control
from probed.records.events import encode_record

log = logging.getLogger("probed")


def build_parser() -> argparse.ArgumentParser:
    """probed's argument parser."""
    ap = argparse.ArgumentParser(prog="probed", description="Probe daemon for QEMU guests over the GDB remote protocol.")
    ap.add_argument("--target", required=True, help="QEMU's gdbstub: tcp:HOST:PORT or unix:PATH")
    ap.add_argument("--symbols", action="append", default=[], metavar="FILE[@BIAS]",
                    help="ELF, System.map or kallsyms dump; repeatable")
    ap.add_argument("--control", type=Path, default=None, help=f"control socket (default {default_control_path()})")
    ap.add_argument("--events", type=Path, metavar="FILE.jsonl", help="append every hit record to this file")
    ap.add_argument("--stopped", action="store_true", help="keep the guest stopped until `probectl resume`")
    ap.add_argument("--hw-slots", type=int, default=4, metavar="N", help="hardware debug-register slots (default 4)")
    ap.add_argument("--buffer", type=int, default=65536, metavar="N", help="hit records kept for `probectl events`")
    ap.add_argument("--gdb-listen", metavar="ADDR", help="serve GDB here: tcp:127.0.0.1:PORT or unix:PATH")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    ap.add_argument("--version", action="version", version=f"probed {__version__}")
    return ap


async def write_events(engine: Engine, path: Path, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Append each hit record to `path` as a JSON line (flushed once per batch)."""
    with engine.hub.subscribe(maxsize=65536) as sub, path.open("a", encoding="utf-8") as out:
        task_status.started()
        async for record in sub:
            out.write(encode_record(record) + "\n")
            while True:
                try:
                    out.write(encode_record(sub.receive_nowait()) + "\n")
                except trio.WouldBlock:
                    break
            out.flush()
        if sub.missed:
            log.warning("the events file missed %d records (writer too slow)", sub.missed)


def _gdb_server():
    """The stub's `serve_gdb`, or None where the stub is not built in."""
    try:
        from stub.server import serve_gdb
    except ImportError:
        return None
    return serve_gdb


async def run(args: argparse.Namespace) -> None:
    """Run the engine, the control socket, the events file and the GDB server until SIGINT or SIGTERM.

    Raises:
        ProbedError: the target cannot be attached, or it went away, or the control socket is taken.
        OSError: the control socket or events file cannot be made.
    """
    serve_gdb = _gdb_server() if args.gdb_listen else None
    if args.gdb_listen and serve_gdb is None:
        raise Unsupported("--gdb-listen: not implemented yet")
    engine = Engine(args.target, symbol_files=args.symbols, stopped=args.stopped, hw_slots=args.hw_slots,
                    buffer=args.buffer)
    control = args.control or default_control_path()
    prepare_socket_path(control)  # refuse a second daemon before touching the target
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            if args.events:
                await nursery.start(write_events, engine, args.events)
            await nursery.start(serve_control, engine, control)
            if serve_gdb is not None:
                listeners = await nursery.start(serve_gdb, engine, args.gdb_listen)
                log.info("serving GDB on %s", ", ".join(_where(lst) for lst in listeners))
            log.info("ready: control socket %s", control)
            async for signum in signals:
                log.info("%s: removing breakpoints, resuming the guest, detaching", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


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
