"""The control socket: JSON-RPC 2.0 over a unix socket, one JSON object per line.

The socket is owner-only (mode 0600, in a 0700 directory). One method per verb; `version` first tells a
client which API it talks to. `events` streams: one `{"method": "event", "params": RECORD}` notification per
hit record, then (unless following) a final response with the count.

Errors the engine raises (`ProbedError`) become JSON-RPC errors with the error's own `code`, message and
`data()`; a request that is not JSON-RPC gets the standard codes of the JSON-RPC 2.0 spec ("-32700 Parse
error", "-32600 Invalid Request", "-32601 Method not found", "-32602 Invalid params", "-32603 Internal
error"). No request, however bad, ends the server or the connection.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from probed import __version__
from probed.engine.api import EngineAPI
from probed.errors import ProbedError
from probed.front.names import check_probe_name
from probed.front.paths import SocketInUse, make_private_dir
from probed.front.paths import prepare_socket_path as prepare_unix_path
from probed.front.tracing_methods import TracingMethods, add_options
from probed.guest.symbols import parse_file_arg
from probed.records.size import MAX_RECORD_BYTES, RecordTooLarge, check_record_size

__all__ = [
    "API_VERSION",
    "ControlServer",
    "SocketInUse",
    "default_control_path",
    "prepare_socket_path",
    "serve_control",
]

log = logging.getLogger(__name__)

API_VERSION = 1
PARSE_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, INVALID_PARAMS, INTERNAL_ERROR = -32700, -32600, -32601, -32602, -32603
MAX_LINE = 1 << 20
EVENTS_BUFFER = 4096  # records a streaming client may fall behind before it misses some
STATE_CHANGES = frozenset({"add", "watch", "rm", "enable", "disable", "symbols", "load"})  # methods that change the state file


class InvalidParams(Exception):
    """A request's params do not fit its method (JSON-RPC -32602)."""


def default_control_path() -> Path:
    """Where the control socket lives unless `--control` says otherwise.

    Returns:
        `$XDG_RUNTIME_DIR/probed/control.sock`, else `/tmp/probed-$UID/control.sock`.
    """
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / "probed" if runtime else Path(f"/tmp/probed-{os.getuid()}")
    return base / "control.sock"


def prepare_socket_path(path: Path) -> None:
    """Make the socket's owner-only directory (or check it); refuse a live daemon's socket or a non-socket;
    remove a stale socket.

    Args:
        path: where the control socket is to be bound.

    Raises:
        SocketInUse: something accepts connections there.
        UnsafePath: the directory is not the user's alone, or something other than a socket is at `path`.
        OSError: the directory cannot be made.
    """
    make_private_dir(path.parent)
    prepare_unix_path(path)


class ControlServer:
    """Dispatches JSON-RPC requests to an engine, one method per `probectl` verb.

    Args:
        engine: anything with `probed.engine.api.EngineAPI` (the engine, or a test's stand-in).
        state: the `probed.front.state.ProbeState` to keep in step with every change, if any.
        max_record_bytes: a probe whose worst-case hit record is larger is refused at `add`.
    """

    def __init__(self, engine: EngineAPI, *, state: Any = None, max_record_bytes: int = MAX_RECORD_BYTES):
        self.engine = engine
        self.state = state
        self.max_record_bytes = max_record_bytes
        self.methods: dict[str, Callable[[dict[str, Any]], Awaitable[Any]]] = {
            "version": self.version,
            "add": self.add,
            "watch": self.watch,
            "rm": self.rm,
            "enable": self.enable,
            "disable": self.disable,
            "list": self.list,
            "stats": self.stats,
            "status": self.status,
            "hooks": self.hooks,
            "symbols": self.symbols,
            "resume": self.resume,
        }
        self.methods.update(TracingMethods(engine, on_added=self._remember).methods())

    # -- methods: each takes the request's params and returns its result --------------------------------

    async def version(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"api": API_VERSION, "version": __version__}

    async def add(self, params: dict[str, Any]) -> dict[str, Any]:
        checked = self._check_new_probe(params)
        spec, extra = add_options(self.engine, _text(params, "spec", required=True), params)
        extra.pop("maxactive", None)  # checked as an integer below
        probe = await self.engine.add_probe(
            spec,
            **extra,
            name=_text(params, "name"),
            pre=_fetchargs(params, "pre") or None,
            post=_fetchargs(params, "post"),
            condition=_text(params, "condition"),
            priority=_integer(params, "priority", 0),
            hw=bool(params.get("hw")),
            **({"file_copy": _text(params, "file_copy")} if params.get("file_copy") else {}),
            **({"maxactive": _integer(params, "maxactive", 0)} if params.get("maxactive") else {}),
        )
        if not checked:
            await self._check_added_probe(probe)
        self._remember(probe, "break", params)
        return probe.info()

    async def watch(self, params: dict[str, Any]) -> dict[str, Any]:
        checked = self._check_new_probe(params)
        probe = await self.engine.add_watch(
            _text(params, "spec", required=True),
            length=_integer(params, "length", None),
            access=_text(params, "access") or "w",
            name=_text(params, "name"),
            pre=_fetchargs(params, "pre") or None,
            post=_fetchargs(params, "post"),
            condition=_text(params, "condition"),
            priority=_integer(params, "priority", 0),
        )
        if not checked:
            await self._check_added_probe(probe)
        self._remember(probe, "watch", params)
        return probe.info()

    async def rm(self, params: dict[str, Any]) -> dict[str, Any]:
        if params.get("all"):
            return {"removed": await self.engine.remove_all()}
        await self.engine.remove_probe(_ref(params))
        return {"removed": 1}

    async def enable(self, params: dict[str, Any]) -> dict[str, Any]:
        ref = _ref(params)
        await self.engine.enable_probe(ref)
        return self.engine.find_probe(ref).info()

    async def disable(self, params: dict[str, Any]) -> dict[str, Any]:
        ref = _ref(params)
        await self.engine.disable_probe(ref)
        return self.engine.find_probe(ref).info()

    async def list(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        return [p.info() for p in self.engine.probes()]

    async def stats(self, params: dict[str, Any]) -> dict[str, Any]:
        stats = self.engine.stats()
        hub_stats = getattr(self.engine.hub, "stats", None)
        if hub_stats is not None:
            stats = {**stats, **{f"buffer_{k}": v for k, v in hub_stats().items()}}
        return stats

    async def status(self, params: dict[str, Any]) -> dict[str, Any]:
        return self.engine.status()

    async def hooks(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        return self.engine.hooks(_text(params, "glob") or "*")

    async def symbols(self, params: dict[str, Any]) -> Any:
        """Without params, the loaded files; with `{"file": "NAME@BIAS"}`, relocate that file."""
        file_arg = _text(params, "file")
        if file_arg:
            name, bias = parse_file_arg(file_arg)
            moved = await self.engine.set_bias(name, bias)
            return {"file": name, "bias": bias, "moved": [p.info() for p in moved]}
        return [
            {"name": f.name, "path": str(f.path), "bias": f"{f.bias:#x}", "symbols": len(f), **_slide_of(self.engine, f)}
            for f in self.engine.symbols.files()
        ]

    async def resume(self, params: dict[str, Any]) -> dict[str, Any]:
        await self.engine.resume()
        return {"state": "running"}

    # -- checks before a probe is added, and the state file after a change -----------------------------

    def _check_new_probe(self, params: dict[str, Any]) -> bool:
        """Refuse a bad name, and fetch args whose worst-case record is over the limit, before the engine
        stops the guest for the probe. False when the args need the kernel's types (BTF), which only the
        engine loads: then `_check_added_probe` checks the probe it made."""
        name = _text(params, "name")
        if name is not None:
            check_probe_name(name)
        arch = getattr(self.engine, "arch", None)
        if arch is None:
            return True  # not attached (the engine says so), or a stand-in engine
        from probed.lang.fetch import FetchEnv, TypesNeeded, parse_fetchargs

        fields = []
        for key in ("pre", "post"):
            args = _fetchargs(params, key)
            if args:
                retprobe = bool(params.get("retprobe")) or str(params.get("spec", "")).endswith("%return")
                env = FetchEnv(retprobe=key == "pre" and retprobe)  # ($retval is a return probe's)
                try:
                    fields += parse_fetchargs(args, arch, self.engine.symbols, env).fields_spec
                except TypesNeeded:
                    return False
        check_record_size(fields, self.max_record_bytes)
        return True

    async def _check_added_probe(self, probe: Any) -> None:
        """The record-size check of a probe whose fetch args needed the kernel's types; refused, it goes."""
        fields = [f for h in (probe.pre, probe.post) if h is not None and hasattr(h, "program")
                  for f in h.program.fields_spec]
        try:
            check_record_size(fields, self.max_record_bytes)
        except RecordTooLarge:
            await self.engine.remove_probe(probe.id)
            raise

    def _remember(self, probe: Any, kind: str, params: dict[str, Any]) -> None:
        if self.state is not None:
            self.state.added(probe, kind, params)

    def _save_state(self) -> None:
        if self.state is None:
            return
        try:
            self.state.changed()
        except OSError as exc:  # the change is made; only its saving failed: say so, keep serving
            log.error("cannot write the state file %s: %s", self.state.path, exc)

    # -- connections --------------------------------------------------------------------------------

    async def handle(self, stream: trio.abc.Stream) -> None:
        """Serve one client until it closes; a bad line gets an error response, never a crash.

        Args:
            stream: the client's connection; closed on return.
        """
        reader = _LineReader(stream)
        try:
            async with stream:
                while True:
                    line = await reader.readline()
                    if line is None:
                        return
                    if line.strip():
                        await self._one(stream, reader, line)
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away mid-reply; nothing to tell it
        except* Exception:
            # One connection's trouble must never take the daemon (and its probes) down.
            log.exception("control connection failed")

    async def _one(self, stream: trio.abc.Stream, reader: _LineReader, line: bytes) -> None:
        try:
            request = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            await _send(stream, _error(None, PARSE_ERROR, f"parse error: {exc}"))
            return
        if not isinstance(request, dict) or request.get("jsonrpc") != "2.0" or not isinstance(request.get("method"), str):
            await _send(stream, _error(None, INVALID_REQUEST, "not a JSON-RPC 2.0 request"))
            return
        rid, method, params = request.get("id"), request["method"], request.get("params") or {}
        if not isinstance(params, dict):
            await _send(stream, _error(rid, INVALID_PARAMS, "params must be an object"))
            return
        if method == "events":
            await self._events(stream, reader, rid, params)
            return
        fn = self.methods.get(method)
        if fn is None:
            await _send(stream, _error(rid, METHOD_NOT_FOUND, f"no method {method!r}"))
            return
        try:
            result = await fn(params)
        except (ProbedError, InvalidParams) as exc:
            await _send(stream, _refusal(rid, method, exc))
            return
        except Exception as exc:  # keep serving: one failed request must not kill the daemon
            log.exception("control method %s failed", method)
            await _send(stream, _error(rid, INTERNAL_ERROR, f"{type(exc).__name__}: {exc}"))
            return
        finally:
            if method in STATE_CHANGES:
                self._save_state()  # also after a refusal: a half-done change is saved as it stands
        await _send(stream, {"jsonrpc": "2.0", "id": rid, "result": result})

    async def _events(self, stream: trio.abc.Stream, reader: _LineReader, rid: Any, params: dict[str, Any]) -> None:
        """Stream the ring buffer's records, then new ones while following or until `count` are sent."""
        try:
            count = _integer(params, "count", None)
            if count is not None and count < 0:
                raise InvalidParams("count must not be negative")
            probe_id = None
            if params.get("probe") is not None:
                probe_id = self.engine.find_probe(_ref(params, "probe")).id
        except (ProbedError, InvalidParams) as exc:
            await _send(stream, _refusal(rid, "events", exc))
            return
        follow = bool(params.get("follow"))
        hub = self.engine.hub
        # The subscription and the ring's backlog are taken together (`EventHub.follow`): every record is in
        # exactly one of them. (Not by `seq`: a hit published late, e.g. parked while GDB held the guest,
        # comes after records with a higher `seq`.)
        sub, backlog = hub.follow(probe_id, maxsize=EVENTS_BUFFER)
        with sub:
            if count is not None:
                backlog = backlog[:count]
            for line in backlog:
                await _send_event(stream, line)
            sent = len(backlog)
            remaining = None if count is None else count - sent
            if (follow and remaining is None) or (remaining is not None and remaining > 0):
                more = await _stream_until_eof(stream, reader, sub, remaining)
                if more is None:
                    return  # the client closed: nobody to answer
                sent += more
            missed = sub.missed
        await _send(stream, {"jsonrpc": "2.0", "id": rid, "result": {"count": sent, "missed": missed}})


async def _stream_until_eof(
    stream: trio.abc.Stream, reader: _LineReader, sub: Any, limit: int | None
) -> int | None:
    """Send new records until `limit` are sent or the subscription ends; None if the client closed first.

    A following client may wait for hours between hits; watching for its end of file lets its subscription
    go as soon as it leaves rather than at the next hit.
    """
    sent = 0
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:

            async def cancel_on_eof() -> None:
                try:
                    await reader.wait_eof()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # reset rather than closed: gone all the same
                scope.cancel()

            nursery.start_soon(cancel_on_eof)
            async for line in sub.lines():
                await _send_event(stream, line)
                sent += 1
                if limit is not None and sent >= limit:
                    break
            nursery.cancel_scope.cancel()
    return None if scope.cancelled_caught else sent


class _LineReader:
    """Newline-delimited requests off a stream, with a bound on a line's length."""

    def __init__(self, stream: trio.abc.Stream):
        self._stream = stream
        self._buf = bytearray()
        self._eof = False

    async def readline(self) -> bytes | None:
        """The next line without its newline; the unterminated rest at EOF; None at EOF."""
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line = bytes(self._buf[:nl])
                del self._buf[: nl + 1]
                return line
            if self._eof or not await self._fill():
                line, self._buf = bytes(self._buf), bytearray()
                return line or None

    async def wait_eof(self) -> None:
        """Return when the peer closes; what it sends meanwhile is kept for `readline`."""
        while not self._eof and await self._fill():
            pass

    async def _fill(self) -> bool:
        if len(self._buf) > MAX_LINE:
            raise trio.BrokenResourceError(f"request line longer than {MAX_LINE} bytes")
        data = await self._stream.receive_some(65536)
        if not data:
            self._eof = True
            return False
        self._buf += data
        return True


def _slide_of(engine: Any, sf: Any) -> dict[str, str]:
    """`{"slide": "0x..."}` for the Linux kernel's symbol files (the KASLR slide the daemon found), else {}."""
    linux = getattr(engine, "linux", None)
    if linux is None or linux.slide is None or not linux.is_kernel_file(sf.name):
        return {}
    return {"slide": f"{linux.slide:#x}"}


def _text(params: dict[str, Any], key: str, *, required: bool = False) -> str | None:
    value = params.get(key)
    if value is None or value == "":
        if required:
            raise InvalidParams(f"missing {key!r}")
        return None
    if not isinstance(value, str):
        raise InvalidParams(f"{key!r} must be a string, not {value!r}")
    return value


def _integer(params: dict[str, Any], key: str, default: int | None) -> int | None:
    value = params.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParams(f"{key!r} must be an integer, not {value!r}")
    return value


def _fetchargs(params: dict[str, Any], key: str) -> list[str] | None:
    value = params.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidParams(f"{key!r} must be a list of fetch args (strings), not {value!r}")
    return value


def _ref(params: dict[str, Any], key: str = "ref") -> int | str:
    """A probe's id or name; a string of digits is an id."""
    ref = params.get(key)
    if isinstance(ref, bool) or not isinstance(ref, int | str) or ref == "":
        raise InvalidParams(f"{key!r} must be a probe id or name, not {ref!r}")
    return int(ref) if isinstance(ref, str) and ref.isdigit() else ref


def _refusal(rid: Any, method: str, exc: ProbedError | InvalidParams) -> dict[str, Any]:
    """The error response for a request the engine refused or whose params are wrong."""
    if isinstance(exc, ProbedError):
        return _error(rid, exc.code, str(exc), exc.data())
    return _error(rid, INVALID_PARAMS, f"bad params for {method}: {exc}")


def _error(rid: Any, code: int, message: str, data: Any = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        err["data"] = data
    return {"jsonrpc": "2.0", "id": rid, "error": err}


async def _send(stream: trio.abc.Stream, obj: dict[str, Any]) -> None:
    await stream.send_all(json.dumps(obj, default=repr).encode() + b"\n")


async def _send_event(stream: trio.abc.Stream, record_json: str) -> None:
    """One record as a notification; `record_json` is the record's JSON as the hub encoded it at publish."""
    line = '{"jsonrpc": "2.0", "method": "event", "params": ' + record_json + "}\n"
    await stream.send_all(line.encode())


async def serve_control(
    engine: EngineAPI, path: str | os.PathLike, *, state: Any = None, max_record_bytes: int = MAX_RECORD_BYTES,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the control socket at `path` (owner-only) until cancelled; removes the socket file at exit.

    Args:
        engine: what the requests act on (see `ControlServer`).
        path: the socket's path; its directory is made owner-only if it does not exist (and refused if it
            is not the user's alone).
        state, max_record_bytes: see `ControlServer`.
        task_status: `started(path)` once the socket listens.

    Raises:
        SocketInUse: another daemon already listens there.
    """
    path = Path(path)
    prepare_socket_path(path)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    # The umask closes the window between bind() creating the file and chmod() narrowing it.
    old = os.umask(0o177)
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old)
    try:
        os.chmod(path, 0o600)
        sock.listen(16)
        server = ControlServer(engine, state=state, max_record_bytes=max_record_bytes)
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, server.handle, [trio.SocketListener(sock)])
            task_status.started(path)
    finally:
        sock.close()
        path.unlink(missing_ok=True)
