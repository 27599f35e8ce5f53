"""kprobe_events files and an engine: lines applied (all or none, errors by line and column), probes
written back as lines (`probectl load`, `probectl save`)."""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterable
from typing import Any

from probed.engine.uprobes import USER_MAXACTIVE
from probed.errors import FetchSyntaxError, ProbedError
from probed.front.kprobe_events import (
    GOOD_NAME,
    KPROBE_GROUP,
    MAX_EVENT_NAME,
    UPROBE_GROUP,
    EventLine,
    EventsFileError,
    split_return,
)

__all__ = ["accepts", "apply_lines", "format_probe", "save_text"]


def accepts(fn: Any, parameter: str) -> bool:
    """Whether `fn` takes a keyword `parameter` (how a front end learns what the engine can do)."""
    try:
        return parameter in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _engine_kwargs(engine: Any, ev: EventLine) -> dict[str, Any]:
    """The keyword arguments of `engine.add_probe` for a line; refuses what the engine cannot do yet."""
    kwargs: dict[str, Any] = {"name": ev.name, "pre": list(ev.fetchargs)}
    if ev.retprobe:
        if not accepts(engine.add_probe, "retprobe"):
            raise ev.error(1, "return probes (r lines, %return) are not supported by this probed yet")
        kwargs["retprobe"] = True
        if ev.maxactive is not None:
            kwargs["maxactive"] = ev.maxactive
    if ev.user:
        # The engine takes `/PATH:OFFSET` as it is: a user probe on that file (probed.engine.uprobes).
        if ev.ref_ctr is not None:
            raise ev.error(_target_column(ev), "uprobe reference counters (PATH:OFFSET(REF)) are not supported")
    return kwargs


def _target_column(ev: EventLine) -> int:
    m = re.search(r"\S+\s+", ev.text)
    return m.end() + 1 if m else 1


async def apply_lines(engine: Any, commands: Iterable[EventLine], groups: dict[int, str],
                      source: str | None = None) -> dict[str, list[Any]]:
    """Carry out parsed commands in order: every line is checked first, then all apply, or none.

    Args:
        engine: the engine whose probes they add and remove.
        commands: from `parse_text`.
        groups: probe id -> group, kept by the caller for `save_text`; updated here.
        source: the file's name, for the errors.

    Returns:
        `{"added": [probe info...], "removed": [names...]}`.

    Raises:
        EventsFileError: a line the engine refuses (an unknown symbol, a bad fetch arg, a name in use, a
            missing event, a kind of probe this probed does not have); nothing has changed then.
    """
    commands = list(commands)
    try:
        _check(engine, commands, groups)
    except EventsFileError as exc:
        raise EventsFileError(exc.line, exc.column, exc.text, exc.reason, source) from None
    added: list[Any] = []
    removed: list[str] = []
    current: EventLine | None = None
    try:
        for current in commands:
            if current.action == "remove":
                probe = engine.find_probe(current.event)
                await engine.remove_probe(probe.id)
                groups.pop(probe.id, None)
                removed.append(current.event)
                continue
            probe = await engine.add_probe(current.target, **_engine_kwargs(engine, current))
            groups[probe.id] = current.group or current.default_group
            added.append(probe)
    except ProbedError as exc:
        for probe in added:  # all or nothing: what this file added goes again
            groups.pop(probe.id, None)
            try:
                await engine.remove_probe(probe.id)
            except ProbedError:
                pass
        assert current is not None
        raise EventsFileError(current.line, _column_of(current, exc), current.text, _reason(exc), source) from None
    return {"added": [p.info() for p in added], "removed": removed}


def _check(engine: Any, commands: list[EventLine], groups: dict[int, str]) -> None:
    """Everything that can be known before changing anything: names, symbols, fetch args, features."""
    from probed.lang.fetch import FetchEnv, TypesNeeded
    from probed.lang.handlers import make_handler

    names = {p.name: groups.get(p.id) or (UPROBE_GROUP if p.kind == "user" else KPROBE_GROUP) for p in engine.probes()}
    for ev in commands:
        if ev.action == "remove":
            if ev.event not in names or (ev.group and names[ev.event] != ev.group):
                where = f"{ev.group}/{ev.event}" if ev.group else ev.event
                raise ev.error(_name_column(ev), f"no event {where} to remove")
            del names[ev.event]
            continue
        if ev.name in names:
            raise ev.error(_name_column(ev), f"an event named {ev.name!r} exists already")
        _engine_kwargs(engine, ev)
        try:
            if not ev.user:
                engine.symbols.resolve(ev.target)
            make_handler(list(ev.fetchargs), engine.arch, engine.symbols,
                         FetchEnv(retprobe=ev.retprobe, user=ev.user))
        except TypesNeeded:
            pass  # typed args (BTF) are checked by the engine, which loads the kernel's types
        except ProbedError as exc:
            raise ev.error(_column_of(ev, exc), _reason(exc)) from None
        names[ev.name] = ev.group or ev.default_group


def _name_column(ev: EventLine) -> int:
    colon = ev.text.find(":")
    if ev.event is None or colon < 0:
        return 1
    return ev.text.find(ev.event, colon) + 1


def _column_of(ev: EventLine, exc: Exception) -> int:
    """Where on the line an engine error points: a fetch arg's own column, else the target."""
    if isinstance(exc, FetchSyntaxError) and exc.text in ev.fetchargs:
        return ev.columns[ev.fetchargs.index(exc.text)] + exc.column - 1
    if isinstance(exc, EventsFileError):
        return exc.column
    return _target_column(ev)


def _reason(exc: Exception) -> str:
    if isinstance(exc, FetchSyntaxError | EventsFileError):
        return exc.reason
    return str(exc)


# -- writing probes back ------------------------------------------------------------------------------


def format_probe(probe: Any, group: str | None = None) -> list[str]:
    """A probe as kprobe_events lines; what that syntax cannot say is written as `# probed:` comments. A user
    probe added by symbol is written at its file offset (uprobe_events' PATH:OFFSET).

    Args:
        probe: a `probed.engine.probes.Probe` (its `spec`, `name`, `pre`, and `retprobe`/`maxactive` when
            the engine has return probes).
        group: the group it was loaded under, else the default.
    """
    if probe.kind == "watch":
        return [f"# probed: watch probe {probe.name} on {probe.spec} ({probe.access}, {probe.length} bytes) "
                "has no kprobe_events form"]
    spec, percent_return = split_return(probe.spec)
    retprobe = bool(getattr(probe, "retprobe", False)) or percent_return
    user = probe.kind == "user"
    group = group or (UPROBE_GROUP if user else KPROBE_GROUP)
    head = "r" if retprobe else "p"
    maxactive = getattr(probe, "maxactive", None)
    if retprobe and maxactive and not (user and maxactive == USER_MAXACTIVE):  # (uprobe_events has no rN)
        head += str(maxactive)
    name = probe.name if GOOD_NAME.match(probe.name) and len(probe.name) <= MAX_EVENT_NAME else None
    head += f":{group}/{name}" if name else (f":{group}/" if group not in (KPROBE_GROUP, UPROBE_GROUP) else "")
    notes = []
    if user and getattr(probe.location, "symbol", None):
        # uprobe_events takes a file offset only: the one the symbol resolved to (the probe is that offset).
        notes.append(f"added as {spec}")
        spec = f"{spec.rsplit(':', 1)[0]}:{probe.address:#x}"
    words = [head, spec]
    pre_args = getattr(probe.pre, "args", None)
    if probe.pre is not None and pre_args is None:
        notes.append(f"a Python pre-handler ({probe.pre.description})")
    words += list(pre_args or ())
    if probe.post is not None:
        post_args = getattr(probe.post, "args", None)
        notes.append("--post " + " ".join(post_args) if post_args is not None else "a Python post-handler")
    if probe.condition is not None:
        notes.append(f"--if {probe.condition.expr!r}")
    if probe.hw:
        notes.append("--hw")
    if probe.priority:
        notes.append(f"--priority {probe.priority}")
    if not probe.enabled:
        notes.append("disabled")
    lines = [" ".join(words)]
    if notes:
        lines.insert(0, f"# probed: {probe.name}: " + "; ".join(notes) + " (not in kprobe_events syntax)")
    return lines


def save_text(probes: Iterable[Any], groups: dict[int, str]) -> str:
    """Every probe as a kprobe_events file (see `format_probe`)."""
    lines = [line for p in probes for line in format_probe(p, groups.get(p.id))]
    return "".join(line + "\n" for line in lines)
