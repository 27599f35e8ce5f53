"""The replies a stub sends a debugger (sans-IO, the server side of `rsp`): `ok`, `error`, `stop_reply`,
`console_output`... Each returns a packet payload.
"""

from __future__ import annotations

from collections.abc import Iterable

from .stop import StopEvent, ThreadId, encode_stop_reply

__all__ = [
    "console_output",
    "current_thread_reply",
    "error",
    "error_text",
    "flag",
    "ok",
    "stop_reply",
    "thread_list",
    "threads_document",
    "unsupported",
    "xfer_part",
]


def ok() -> bytes:
    """`OK`."""
    return b"OK"


def unsupported() -> bytes:
    """The empty reply: "I do not know this packet"."""
    return b""


def error(code: int) -> bytes:
    """`E NN`: an error with a number (errno-like by convention: 0x0e EFAULT, 0x16 EINVAL...).

    Raises:
        ValueError: `code` is not 0..255.
    """
    if not 0 <= code <= 0xFF:
        raise ValueError(f"error code {code} is not 0..255")
    return b"E%02x" % code


def error_text(text: str) -> bytes:
    """`E.text`: an error with a message (GDB shows it when it has asked for `error-message+`)."""
    return b"E." + text.encode()


def stop_reply(event: StopEvent) -> bytes:
    """The payload of a stop reply (`T05thread:01;...`, `W00`, ...); see `rsp.stop.encode_stop_reply`."""
    return encode_stop_reply(event)


def console_output(text: bytes) -> bytes:
    """An `O` packet: text for the debugger's console (a monitor command's output, say)."""
    return b"O" + text.hex().encode()


def current_thread_reply(thread: ThreadId) -> bytes:
    """The reply to `qC`: `QC` and the thread id."""
    return b"QC" + thread.encode()


def flag(value: bool) -> bytes:
    """`1` or `0`: the reply to `qAttached` (1: attached to something that was running) and like queries."""
    return b"1" if value else b"0"


def thread_list(threads: Iterable[ThreadId]) -> bytes:
    """A `qfThreadInfo`/`qsThreadInfo` reply: `m01,02` for these threads, `l` when there are none left."""
    ids = [t.encode() for t in threads]
    return b"m" + b",".join(ids) if ids else b"l"


def threads_document(threads: Iterable[ThreadId]) -> bytes:
    """The `qXfer:threads:read` object: GDB's XML thread list, one `<thread>` per id."""
    items = b"".join(b'<thread id="%s"/>' % t.encode() for t in threads)
    return b'<?xml version="1.0"?>\n<threads>%s</threads>\n' % items


def xfer_part(document: bytes, offset: int, length: int) -> bytes:
    """A `qXfer:...:read` reply: `m` and the part asked for while more follows, `l` and the rest at the end."""
    part = document[offset : offset + length]
    return (b"m" if offset + length < len(document) else b"l") + part
