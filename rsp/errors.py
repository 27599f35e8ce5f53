"""The errors of the RSP library: one base class, split by whose fault it is.

Like h11, a protocol error says who broke the rules: we (`LocalProtocolError`) or the peer
(`RemoteProtocolError`). A well-formed error reply from the target (`E NN`, `E.text`) is not a protocol
error; it is a `RemoteError` carrying the code, so callers can turn it into a clear message.
"""

from __future__ import annotations


class RSPError(Exception):
    """Base class of every error raised by `rsp`."""


class LocalProtocolError(RSPError):
    """We tried to do something the protocol does not allow (a bug on our side)."""


class RemoteProtocolError(RSPError):
    """The peer sent something that breaks the protocol."""


class RemoteError(RSPError):
    """The target answered a request with an error reply (`E NN` or `E.text`).

    Attributes:
        code: the two-digit error number, or None for the `E.text` form.
        text: the text of the `E.text` form, or None.
        request: the request payload that was refused, when known.
    """

    def __init__(self, code: int | None, text: str | None = None, request: bytes | None = None):
        self.code = code
        self.text = text
        self.request = request
        what = f"E{code:02x}" if code is not None else f"E.{text}"
        suffix = f" to {request[:40]!r}" if request else ""
        super().__init__(f"target answered {what}{suffix}")


class UnsupportedPacket(RSPError):
    """The target answered with the empty reply: it does not support this packet."""

    def __init__(self, request: bytes):
        self.request = request
        super().__init__(f"target does not support {request[:40]!r}")


class ConnectionClosed(RSPError):
    """The connection to the peer is gone (EOF, reset, or closed by us)."""


class TargetTimeout(RSPError):
    """The target did not answer within the time allowed."""
