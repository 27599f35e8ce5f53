"""The state file: the daemon's probes and symbol files, kept on disk so a restarted probed re-arms them.

What it holds (JSON, version 1): each symbol file's path and bias, and each probe added through the control
socket with what it was added with (kind, spec, name, fetch args, filter, priority, hw, watch length and
access) and whether it is enabled. A user probe by symbol (`/PATH:SYMBOL`) keeps the file offset the symbol
resolved to and the host copy it was named with: it comes back at that offset, copy or not (uprobe_events
keeps offsets too); the copy, while it still agrees, only names places. Counters (hits, missed...) are not
kept: a restarted daemon counts from zero, and its records' `seq` start again at 1.

It is written on every change, atomically: a new file beside it (mode 0600, `O_EXCL`, no symlink followed),
fsync'd, renamed over the old one, and the directory fsync'd, so a crash at any point leaves either the old
state or the new one. Its directory must be private (see `probed.front.paths`); a file that is not a regular
file of the user's, writable only by them, is refused. A file that does not parse is moved aside
(`NAME.bad`) with a warning, so a daemon restarted in a loop is not kept down by it.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

import trio

from probed.errors import ProbedError
from probed.front.names import check_probe_name
from probed.front.paths import UnsafePath, make_private_dir

__all__ = ["STATE_VERSION", "ProbeState", "default_state_path", "read_state", "write_state"]

log = logging.getLogger(__name__)

STATE_VERSION = 1
CHECK_SECONDS = 1.0  # how often changes the engine makes itself (a probe disabled for faults) are looked for


def default_state_path(control: Path) -> Path:
    """The state file beside the control socket."""
    return control.parent / "state.json"


def read_state(path: Path) -> dict[str, Any] | None:
    """The saved state, or None when there is none (or it did not parse and was moved aside).

    Raises:
        UnsafePath: the file or its directory could be changed by another user, or it is a symlink.
    """
    make_private_dir(path.parent)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if os.path.islink(path):
            raise UnsafePath(path, "the state file is a symlink (not followed)") from exc
        raise
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePath(path, "the state file is not a regular file")
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise UnsafePath(path, "the state file is another user's or writable by others")
        data = f.read()
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("version") != STATE_VERSION:
            raise ValueError(f"not a version {STATE_VERSION} state")
        if not isinstance(doc.get("probes", []), list) or not isinstance(doc.get("symbols", []), list):
            raise ValueError("probes and symbols must be lists")
    except (ValueError, UnicodeDecodeError) as exc:
        aside = path.with_name(path.name + ".bad")
        os.replace(path, aside)
        log.warning("state file %s unusable (%s): moved to %s, starting without probes", path, exc, aside)
        return None
    return doc


def write_state(path: Path, doc: dict[str, Any]) -> None:
    """Replace the state file atomically (see the module docstring)."""
    data = json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        os.unlink(tmp)  # left by a crash of this same pid number: ours to remove (a plain file, no symlink)
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(data)
            f.flush()
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dirfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


class ProbeState:
    """Keeps the state file in step with an engine's probes and symbol files.

    The control server reports what each probe was added with (`added`) and calls `changed` after every
    request that changes something; `watch` catches what the engine changes by itself.

    Args:
        engine: the `Engine`.
        path: the state file.
    """

    def __init__(self, engine: Any, path: Path):
        self.engine = engine
        self.path = path
        self._specs: dict[int, dict[str, Any]] = {}
        self._written: dict[str, Any] | None = None
        self.writes = 0

    def added(self, probe: Any, kind: str, params: dict[str, Any]) -> None:
        """Remember what `probe` was added with (`kind` "break" or "watch"; params as the control socket took
        them)."""
        spec = {
            "kind": kind,
            "spec": probe.spec,
            "pre": params.get("pre"),
            "post": params.get("post"),
            "condition": params.get("condition"),
            "priority": params.get("priority", 0),
        }
        if kind == "watch":
            spec.update(length=probe.length, access=probe.access)
        elif getattr(probe, "kind", None) == "user" and probe.location.symbol:
            spec.update(file_offset=probe.address, file_copy=params.get("file_copy"))
        else:
            spec["hw"] = bool(params.get("hw"))
            if getattr(probe, "retprobe", False):
                spec.update(retprobe=True, maxactive=int(params.get("maxactive") or 0))
        self._specs[probe.id] = spec

    def snapshot(self) -> dict[str, Any]:
        """The state as it is now."""
        probes = []
        for probe in self.engine.probes():
            spec = self._specs.get(probe.id)
            if spec is None:
                continue  # added by other means (the Python API): nothing to re-add it from
            probes.append({"id": probe.id, "name": probe.name, "enabled": bool(probe.enabled), **spec})
        self._specs = {p["id"]: self._specs[p["id"]] for p in probes}
        symbols = [{"path": str(f.path), "name": f.name, "bias": f.bias} for f in self.engine.symbols.files()]
        return {"version": STATE_VERSION, "symbols": symbols, "probes": probes}

    def changed(self) -> None:
        """Write the state file if the state differs from what was last written."""
        doc = self.snapshot()
        if doc == self._written:
            return
        write_state(self.path, doc)
        self._written = doc
        self.writes += 1

    async def watch(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Write changes the engine makes by itself (a probe disabled after faults) until cancelled."""
        task_status.started()
        while True:
            await trio.sleep(CHECK_SECONDS)
            try:
                self.changed()
            except OSError as exc:
                log.error("cannot write the state file %s: %s", self.path, exc)

    async def restore(self, doc: dict[str, Any]) -> tuple[int, list[str]]:
        """Load the saved symbol files and biases, then re-add every saved probe (ids kept where the engine
        allows). Returns how many probes came back and the errors of those that did not."""
        engine = self.engine
        errors: list[str] = []
        loaded = {str(f.path): f for f in engine.symbols.files()}
        for entry in doc.get("symbols", []):
            try:
                path, bias = str(entry["path"]), int(entry["bias"])
                if path in loaded:
                    if loaded[path].bias != bias:
                        engine.symbols.set_bias(loaded[path].name, bias)
                else:
                    engine.symbols.add_file(path, bias=bias, name=entry.get("name"))
            except (KeyError, TypeError, ValueError, OSError, ProbedError) as exc:
                errors.append(f"symbol file {entry!r}: {exc}")
        restored = 0
        for entry in sorted(doc.get("probes", []), key=lambda e: e.get("id", 0) if isinstance(e, dict) else 0):
            try:
                probe = await self._readd(entry)
            except (KeyError, TypeError, ValueError, ProbedError) as exc:
                errors.append(f"probe {entry.get('name') if isinstance(entry, dict) else entry!r}: {exc}")
                continue
            restored += 1
            if not entry.get("enabled", True):
                await engine.disable_probe(probe.id)
        self.changed()
        return restored, errors

    async def _readd(self, entry: dict[str, Any]) -> Any:
        engine = self.engine
        name = str(entry["name"])
        check_probe_name(name)
        table = getattr(engine, "table", None)
        pid = entry.get("id")
        # Keep the probe's id (scripts name probes by id) when the engine's next id allows it.
        if isinstance(pid, int) and hasattr(table, "_next_id") and pid >= table._next_id:
            table._next_id = pid
        common = dict(name=name, pre=entry.get("pre"), post=entry.get("post"), condition=entry.get("condition"),
                      priority=int(entry.get("priority") or 0))
        if entry.get("kind") == "watch":
            probe = await engine.add_watch(entry["spec"], length=entry.get("length"), access=entry.get("access") or "w",
                                           **common)
        else:
            returns = {"retprobe": True, "maxactive": int(entry.get("maxactive") or 0)} if entry.get("retprobe") else {}
            user = {"file_offset": int(entry["file_offset"]), "file_copy": entry.get("file_copy")} \
                if entry.get("file_offset") is not None else {}
            probe = await engine.add_probe(entry["spec"], hw=bool(entry.get("hw")), **returns, **user, **common)
        self.added(probe, entry.get("kind") or "break", entry)
        return probe
