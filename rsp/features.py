"""`qSupported`, both directions, sans-IO.

From the GDB manual, "General Query Packets", qSupported:
- The debugger sends `qSupported[:gdbfeature[;gdbfeature]...]`, each `name+` (supported), `name-` (not
  supported), `name=value`, or `name?` (the debugger asks whether the stub supports it).
- The stub answers `stubfeature[;stubfeature]...`, each `name+`, `name-` or `name=value`. `PacketSize` is
  the largest packet the stub accepts, in hex. The empty reply means the stub knows no qSupported: every
  feature takes its default.

A feature maps to True (`+`), False (`-`), a string (`=value`), or `QUERIED` (`?`, requests only).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from .errors import LocalProtocolError, RemoteError, RemoteProtocolError
from .packets import parse_error

__all__ = [
    "QUERIED",
    "FeatureValue",
    "Features",
    "build_qsupported",
    "build_qsupported_reply",
    "parse_qsupported_reply",
    "parse_qsupported_request",
]


class _Queried:
    """The `name?` form: the debugger asks whether the stub has a feature."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "QUERIED"


QUERIED: Final = _Queried()
"""The value of a feature sent as `name?`."""

FeatureValue = bool | str | _Queried


class Features(dict[str, FeatureValue]):
    """What a stub announced: feature name to True, False or its `=value` text."""

    @property
    def packet_size(self) -> int | None:
        """The largest packet the stub accepts (`PacketSize=hex`), or None if it did not say.

        Raises:
            RemoteProtocolError: `PacketSize` is not a hex number.
        """
        value = self.get("PacketSize")
        if value is None:
            return None
        if not isinstance(value, str):
            raise RemoteProtocolError(f"PacketSize without a size: {value!r}")
        try:
            return int(value, 16)
        except ValueError:
            raise RemoteProtocolError(f"PacketSize {value!r} is not hex") from None

    def supports(self, name: str) -> bool:
        """Whether the stub announced `name+` (or `name=value`)."""
        value = self.get(name, False)
        return value is True or isinstance(value, str)


def _is_feature_name(name: str) -> bool:
    # Names never need escaping on the wire, and `=`/`;` would make them ambiguous.
    return bool(name) and name.isascii() and not any(c in name for c in ";=#$}*")


def _encode_features(features: Mapping[str, FeatureValue], *, allow_queried: bool) -> bytes:
    items = []
    for name, value in features.items():
        if not _is_feature_name(name):
            raise LocalProtocolError(f"bad feature name {name!r}")
        if value is True:
            items.append(f"{name}+")
        elif value is False:
            items.append(f"{name}-")
        elif value is QUERIED and allow_queried:
            items.append(f"{name}?")
        elif isinstance(value, str) and ";" not in value and value.isascii():
            items.append(f"{name}={value}")
        else:
            raise LocalProtocolError(f"bad value for feature {name!r}: {value!r}")
    return ";".join(items).encode("ascii")


def _parse_features(text: bytes, *, allow_queried: bool) -> dict[str, FeatureValue]:
    out: dict[str, FeatureValue] = {}
    try:
        decoded = text.decode("ascii")
    except UnicodeDecodeError:
        raise RemoteProtocolError(f"qSupported features are not ASCII: {text[:60]!r}") from None
    for item in decoded.split(";"):
        if not item:
            continue
        name, eq, value = item.partition("=")
        suffix = item[-1]
        if not eq:
            name = item[:-1]
        if not _is_feature_name(name):
            raise RemoteProtocolError(f"bad qSupported feature {item!r}")
        if eq:
            out[name] = value
        elif suffix == "+":
            out[name] = True
        elif suffix == "-":
            out[name] = False
        elif suffix == "?" and allow_queried:
            out[name] = QUERIED
        else:
            raise RemoteProtocolError(f"bad qSupported feature {item!r}")
    return out


def build_qsupported(features: Mapping[str, FeatureValue]) -> bytes:
    """The `qSupported` request a debugger (or our client) sends.

    Args:
        features: name to True (`+`), False (`-`), a string (`=value`) or QUERIED (`?`), in order.

    Returns:
        `qSupported:multiprocess+;swbreak+;...`, or `qSupported` alone for no features.

    Raises:
        LocalProtocolError: a name or value that cannot be sent.
    """
    body = _encode_features(features, allow_queried=True)
    return b"qSupported:" + body if body else b"qSupported"


def parse_qsupported_request(payload: bytes) -> dict[str, FeatureValue]:
    """The features of a `qSupported[:...]` request (what GDB sends a stub).

    Raises:
        RemoteProtocolError: not a qSupported packet, or a feature in none of the four forms.
    """
    if payload == b"qSupported":
        return {}
    if not payload.startswith(b"qSupported:"):
        raise RemoteProtocolError(f"not a qSupported request: {payload[:40]!r}")
    return _parse_features(payload[len(b"qSupported:") :], allow_queried=True)


def build_qsupported_reply(features: Mapping[str, bool | str]) -> bytes:
    """A stub's reply to `qSupported` (`PacketSize=1000;qXfer:features:read+`).

    Raises:
        LocalProtocolError: a name or value that cannot be sent (QUERIED is for requests only).
    """
    return _encode_features(features, allow_queried=False)


def parse_qsupported_reply(reply: bytes) -> Features:
    """What a stub supports, from its reply to `qSupported`.

    The empty reply (a stub without qSupported) gives empty Features: every feature at its default.

    Raises:
        RemoteError: an `E NN` / `E.text` reply.
        RemoteProtocolError: a feature in none of the forms `name+`, `name-`, `name=value`.
    """
    error = parse_error(reply)
    if error is not None:
        raise RemoteError(error.code, error.text, b"qSupported")
    return Features(_parse_features(reply, allow_queried=False))
