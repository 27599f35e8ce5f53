"""probectl: the command line of probed, talking JSON-RPC to the daemon's control socket."""

from __future__ import annotations

import argparse
import json
import socket
import sys
from pathlib import Path
from typing import Any

from probed import __version__
from probed.front.cli_tracing import VERBS as TRACING_VERBS
from probed.front.cli_tracing import add_parsers as add_tracing_parsers
from probed.front.cli_tracing import run_tracing
from probed.front.control import API_VERSION, default_control_path
from probed.front.render import print_events_line, print_table
from probed.records.trace_text import format_trace_line

EXIT_OK, EXIT_DAEMON_ERROR, EXIT_USAGE, EXIT_NO_DAEMON = 0, 1, 2, 3

EPILOG = """exit codes:
  0  done
  1  the daemon refused or failed (its message is printed, with close matches for unknown symbols)
  2  bad usage
  3  no daemon at the control socket (is probed running?)

fetch args (kprobe_events syntax): NAME=FETCHARG[:TYPE], e.g. 'dfd=%di:s32' 'name=+0(%si):string'
(an arg that starts with '-' needs a name: 'x=-8(%bp):u32')."""


class DaemonError(Exception):
    """The daemon answered a request with a JSON-RPC error.

    Attributes:
        error: the error object: `code`, `message` and maybe `data` (e.g. `suggestions`).
    """

    def __init__(self, error: dict[str, Any]):
        self.error = error
        super().__init__(error.get("message", "error"))

    def explain(self) -> str:
        """The message for stderr, with the daemon's suggestions when its message does not name them."""
        text = f"probectl: {self.error.get('message', 'error')}"
        data = self.error.get("data")
        suggestions = data.get("suggestions") if isinstance(data, dict) else None
        if suggestions and not all(str(s) in text for s in suggestions):
            text += "\nprobectl: did you mean: " + ", ".join(map(str, suggestions))
        return text


class NoDaemon(Exception):
    """Nothing listens at the control socket (or it went away mid-conversation)."""


class Client:
    """A blocking JSON-RPC client over the control socket.

    Args:
        path: the daemon's control socket.

    Raises:
        NoDaemon: the socket is missing or refuses connections.
        OSError: the socket exists but cannot be used (e.g. it belongs to another user).
    """

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            self.sock.close()
            raise NoDaemon(f"probectl: no daemon at {path} (is probed running?)") from exc
        except OSError:
            self.sock.close()
            raise
        self.file = self.sock.makefile("rb")
        self._id = 0

    def close(self) -> None:
        """Close the connection."""
        self.file.close()
        self.sock.close()

    def send(self, method: str, params: dict[str, Any] | None = None) -> int:
        """Send one request without waiting; returns its id."""
        self._id += 1
        msg = {"jsonrpc": "2.0", "id": self._id, "method": method, "params": params or {}}
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        return self._id

    def read(self) -> dict[str, Any]:
        """The next message from the daemon (a response or an `event` notification).

        Raises:
            NoDaemon: the daemon closed the connection.
        """
        line = self.file.readline()
        if not line:
            raise NoDaemon(f"probectl: the daemon at {self.path} closed the connection")
        return json.loads(line)

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """Send a request and wait for its result.

        Raises:
            DaemonError: the daemon answered with an error.
            NoDaemon: the daemon closed the connection.
        """
        self.send(method, params)
        reply = self.read()
        if "error" in reply:
            raise DaemonError(reply["error"])
        return reply["result"]


def build_parser() -> argparse.ArgumentParser:
    """probectl's argument parser; `commands` maps each verb to its subparser."""
    ap = argparse.ArgumentParser(
        prog="probectl", description="Control a running probed daemon.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--control", type=Path, default=None, help=f"control socket (default {default_control_path()})")
    ap.add_argument("--version", action="version", version=f"probectl {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    add = sub.add_parser("add", help="add a breakpoint probe", epilog=EPILOG,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    add.add_argument("-n", "--name")
    add.add_argument("--priority", type=int, default=0)
    add.add_argument("--hw", action="store_true", help="use a hardware breakpoint (takes a debug-register slot)")
    add.add_argument("-r", "--return", dest="retprobe", action="store_true",
                     help="a return probe: fetch at the function's return ($retval; $argN as at the entry)")
    add.add_argument("--maxactive", type=int, default=0, metavar="N",
                     help="a return probe's limit of calls in flight (default max(10, 2 * CPUs))")
    add.add_argument("--file-copy", metavar="HOSTPATH",
                     help="user probes: a host copy of the guest's file, to resolve /PATH:SYMBOL")
    add.add_argument("spec", help="sym, sym+off, file:sym+off, 0xADDR; in a Linux guest's user space "
                     "/PATH:OFFSET or /PATH:SYMBOL[+OFF]; sym%%return for a return probe")
    add.add_argument("fetchargs", nargs="*", metavar="FETCHARG", help="pre-handler fetch args")
    add.add_argument("--post", nargs="*", metavar="FETCHARG", help="post-handler fetch args (may be none)")
    add.add_argument("--if", dest="condition", metavar="EXPR", help="report a hit only when EXPR holds")

    watch = sub.add_parser("watch", help="add a data watchpoint probe")
    watch.add_argument("-n", "--name")
    watch.add_argument("spec", help="a data symbol, file:sym+off or 0xADDR")
    watch.add_argument("--len", dest="length", type=int, choices=[1, 2, 4, 8])
    watch.add_argument("--access", choices=["w", "r", "rw"], default="w")
    watch.add_argument("fetchargs", nargs="*", metavar="FETCHARG")
    watch.add_argument("--post", nargs="*", metavar="FETCHARG")
    watch.add_argument("--if", dest="condition", metavar="EXPR")

    rm = sub.add_parser("rm", help="remove probes")
    group = rm.add_mutually_exclusive_group(required=True)
    group.add_argument("ref", nargs="?", metavar="ID|NAME")
    group.add_argument("--all", action="store_true")
    for verb in ("enable", "disable"):
        p = sub.add_parser(verb, help=f"{verb} a probe")
        p.add_argument("ref", metavar="ID|NAME")

    for verb, text in (("list", "list probes"), ("stats", "counters and debug-register slots"),
                       ("status", "the daemon and its target")):
        p = sub.add_parser(verb, help=text)
        p.add_argument("--json", action="store_true")
    hooks = sub.add_parser("hooks", help="probeable functions, with the handlers on active hook points")
    hooks.add_argument("glob", nargs="?", default="*")
    hooks.add_argument("--json", action="store_true")

    events = sub.add_parser("events", help="hit records: the ring buffer, then (with --follow) new ones")
    events.add_argument("--follow", "-f", action="store_true")
    events.add_argument("--json", action="store_true", help="JSON lines (as --format json)")
    events.add_argument("--format", choices=["text", "json", "trace"], default=None,
                        help="text (default), json lines, or trace: ftrace's trace_pipe lines")
    events.add_argument("--probe", metavar="ID|NAME")
    events.add_argument("--count", type=int, metavar="N")

    symbols = sub.add_parser("symbols", help="list symbol files, or relocate one (FILE@BIAS)")
    symbols.add_argument("file", nargs="?", metavar="FILE@BIAS")
    symbols.add_argument("--json", action="store_true")
    sub.add_parser("resume", help="let a guest held by probed --stopped run")
    add_tracing_parsers(sub)
    ap.commands = sub.choices  # parse_args needs the verb's own parser for intermixed fetch args
    return ap


def _handler_params(args: argparse.Namespace) -> dict[str, Any]:
    return {"name": args.name, "pre": args.fetchargs, "post": args.post, "condition": args.condition}


def run(args: argparse.Namespace, client: Client) -> int:
    """Carry out one parsed command over `client`; returns the exit code.

    Raises:
        DaemonError, NoDaemon: see `Client.call`.
    """
    cmd = args.command
    version = client.call("version")
    if version.get("api") != API_VERSION:
        print(f"probectl: the daemon speaks API {version.get('api')}, this probectl {API_VERSION}", file=sys.stderr)
        return EXIT_DAEMON_ERROR
    if cmd == "add":
        params = {"spec": args.spec, "priority": args.priority, "hw": args.hw, **_handler_params(args)}
        if args.file_copy:
            params["file_copy"] = str(Path(args.file_copy).resolve())
        if args.retprobe or args.maxactive:
            params.update(retprobe=args.retprobe, maxactive=args.maxactive)
        info = client.call("add", params)
        print(info["id"])
    elif cmd == "watch":
        info = client.call("watch", {"spec": args.spec, "length": args.length, "access": args.access,
                                     **_handler_params(args)})
        print(info["id"])
    elif cmd == "rm":
        client.call("rm", {"all": True} if args.all else {"ref": args.ref})
    elif cmd in ("enable", "disable"):
        client.call(cmd, {"ref": args.ref})
    elif cmd == "resume":
        client.call("resume")
    elif cmd in ("list", "stats", "status", "hooks", "symbols"):
        params: dict[str, Any] = {}
        if cmd == "hooks":
            params["glob"] = args.glob
        if cmd == "symbols" and args.file:
            params["file"] = args.file
        result = client.call(cmd, params)
        if getattr(args, "json", False):
            print(json.dumps(result, indent=None if cmd == "list" else 2))
        else:
            print_table(cmd, result)
    elif cmd == "events":
        return _events(args, client)
    elif cmd in TRACING_VERBS:
        return run_tracing(args, client)
    return EXIT_OK


def _events(args: argparse.Namespace, client: Client) -> int:
    params = {"follow": args.follow, "count": args.count}
    if args.probe is not None:
        params["probe"] = int(args.probe) if args.probe.isdigit() else args.probe
    client.send("events", params)
    fmt = args.format or ("json" if args.json else "text")
    while True:
        msg = client.read()
        if msg.get("method") == "event":
            record = msg["params"]
            if fmt == "json":
                sys.stdout.write(json.dumps(record) + "\n")
            elif fmt == "trace":
                print(format_trace_line(record))
            else:
                print_events_line(record)
            sys.stdout.flush()
            continue
        if "error" in msg:
            raise DaemonError(msg["error"])
        return EXIT_OK


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line; fetch args may come before or after options (`watch SYM --len 4 a=%ax`)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    sub = parser.commands[args.command]
    if not any(a.dest == "fetchargs" for a in sub._actions):
        return parser.parse_args(argv)
    # argparse takes positionals only before the first option unless they are parsed intermixed.
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = argv[argv.index(args.command) + 1 :]
    for key, value in vars(sub.parse_intermixed_args(rest)).items():
        setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    """probectl's entry point; returns the exit code (see EPILOG)."""
    args = parse_args(argv)
    path = args.control or default_control_path()
    try:
        client = Client(path)
    except NoDaemon as exc:
        print(exc, file=sys.stderr)
        return EXIT_NO_DAEMON
    except OSError as exc:
        print(f"probectl: cannot use the control socket {path}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_DAEMON_ERROR
    try:
        return run(args, client)
    except NoDaemon as exc:
        print(exc, file=sys.stderr)
        return EXIT_NO_DAEMON
    except DaemonError as exc:
        print(exc.explain(), file=sys.stderr)
        return EXIT_DAEMON_ERROR
    except KeyboardInterrupt:
        return EXIT_OK
    except BrokenPipeError:
        return EXIT_OK  # stdout closed early (`probectl events -f | head`)
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
