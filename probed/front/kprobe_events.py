"""kprobe_events and uprobe_events lines, as tracefs takes them: parsed, applied to an engine, written back.

    p[:[GRP/][EVENT]] [MOD:]SYM[+OFFS]|MEMADDR [FETCHARGS]      a probe
    r[MAXACTIVE][:[GRP/][EVENT]] [MOD:]SYM[+0] [FETCHARGS]       a return probe
    p[:[GRP/][EVENT]] [MOD:]SYM[+0]%return [FETCHARGS]          a return probe, the newer spelling
    p[:[GRP/][EVENT]] PATH:OFFSET[(REF_CTR_OFFSET)] [FETCHARGS]  a user-space probe (uprobe_events)
    r[:[GRP/][EVENT]] PATH:OFFSET [FETCHARGS]                    a user-space return probe
    -:[GRP/]EVENT                                                remove a probe

`#` starts a comment (anywhere on a line, as tracefs strips it); blank lines are skipped. An event name
left out is made the way the kernel makes it (`p_do_sys_open_0`, `r_vfs_read_0`, `p_bash_0x4245c0`); the
group defaults to `kprobes` (`uprobes` for a PATH). Every error names its line and 1-based column.
Applying lines to an engine and writing probes back is `probed.front.probe_files`.

probed's own `MOD` is a loaded symbol file's name (`guest:probe_target`), which is what a module is to it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from probed.engine.returns import MAXACTIVE_MAX
from probed.errors import ProbedError
from probed.lang.fetch import kernel_number

__all__ = ["EventLine", "EventsFileError", "default_event_name", "parse_line", "parse_text", "split_return"]

KPROBE_GROUP, UPROBE_GROUP = "kprobes", "uprobes"
MAX_EVENT_NAME = 64  # MAX_EVENT_NAME_LEN in the kernel
MAX_ARGS = 128  # MAX_TRACE_ARGS

GOOD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_SYMBOL = re.compile(r"[A-Za-z_.][A-Za-z0-9_.$]*")
_NUMBER = re.compile(r"(0[xX][0-9a-fA-F]+|[0-9]+)\Z")
_UPROBE_TARGET = re.compile(r"(?P<path>[^:\s]+):(?P<offset>[^(\s%]+)(?:\((?P<ref>[^)]*)\))?\Z")


class EventsFileError(ProbedError):
    """A kprobe_events line that cannot be used: where (line, 1-based column) and why.

    Attributes:
        source: the file's name as the client gave it (`-` for stdin), or None.
        line, column, text, reason: where the problem is, the line itself, and what is wrong.
    """

    code = 14

    def __init__(self, line: int, column: int, text: str, reason: str, source: str | None = None):
        self.source, self.line, self.column, self.text, self.reason = source, line, column, text, reason
        where = f"{source}:{line}:{column}" if source else f"line {line}, column {column}"
        caret = " " * (max(column, 1) - 1) + "^"
        super().__init__(f"{where}: {reason}\n  {text}\n  {caret}")

    def data(self) -> dict[str, Any]:
        return {**super().data(), "source": self.source, "line": self.line, "column": self.column,
                "text": self.text, "reason": self.reason}


@dataclass(frozen=True)
class EventLine:
    """One parsed command.

    Attributes:
        action: "add" or "remove".
        retprobe: a return probe (`r`, or `%return`).
        maxactive: `rN`'s N, else None.
        group, event: as written (None when left out); `name` is the event name to use.
        target: what the probe goes on, without `%return`: `SYM+OFF`, `MOD:SYM`, `0xADDR` or `PATH:OFFSET`.
        user: the target is a file and an offset in it (a uprobe).
        ref_ctr: a uprobe's reference-counter offset, else None.
        fetchargs: the fetch args as written; `columns` their 1-based columns on the line.
    """

    line: int
    text: str
    action: str
    retprobe: bool = False
    maxactive: int | None = None
    group: str | None = None
    event: str | None = None
    target: str = ""
    user: bool = False
    ref_ctr: int | None = None
    fetchargs: tuple[str, ...] = ()
    columns: tuple[int, ...] = field(default=(), repr=False)

    @property
    def name(self) -> str:
        """The event's name: as written, else as the kernel would make it."""
        return self.event or default_event_name(self.target, self.retprobe, self.user)

    @property
    def default_group(self) -> str:
        return UPROBE_GROUP if self.user else KPROBE_GROUP

    def error(self, column: int, reason: str) -> EventsFileError:
        return EventsFileError(self.line, column, self.text, reason)


def default_event_name(target: str, retprobe: bool, user: bool) -> str:
    """The name tracefs gives an event written without one."""
    kind = "r" if retprobe else "p"
    if user:
        path, _, offset = target.partition(":")
        base = re.split(r"[.\-_]", path.rsplit("/", 1)[-1], maxsplit=1)[0]
        try:
            offset = f"{int(offset, 0):#x}"
        except ValueError:
            pass
        return _sanitize(f"{kind}_{base}_{offset}")
    if _NUMBER.match(target):
        return f"{kind}_{int(target, 0):#x}"
    symbol, _, off = target.partition("+")
    return _sanitize(f"{kind}_{symbol}_{int(off, 0) if off else 0}")


def _sanitize(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", name)[:MAX_EVENT_NAME]


def _for_probed(text: str, value: int, *, decimal: bool) -> str:
    """`text`, a number tracefs reads as `value`, in the form probed's specs read as `value` too: `0x` hex
    as it is; decimal as it is where probed reads decimal there (`decimal`: an offset added to a symbol);
    anything else (octal, or decimal where probed reads hex) in hex."""
    if text[:2] in ("0x", "0X") or (decimal and (text == "0" or text[0] != "0")):
        return text
    return f"{value:#x}"


def split_return(spec: str) -> tuple[str, bool]:
    """`SYM%return` -> (`SYM`, True); any other spec -> (spec, False)."""
    if spec.endswith("%return"):
        return spec[: -len("%return")], True
    return spec, False


def parse_text(text: str, source: str | None = None) -> list[EventLine]:
    """Every command of a kprobe_events/uprobe_events file, in order.

    Raises:
        EventsFileError: the first line that does not parse.
    """
    commands = []
    for number, raw in enumerate(text.splitlines(), start=1):
        try:
            command = parse_line(raw, number)
        except EventsFileError as exc:
            raise EventsFileError(exc.line, exc.column, exc.text, exc.reason, source) from None
        if command is not None:
            commands.append(command)
    return commands


def parse_line(raw: str, number: int = 1) -> EventLine | None:
    """One line; None for a blank or comment line.

    Raises:
        EventsFileError: with the line number and the column of the problem.
    """
    text = raw.rstrip("\n")
    body = text.split("#", 1)[0]
    words = [(m.group(0), m.start() + 1) for m in re.finditer(r"\S+", body)]
    if not words:
        return None

    def fail(column: int, reason: str) -> EventsFileError:
        return EventsFileError(number, column, text, reason)

    head, col = words[0]
    kind = head[0]
    if kind not in "pr-":
        raise fail(col, f"unknown command {head!r} (p, r or -)")
    rest = head[1:]
    colon = rest.find(":")
    digits, name_part = (rest, None) if colon < 0 else (rest[:colon], rest[colon + 1 :])
    maxactive = None
    if digits:
        if not digits.isdigit():
            raise fail(col + 1, f"unexpected {digits!r} after {kind!r} (expected ':' and an event name)")
        if kind != "r":
            raise fail(col + 1, "MAXACTIVE is only for return probes (r)")
        maxactive = int(digits)
        if not 1 <= maxactive <= MAXACTIVE_MAX:
            raise fail(col + 1, f"MAXACTIVE must be 1..{MAXACTIVE_MAX}")
    group, event = _group_event(name_part, col + 1 + len(digits) + 1, fail)

    if kind == "-":
        if event is None:
            raise fail(col + 1, "'-' needs the event to remove: -:[GRP/]EVENT")
        if len(words) > 1:
            raise fail(words[1][1], "nothing may follow -:[GRP/]EVENT")
        return EventLine(number, text, "remove", group=group, event=event)

    if len(words) < 2:
        raise fail(len(body.rstrip()) + 2, "a probe needs a place: SYM[+OFFS], MOD:SYM, 0xADDR or PATH:OFFSET")
    target, tcol = words[1]
    retprobe = kind == "r"
    target, percent_return = split_return(target)
    if percent_return:
        if retprobe:
            raise fail(tcol + len(target), "%return is for p lines; an r line is a return probe already")
        retprobe = True
    user, ref_ctr = False, None
    m = _UPROBE_TARGET.match(target)
    if m and ("/" in m.group("path") or _NUMBER.match(m.group("offset"))):
        user = True
        offset = m.group("offset")
        if not _NUMBER.match(offset) and not _SYMBOL.fullmatch(offset.split("+")[0]):
            raise fail(tcol + m.start("offset"), f"bad offset {offset!r} (a number, or SYMBOL[+OFF])")
        if m.group("ref") is not None:
            ref_ctr = kernel_number(m.group("ref"))
            if ref_ctr is None:
                raise fail(tcol + m.start("ref"), f"bad reference-counter offset {m.group('ref')!r}")
            target = target[: m.start("ref") - 1]
        if _NUMBER.match(offset):
            value = kernel_number(offset)
            if value is None:
                raise fail(tcol + m.start("offset"), f"bad offset {offset!r} (a leading 0 makes it octal)")
            target = f"{m.group('path')}:{_for_probed(offset, value, decimal=False)}"  # (probed's is hex)
    else:
        target = _check_kernel_target(target, tcol, retprobe, fail)

    args = words[2:]
    if len(args) > MAX_ARGS:
        raise fail(args[MAX_ARGS][1], f"too many fetch args (at most {MAX_ARGS})")
    for arg, acol in args:
        if "$retval" in arg and not retprobe:
            raise fail(acol + arg.index("$retval"), "$retval is only for return probes")
    return EventLine(
        number, text, "add", retprobe=retprobe, maxactive=maxactive, group=group, event=event, target=target,
        user=user, ref_ctr=ref_ctr, fetchargs=tuple(a for a, _ in args), columns=tuple(c for _, c in args),
    )


def _group_event(part: str | None, col: int, fail) -> tuple[str | None, str | None]:
    """`GRP/EVENT`, `EVENT` or `GRP/` (col is where `part` starts)."""
    if part is None:
        return None, None
    if part == "":
        raise fail(col, "an event name is expected after ':'")
    group, slash, event = part.partition("/")
    if not slash:
        group, event = None, part
    if slash and not group:
        raise fail(col, "a group name is expected before '/'")
    if group is not None and not GOOD_NAME.match(group):
        raise fail(col, f"bad group name {group!r} (letters, digits and _, not starting with a digit)")
    ecol = col + (len(group) + 1 if slash else 0)
    if event == "":
        return group, None
    if not GOOD_NAME.match(event):
        raise fail(ecol, f"bad event name {event!r} (letters, digits and _, not starting with a digit)")
    if len(event) > MAX_EVENT_NAME:
        raise fail(ecol, f"event name longer than {MAX_EVENT_NAME} characters")
    return group, event


def _check_kernel_target(target: str, col: int, retprobe: bool, fail) -> str:
    """`[MOD:]SYM[+OFFS]` or `MEMADDR`, as the kernel accepts them; returns it as probed's spec reads it the
    same (probed reads an offset as decimal or `0x` hex, an address as `0x` hex only: other numbers go in hex)."""
    if _NUMBER.match(target):
        address = kernel_number(target)
        if address is None:
            raise fail(col, f"bad address {target!r} (a leading 0 makes it octal)")
        return _for_probed(target, address, decimal=False)
    module, colon, rest = target.rpartition(":")
    if colon and not _SYMBOL.fullmatch(module):
        raise fail(col, f"bad module name {module!r}")
    scol = col + (len(module) + 1 if colon else 0)
    sm = _SYMBOL.match(rest)
    if not sm:
        raise fail(scol, f"expected a symbol or an address, not {rest!r}")
    tail = rest[sm.end() :]
    if not tail:
        return target
    ocol = scol + sm.end()
    if tail[0] == "-":
        raise fail(ocol, "an offset is added: SYM+OFFS")
    offset = kernel_number(tail[1:]) if tail[0] == "+" else None
    if offset is None:
        raise fail(ocol, f"bad offset {tail!r} (+OFFS: decimal, 0x hex, or octal after a leading 0)")
    if retprobe and offset != 0:
        raise fail(ocol, "a return probe goes on a function's entry (SYM or SYM+0)")
    return f"{target[: len(target) - len(tail)]}+{_for_probed(tail[1:], offset, decimal=True)}"

