"""The control socket and probectl against an in-memory stand-in engine (no QEMU needed).

The stand-in does what the control layer needs of an engine: it keeps probes in a dict, raises the engine's
typed errors for a few known-bad inputs, and publishes records into a real `EventHub`. End-to-end tests
against a real guest are in test_cli.py.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from probed import __version__
from probed.engine.api import EngineAPI, protocol_mismatches
from probed.engine.engine import Engine
from probed.errors import NotFound, UnknownSymbol
from probed.front import cli
from probed.front.control import SocketInUse, default_control_path, serve_control
from probed.records.events import EventHub

# -- the stand-in engine ------------------------------------------------------------------------------------


class StandInProbe:
    def __init__(self, pid: int, spec: str, name: str | None):
        self.id = pid
        self.spec = spec
        self.name = name or spec
        self.address = 0x100000 + pid * 0x10
        self.state = "enabled"

    def info(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "spec": self.spec, "address": f"{self.address:#x}",
                "hits": 0, "missed": 0, "faults": 0, "state": self.state}


class StandInSymbolFile:
    def __init__(self, name: str, bias: int = 0):
        self.name, self.path, self.bias = name, Path(f"/images/{name}.elf"), bias

    def __len__(self) -> int:
        return 42


class StandInSymbols:
    def __init__(self):
        self.file = StandInSymbolFile("guest")

    def files(self) -> list[StandInSymbolFile]:
        return [self.file]


class StandInEngine:
    """Records each call's arguments in `calls`; raises like the engine for `probe_targt` and `boom`."""

    def __init__(self):
        self.hub = EventHub(buffer=16)
        self.symbols = StandInSymbols()
        self.table: dict[int, StandInProbe] = {}
        self.calls: list[tuple[str, str, dict[str, Any]]] = []
        self.state = "stopped"

    # The methods have the engine's signatures (`EngineAPI`; test_the_stand_in_has_the_engines_api).

    async def add_probe(
        self,
        spec: str,
        *,
        name: str | None = None,
        pre: Any = None,
        post: Any = None,
        condition: str | None = None,
        priority: int = 0,
        hw: bool = False,
        internal: bool = False,
        file_copy: str | None = None,
        file_offset: int | None = None,
        retprobe: bool = False,
        maxactive: int = 0,
        timeout: float | None = None,
    ) -> StandInProbe:
        kw = {"name": name, "pre": pre, "post": post, "condition": condition, "priority": priority, "hw": hw}
        if file_copy is not None:
            kw["file_copy"] = file_copy
        if file_offset is not None:
            kw["file_offset"] = file_offset
        if retprobe or maxactive:
            kw.update(retprobe=retprobe, maxactive=maxactive)
        return self._add("add_probe", spec, kw)

    async def add_watch(
        self,
        spec: str,
        *,
        length: int | None = None,
        access: str = "w",
        name: str | None = None,
        pre: Any = None,
        post: Any = None,
        condition: str | None = None,
        priority: int = 0,
        timeout: float | None = None,
    ) -> StandInProbe:
        kw = {"length": length, "access": access, "name": name, "pre": pre, "post": post, "condition": condition,
              "priority": priority}
        return self._add("add_watch", spec, kw)

    def _add(self, method: str, spec: str, kw: dict[str, Any]) -> StandInProbe:
        if spec == "probe_targt":
            raise UnknownSymbol(spec, ["probe_target"])
        if spec == "boom":
            raise RuntimeError("the stand-in broke")
        self.calls.append((method, spec, kw))
        probe = StandInProbe(len(self.calls), spec, kw.get("name"))
        self.table[probe.id] = probe
        return probe

    def find_probe(self, ref: int | str) -> StandInProbe:
        for probe in self.table.values():
            if ref in (probe.id, probe.name):
                return probe
        raise NotFound(f"probe {ref!r}")

    async def remove_probe(self, ref: int | str) -> None:
        del self.table[self.find_probe(ref).id]

    async def remove_all(self) -> int:
        n = len(self.table)
        self.table.clear()
        return n

    async def enable_probe(self, ref: int | str) -> None:
        self.find_probe(ref).state = "enabled"

    async def disable_probe(self, ref: int | str) -> None:
        self.find_probe(ref).state = "disabled"

    def probes(self) -> list[StandInProbe]:
        return list(self.table.values())

    def stats(self) -> dict[str, Any]:
        return {"stops": 7, "hits": 5, "records": 5, "missed": 0,
                "slots": [{"slot": 0, "owner": "probe", "label": "w", "what": "watch 0x2000 len 4"}]}

    def status(self) -> dict[str, Any]:
        return {"target": "tcp:127.0.0.1:1234", "arch": "i386", "state": self.state, "uptime_s": 1.5,
                "probes": len(self.table)}

    def hooks(self, glob: str = "*") -> list[dict[str, Any]]:
        rows = [{"name": "probe_target", "address": "0x100010", "size": 12, "handlers": []},
                {"name": "elsewhere", "address": "0x100020", "size": 8, "handlers": []}]
        return [r for r in rows if glob in ("*", r["name"])]

    async def resume(self) -> None:
        self.state = "running"

    async def hold(self) -> None:
        self.state = "stopped"

    async def set_bias(self, file: str, bias: int) -> list[StandInProbe]:
        if file != self.symbols.file.name:
            raise NotFound(f"symbol file {file!r}")
        self.symbols.file.bias = bias
        return self.probes()

    def publish(self, probe: StandInProbe, seq: int) -> dict[str, Any]:
        record = {"probe": probe.id, "name": probe.name, "seq": seq, "cpu": 0, "pc": "0x100010",
                  "where": "probe_target", "pre": {"a": seq, "name": "beta"}, "post": None, "error": None}
        self.hub.publish(record)
        return record


def test_the_stand_in_has_the_engines_api():
    # The control socket is written against `EngineAPI`; the real engine and this stand-in both have it.
    assert protocol_mismatches(EngineAPI, StandInEngine()) == []
    assert protocol_mismatches(EngineAPI, Engine("tcp:127.0.0.1:1")) == []


def test_a_drifted_stand_in_is_caught():
    class Drifted(StandInEngine):
        async def add_probe(self, spec: str, **kw: Any) -> StandInProbe:  # the stand-in's old signature
            return self._add("add_probe", spec, kw)

        def remove_all(self) -> int:  # sync where the engine's is async
            return 0

    problems = protocol_mismatches(EngineAPI, Drifted())
    assert [p.split(":")[0] for p in problems] == ["add_probe", "remove_all"]


# -- fixtures and a small client ------------------------------------------------------------------------


@pytest.fixture
def sock_path() -> Iterator[Path]:
    # A short directory: a unix socket's path must fit in 108 bytes, and pytest's tmp_path may not.
    with tempfile.TemporaryDirectory(prefix="pctl") as tmp:
        yield Path(tmp) / "ctl" / "control.sock"


@pytest.fixture
async def engine(nursery, sock_path) -> StandInEngine:
    engine = StandInEngine()
    await nursery.start(serve_control, engine, sock_path)
    return engine


class RpcClient:
    def __init__(self, stream: trio.SocketStream):
        self.stream = stream
        self.buf = b""
        self.next_id = 0

    @classmethod
    async def connect(cls, path: Path) -> RpcClient:
        return cls(await trio.open_unix_socket(str(path)))

    async def send_line(self, line: bytes) -> None:
        await self.stream.send_all(line + b"\n")

    async def send(self, method: str, params: Any = None) -> int:
        self.next_id += 1
        await self.send_line(json.dumps({"jsonrpc": "2.0", "id": self.next_id, "method": method,
                                         "params": params if params is not None else {}}).encode())
        return self.next_id

    async def read(self) -> dict[str, Any]:
        with trio.fail_after(10):
            while b"\n" not in self.buf:
                data = await self.stream.receive_some(65536)
                assert data, "the server closed the connection"
                self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        return json.loads(line)

    async def call(self, method: str, params: Any = None) -> dict[str, Any]:
        rid = await self.send(method, params)
        reply = await self.read()
        assert reply["id"] == rid and reply["jsonrpc"] == "2.0"
        return reply

    async def result(self, method: str, params: Any = None) -> Any:
        reply = await self.call(method, params)
        assert "error" not in reply, reply
        return reply["result"]


@pytest.fixture
async def client(engine, sock_path) -> RpcClient:
    client = await RpcClient.connect(sock_path)
    yield client
    await client.stream.aclose()


# -- the methods ----------------------------------------------------------------------------------------


async def test_version(client):
    assert await client.result("version") == {"api": 1, "version": __version__}


async def test_add_passes_spec_and_handlers_through(client, engine):
    info = await client.result("add", {"spec": "probe_target", "name": "p", "pre": ["a=$arg1:s32"],
                                       "post": [], "condition": "a > 1", "priority": 3, "hw": True})
    assert info == {"id": 1, "name": "p", "spec": "probe_target", "address": "0x100010", "hits": 0,
                    "missed": 0, "faults": 0, "state": "enabled"}
    await client.result("add", {"spec": "elsewhere"})
    assert engine.calls == [
        ("add_probe", "probe_target",
         {"name": "p", "pre": ["a=$arg1:s32"], "post": [], "condition": "a > 1", "priority": 3, "hw": True}),
        # post=None (no post handler) is not post=[] (a post handler that fetches nothing)
        ("add_probe", "elsewhere",
         {"name": None, "pre": None, "post": None, "condition": None, "priority": 0, "hw": False}),
    ]


async def test_add_passes_the_return_flag(client, engine):
    await client.result("add", {"spec": "probe_target", "retprobe": True, "maxactive": 4, "pre": ["r=$retval"]})
    await client.result("add", {"spec": "elsewhere", "maxactive": 2})  # (the engine refuses it: not a return probe)
    assert [call[2].get("retprobe") for call in engine.calls] == [True, False]
    assert [call[2].get("maxactive") for call in engine.calls] == [4, 2]


async def test_watch_passes_length_and_access(client, engine):
    info = await client.result("watch", {"spec": "watched", "length": 4, "access": "rw", "pre": ["w=@writes:u32"]})
    assert info["id"] == 1 and info["spec"] == "watched"
    assert engine.calls == [("add_watch", "watched", {"length": 4, "access": "rw", "name": None,
                                                      "pre": ["w=@writes:u32"], "post": None, "condition": None,
                                                      "priority": 0})]


async def test_list_enable_disable_rm(client):
    await client.result("add", {"spec": "probe_target", "name": "one"})
    await client.result("add", {"spec": "elsewhere", "name": "two"})
    assert (await client.result("disable", {"ref": "one"}))["state"] == "disabled"
    assert (await client.result("enable", {"ref": "1"}))["state"] == "enabled"  # digits are an id
    await client.result("disable", {"ref": 2})
    assert [(p["id"], p["state"]) for p in await client.result("list")] == [(1, "enabled"), (2, "disabled")]
    assert await client.result("rm", {"ref": "two"}) == {"removed": 1}
    assert [p["name"] for p in await client.result("list")] == ["one"]
    assert await client.result("rm", {"all": True}) == {"removed": 1}
    assert await client.result("list") == []


async def test_stats_status_hooks_resume(client, engine):
    assert (await client.result("stats"))["stops"] == 7
    assert (await client.result("status"))["state"] == "stopped"
    assert await client.result("resume") == {"state": "running"}
    assert (await client.result("status"))["state"] == "running"
    assert [h["name"] for h in await client.result("hooks")] == ["probe_target", "elsewhere"]
    assert [h["name"] for h in await client.result("hooks", {"glob": "elsewhere"})] == ["elsewhere"]


async def test_symbols_lists_files_and_sets_a_bias(client, engine):
    assert await client.result("symbols") == [{"name": "guest", "path": "/images/guest.elf", "bias": "0x0",
                                               "symbols": 42}]
    await client.result("add", {"spec": "probe_target"})
    moved = await client.result("symbols", {"file": "guest@0x1000"})
    assert (moved["file"], moved["bias"], [p["id"] for p in moved["moved"]]) == ("guest", 0x1000, [1])
    assert engine.symbols.file.bias == 0x1000


# -- errors ---------------------------------------------------------------------------------------------


async def test_engine_errors_become_jsonrpc_errors(client):
    error = (await client.call("add", {"spec": "probe_targt"}))["error"]
    assert error == {"code": UnknownSymbol.code,
                     "message": "unknown symbol 'probe_targt'; did you mean probe_target?",
                     "data": {"type": "UnknownSymbol", "name": "probe_targt", "suggestions": ["probe_target"]}}
    error = (await client.call("rm", {"ref": "nothing"}))["error"]
    assert (error["code"], error["message"]) == (NotFound.code, "no probe 'nothing'")
    error = (await client.call("symbols", {"file": "guest@zz"}))["error"]
    assert error["data"]["type"] == "BadSpec" and "bad bias 'zz'" in error["message"]


async def test_an_unexpected_failure_is_an_internal_error_and_the_server_goes_on(client):
    assert (await client.call("add", {"spec": "boom"}))["error"] == {
        "code": -32603, "message": "RuntimeError: the stand-in broke"}
    assert (await client.result("version"))["api"] == 1


async def test_bad_requests_get_protocol_errors_on_the_same_connection(client):
    await client.send_line(b"{not json")
    reply = await client.read()
    assert (reply["id"], reply["error"]["code"]) == (None, -32700)
    await client.send_line(b"\n")  # blank lines are ignored
    await client.send_line(b'{"id": 5, "method": "list"}')
    assert (await client.read())["error"]["code"] == -32600  # no "jsonrpc": "2.0"
    await client.send_line(b'[1, 2]')
    assert (await client.read())["error"]["code"] == -32600
    assert (await client.call("frobnicate"))["error"] == {"code": -32601, "message": "no method 'frobnicate'"}
    assert (await client.call("list", [1]))["error"]["code"] == -32602
    assert (await client.call("add", {}))["error"] == {"code": -32602, "message": "bad params for add: missing 'spec'"}
    assert (await client.call("add", {"spec": "x", "priority": "high"}))["error"]["code"] == -32602
    assert (await client.call("add", {"spec": "x", "pre": "a=%ax"}))["error"]["code"] == -32602
    assert (await client.call("rm", {}))["error"]["code"] == -32602
    assert (await client.call("events", {"count": -1}))["error"]["code"] == -32602
    assert await client.result("list") == []


async def test_pipelined_requests_are_answered_in_order(client):
    await client.stream.send_all(b"".join(
        json.dumps({"jsonrpc": "2.0", "id": i, "method": m}).encode() + b"\n"
        for i, m in enumerate(["version", "list", "status"], start=1)))
    assert [(await client.read())["id"] for _ in range(3)] == [1, 2, 3]


# -- events ---------------------------------------------------------------------------------------------


async def read_events(client: RpcClient, n: int) -> list[dict[str, Any]]:
    out = []
    for _ in range(n):
        msg = await client.read()
        assert msg["method"] == "event" and "id" not in msg
        out.append(msg["params"])
    return out


async def test_events_sends_the_ring_buffer_then_a_count(client, engine):
    await client.result("add", {"spec": "probe_target"})
    records = [engine.publish(engine.table[1], seq) for seq in (1, 2, 3)]
    rid = await client.send("events", {})
    assert await read_events(client, 3) == records
    assert await client.read() == {"jsonrpc": "2.0", "id": rid, "result": {"count": 3, "missed": 0}}


async def test_events_count_waits_for_new_records(client, engine):
    await client.result("add", {"spec": "probe_target"})
    probe = engine.table[1]
    engine.publish(probe, 1)
    rid = await client.send("events", {"count": 3})
    assert [r["seq"] for r in await read_events(client, 1)] == [1]
    await trio.testing.wait_all_tasks_blocked()  # the server now waits on its subscription
    engine.publish(probe, 2)
    engine.publish(probe, 3)
    engine.publish(probe, 4)  # past the count: not sent
    assert [r["seq"] for r in await read_events(client, 2)] == [2, 3]
    assert await client.read() == {"jsonrpc": "2.0", "id": rid, "result": {"count": 3, "missed": 0}}


async def test_events_count_cuts_the_ring_buffer(client, engine):
    await client.result("add", {"spec": "probe_target"})
    for seq in (1, 2, 3):
        engine.publish(engine.table[1], seq)
    rid = await client.send("events", {"count": 2, "follow": True})
    assert [r["seq"] for r in await read_events(client, 2)] == [1, 2]
    assert (await client.read())["id"] == rid


async def test_events_of_one_probe_by_name(client, engine):
    await client.result("add", {"spec": "probe_target", "name": "one"})
    await client.result("add", {"spec": "elsewhere", "name": "two"})
    for seq in (1, 2):
        engine.publish(engine.table[1], seq)
        engine.publish(engine.table[2], seq)
    await client.send("events", {"probe": "two"})
    assert [(r["name"], r["seq"]) for r in await read_events(client, 2)] == [("two", 1), ("two", 2)]
    assert (await client.read())["result"]["count"] == 2
    assert (await client.call("events", {"probe": "three"}))["error"]["code"] == NotFound.code


async def test_following_ends_when_the_client_leaves(client, engine, sock_path):
    await client.result("add", {"spec": "probe_target"})
    probe = engine.table[1]
    engine.publish(probe, 1)
    await client.send("events", {"follow": True})
    await read_events(client, 1)
    await trio.testing.wait_all_tasks_blocked()
    engine.publish(probe, 2)
    assert [r["seq"] for r in await read_events(client, 1)] == [2]
    assert len(engine.hub._subscriptions) == 1
    await client.stream.aclose()
    await trio.testing.wait_all_tasks_blocked()
    # Its subscription went with it, before any further hit; the server serves others.
    assert len(engine.hub._subscriptions) == 0
    other = await RpcClient.connect(sock_path)
    assert (await other.result("version"))["api"] == 1
    await other.stream.aclose()


# -- the socket -----------------------------------------------------------------------------------------


async def test_socket_is_owner_only_and_removed_at_exit(sock_path):
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            assert await nursery.start(serve_control, StandInEngine(), sock_path) == sock_path
            assert stat.S_ISSOCK(os.stat(sock_path).st_mode)
            assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o600
            assert stat.S_IMODE(os.stat(sock_path.parent).st_mode) == 0o700
            scope.cancel()
    assert not sock_path.exists()


async def test_a_live_socket_is_refused(engine, sock_path):
    with pytest.raises(SocketInUse, match="another daemon listens on"):
        await serve_control(StandInEngine(), sock_path)
    assert sock_path.exists()  # the live daemon's socket is left alone


async def test_a_stale_socket_is_replaced(nursery, sock_path):
    sock_path.parent.mkdir(mode=0o700)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock_path))
    stale.close()  # the file stays; nobody listens
    await nursery.start(serve_control, StandInEngine(), sock_path)
    client = await RpcClient.connect(sock_path)
    assert (await client.result("version"))["api"] == 1
    await client.stream.aclose()


def test_default_control_path(monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert default_control_path() == Path("/run/user/1000/probed/control.sock")
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert default_control_path() == Path(f"/tmp/probed-{os.getuid()}/control.sock")


# -- probectl: parsing ----------------------------------------------------------------------------------


def test_post_takes_several_fetch_args():
    args = cli.parse_args(["add", "-n", "p", "probe_target", "a=$arg1", "b=$arg2", "--post", "A", "B", "C",
                           "--if", "a > 1"])
    assert (args.name, args.spec, args.fetchargs, args.post, args.condition) == (
        "p", "probe_target", ["a=$arg1", "b=$arg2"], ["A", "B", "C"], "a > 1")


def test_post_without_args_and_no_post():
    assert cli.parse_args(["add", "probe_target", "--post"]).post == []
    assert cli.parse_args(["add", "probe_target", "a=%ax"]).post is None


def test_fetch_args_may_follow_options():
    args = cli.parse_args(["watch", "watched", "--len", "4", "--access", "rw", "w=@writes:u32"])
    assert (args.spec, args.length, args.access, args.fetchargs) == ("watched", 4, "rw", ["w=@writes:u32"])
    args = cli.parse_args(["add", "--hw", "--priority", "2", "elsewhere", "a=$arg1:u32"])
    assert (args.hw, args.priority, args.spec, args.fetchargs) == (True, 2, "elsewhere", ["a=$arg1:u32"])


def test_usage_errors_exit_2(capsys):
    for argv in (["add"], ["rm"], ["rm", "1", "--all"], ["watch", "w", "--len", "3"], ["frobnicate"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2, argv
    capsys.readouterr()


def test_help_documents_the_exit_codes(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "exit codes:" in out and "3  no daemon at the control socket" in out


# -- probectl: against the stand-in ---------------------------------------------------------------------


async def probectl(sock_path: Path, *argv: str) -> int:
    """probectl in a thread (it blocks on its socket) while the server runs in this one."""
    return await trio.to_thread.run_sync(cli.main, ["--control", str(sock_path), *argv])


async def test_probectl_without_a_daemon_exits_3(sock_path, capsys):
    assert await probectl(sock_path, "list") == 3
    assert capsys.readouterr().err == f"probectl: no daemon at {sock_path} (is probed running?)\n"
    sock_path.parent.mkdir(mode=0o700)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock_path))
    stale.close()  # connection refused
    assert await probectl(sock_path, "status") == 3
    assert "no daemon at" in capsys.readouterr().err


async def test_probectl_add_list_rm(engine, sock_path, capsys):
    assert await probectl(sock_path, "add", "-n", "p", "probe_target", "a=$arg1", "--post", "A", "B") == 0
    assert capsys.readouterr().out == "1\n"
    assert engine.calls[0][2]["post"] == ["A", "B"]
    assert await probectl(sock_path, "watch", "watched", "--access", "r") == 0
    assert capsys.readouterr().out == "2\n"
    assert await probectl(sock_path, "list", "--json") == 0
    listing = json.loads(capsys.readouterr().out)
    assert [list(p) for p in listing] == [["id", "name", "spec", "address", "hits", "missed", "faults", "state"]] * 2
    assert await probectl(sock_path, "list") == 0
    table = capsys.readouterr().out
    assert "probe_target" in table and "watched" in table and "0x100010" in table
    assert await probectl(sock_path, "disable", "p") == 0
    assert engine.table[1].state == "disabled"
    assert await probectl(sock_path, "rm", "--all") == 0
    assert engine.table == {}
    assert await probectl(sock_path, "list") == 0
    assert capsys.readouterr().out == "no probes\n"


async def test_probectl_reports_daemon_errors_with_exit_1(engine, sock_path, capsys):
    assert await probectl(sock_path, "add", "probe_targt") == 1
    assert capsys.readouterr().err == "probectl: unknown symbol 'probe_targt'; did you mean probe_target?\n"
    assert await probectl(sock_path, "rm", "7") == 1
    assert capsys.readouterr().err == "probectl: no probe 7\n"


def test_suggestions_not_in_the_message_are_printed():
    error = cli.DaemonError({"code": 2, "message": "unknown symbol 'x'", "data": {"suggestions": ["xa", "xb"]}})
    assert error.explain() == "probectl: unknown symbol 'x'\nprobectl: did you mean: xa, xb"


async def test_probectl_refuses_another_api(engine, sock_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "API_VERSION", 2)
    assert await probectl(sock_path, "list") == 1
    assert capsys.readouterr().err == "probectl: the daemon speaks API 1, this probectl 2\n"


async def test_probectl_events(engine, sock_path, capsys):
    await engine.add_probe("probe_target", name="opens")
    records = [engine.publish(engine.table[1], seq) for seq in (1, 2)]
    assert await probectl(sock_path, "events", "--json") == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == records
    assert await probectl(sock_path, "events", "--probe", "opens", "--count", "1") == 0
    assert capsys.readouterr().out == '#1 opens cpu0 pc=0x100010 (probe_target) pre: a=1 name="beta"\n'


async def test_probectl_tables_and_symbols(engine, sock_path, capsys):
    assert await probectl(sock_path, "status", "--json") == 0
    assert json.loads(capsys.readouterr().out)["arch"] == "i386"
    assert await probectl(sock_path, "stats") == 0
    out = capsys.readouterr().out
    assert "stops" in out and "debug-register slots" in out and "watch 0x2000 len 4" in out
    assert await probectl(sock_path, "hooks", "elsewhere", "--json") == 0
    assert [h["name"] for h in json.loads(capsys.readouterr().out)] == ["elsewhere"]
    assert await probectl(sock_path, "symbols", "guest@0x2000") == 0
    assert capsys.readouterr().out == "guest relocated by 0x2000; moved: no probes\n"
    assert await probectl(sock_path, "resume") == 0
    assert engine.state == "running"
