"""The control socket: JSON-RPC 2.0 over a unix socket, one JSON object per line.

The socket is owner-only (mode 0600, in a 0700 directory). One method per verb; `version` first tells a
client which API it talks to. `events` streams: one `{"method": "event", "params": RECORD}` notification per
hit record, then (unless following) a final response with the count.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket as stdsocket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from . import __version__
from .errors import BadSpec, NotFound, ProbedError
from .events import encode_record
from .symbols import parse_file_arg

__all__ = ["API_VERSION", "ControlServer", "default_control_path", "serve_control"]

log = logging.getLogger(__name__)

API_VERSION = 1
PARSE_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, INVALID_PARAMS, INTERNAL_ERROR = -32700, -32600, -32601, -32602, -32603
MAX_LINE = 1 << 20


def default_control_path() -> Path:
    """`$XDG_RUNTIME_DIR/probed/control.sock`, else `/tmp/probed-$UID/control.sock`."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / "probed" if runtime else Path(f"/tmp/probed-{os.getuid()}")
    return base / "control.sock"


def prepare_socket_path(path: Path) -> None:
    """Make the owner-only directory; refuse a live daemon's socket; remove a stale one."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.exists() or path.is_socket():
        probe = stdsocket.socket(stdsocket.AF_UNIX)
        try:
            probe.connect(str(path))
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise
            path.unlink(missing_ok=True)  # stale: nobody listens
        else:
            raise ProbedError(f"another daemon listens on {path}; stop it or use --control")
        finally:
            probe.close()


class ControlServer:
    """Dispatches JSON-RPC requests to an engine."""

    def __init__(self, engine: Any):
        self.engine = engine
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

    # -- methods ------------------------------------------------------------------------------------

    async def version(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"api": API_VERSION, "version": __version__}

    async def add(self, params: dict[str, Any]) -> dict[str, Any]:
        probe = await self.engine.add_probe(
            _required(params, "spec"),
            name=params.get("name"),
            pre=params.get("pre") or None,
            post=params.get("post"),
            condition=params.get("condition"),
            priority=int(params.get("priority") or 0),
            hw=bool(params.get("hw")),
        )
        return probe.info()

    async def watch(self, params: dict[str, Any]) -> dict[str, Any]:
        probe = await self.engine.add_watch(
            _required(params, "spec"),
            length=params.get("length"),
            access=params.get("access") or "w",
            name=params.get("name"),
            pre=params.get("pre") or None,
            post=params.get("post"),
            condition=params.get("condition"),
        )
        return probe.info()

    async def rm(self, params: dict[str, Any]) -> dict[str, Any]:
        if params.get("all"):
            return {"removed": await self.engine.remove_all()}
        await self.engine.remove_probe(_ref(params))
        return {"removed": 1}

    async def enable(self, params: dict[str, Any]) -> dict[str, Any]:
        await self.engine.enable_probe(_ref(params))
        return self.engine.find_probe(_ref(params)).info()

    async def disable(self, params: dict[str, Any]) -> dict[str, Any]:
        await self.engine.disable_probe(_ref(params))
        return self.engine.find_probe(_ref(params)).info()

    async def list(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        return [p.info() for p in self.engine.probes()]

    async def stats(self, params: dict[str, Any]) -> dict[str, Any]:
        return self.engine.stats()

    async def status(self, params: dict[str, Any]) -> dict[str, Any]:
        return self.engine.status()

    async def hooks(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        return self.engine.hooks(params.get("glob") or "*")

    async def symbols(self, params: dict[str, Any]) -> Any:
        if params.get("file"):
            name, bias = parse_file_arg(params["file"])
            moved = await self.engine.set_bias(name, bias)
            return {"file": name, "bias": bias, "moved": [p.info() for p in moved]}
        return [
            {"name": f.name, "path": str(f.path), "bias": f"{f.bias:#x}", "symbols": len(f)}
            for f in self.engine.symbols.files()
        ]

    async def resume(self, params: dict[str, Any]) -> dict[str, Any]:
        await self.engine.resume()
        return {"state": "running"}

    # -- connections --------------------------------------------------------------------------------

    async def handle(self, stream: trio.SocketStream) -> None:
        """Serve one client until it closes; a bad line gets an error response, never a crash."""
        reader = _LineReader(stream)
        try:
            async with stream:
                while True:
                    line = await reader.readline()
                    if line is None:
                        return
                    if line.strip():
                        await self._one(stream, line)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return

    async def _one(self, stream: trio.SocketStream, line: bytes) -> None:
        try:
            request = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            await _send(stream, _error(None, PARSE_ERROR, f"parse error: {exc}"))
            return
        if not isinstance(request, dict) or request.get("jsonrpc") != "2.0" or "method" not in request:
            await _send(stream, _error(None, INVALID_REQUEST, "not a JSON-RPC 2.0 request"))
            return
        rid, method, params = request.get("id"), request["method"], request.get("params") or {}
        if not isinstance(params, dict):
            await _send(stream, _error(rid, INVALID_PARAMS, "params must be an object"))
            return
        if method == "events":
            await self._events(stream, rid, params)
            return
        fn = self.methods.get(method)
        if fn is None:
            await _send(stream, _error(rid, METHOD_NOT_FOUND, f"no method {method!r}"))
            return
        try:
            result = await fn(params)
        except ProbedError as exc:
            await _send(stream, _error(rid, exc.code, str(exc), exc.data()))
            return
        except (TypeError, ValueError, KeyError) as exc:
            await _send(stream, _error(rid, INVALID_PARAMS, f"bad params for {method}: {exc}"))
            return
        except Exception as exc:  # keep serving: one bad request must not kill the daemon
            log.exception("control method %s failed", method)
            await _send(stream, _error(rid, INTERNAL_ERROR, f"{type(exc).__name__}: {exc}"))
            return
        await _send(stream, {"jsonrpc": "2.0", "id": rid, "result": result})

    async def _events(self, stream: trio.SocketStream, rid: Any, params: dict[str, Any]) -> None:
        probe_id = None
        try:
            if params.get("probe") is not None:
                probe_id = self.engine.find_probe(params["probe"]).id
        except NotFound as exc:
            await _send(stream, _error(rid, exc.code, str(exc), exc.data()))
            return
        count = params.get("count")
        follow = bool(params.get("follow"))
        sent = 0
        hub = self.engine.hub
        with hub.subscribe(probe_id, maxsize=int(params.get("buffer") or 4096)) as sub:
            recent = hub.recent(probe_id)
            seen: dict[int, int] = {}
            for record in recent:
                if count is not None and sent >= count:
                    break
                await _send_event(stream, record)
                seen[record["probe"]] = max(seen.get(record["probe"], 0), record["seq"])
                sent += 1
            if follow or (count is not None and sent < count):
                async for record in sub:
                    if count is not None and sent >= count:
                        break
                    if record["seq"] <= seen.get(record["probe"], 0):
                        continue  # already sent from the ring buffer
                    await _send_event(stream, record)
                    sent += 1
                    if count is not None and sent >= count:
                        break
        await _send(stream, {"jsonrpc": "2.0", "id": rid, "result": {"count": sent, "missed": sub.missed}})


class _LineReader:
    def __init__(self, stream: trio.SocketStream):
        self._stream = stream
        self._buf = bytearray()

    async def readline(self) -> bytes | None:
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line = bytes(self._buf[:nl])
                del self._buf[: nl + 1]
                return line
            if len(self._buf) > MAX_LINE:
                raise trio.BrokenResourceError("request line too long")
            data = await self._stream.receive_some(65536)
            if not data:
                return bytes(self._buf) if self._buf else None
            self._buf += data


def _required(params: dict[str, Any], key: str) -> Any:
    if key not in params or params[key] in (None, ""):
        raise BadSpec(str(params.get(key)), f"missing parameter {key!r}")
    return params[key]


def _ref(params: dict[str, Any]) -> int | str:
    ref = _required(params, "ref")
    return int(ref) if isinstance(ref, str) and ref.isdigit() else ref


def _error(rid: Any, code: int, message: str, data: Any = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        err["data"] = data
    return {"jsonrpc": "2.0", "id": rid, "error": err}


async def _send(stream: trio.SocketStream, obj: dict[str, Any]) -> None:
    await stream.send_all(json.dumps(obj, default=repr).encode() + b"\n")


async def _send_event(stream: trio.SocketStream, record: dict[str, Any]) -> None:
    line = '{"jsonrpc": "2.0", "method": "event", "params": ' + encode_record(record) + "}\n"
    await stream.send_all(line.encode())


async def serve_control(engine: Any, path: str | os.PathLike, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve the control socket at `path` (owner-only) until cancelled; removes the socket file at exit.

    Raises:
        ProbedError: another daemon already listens there.
    """
    path = Path(path)
    prepare_socket_path(path)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(16)
    server = ControlServer(engine)
    try:
        async with trio.open_nursery() as nursery:
            listener = trio.SocketListener(sock)
            await nursery.start(trio.serve_listeners, server.handle, [listener])
            task_status.started(path)
    finally:
        path.unlink(missing_ok=True)
