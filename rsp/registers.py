"""Register blocks: decoding and encoding `g`/`G` payloads and single `p`/`P` values, sans-IO.

A full block goes through `construct` (one schema built per layout). The hot path of a probe hit reads one
or two registers, so `value()` takes a precomputed slice of the hex payload instead.
"""

from __future__ import annotations

from collections.abc import Mapping

import construct as cs

from .errors import RSPError
from .tdesc import RegisterInfo, TargetDescription

__all__ = ["RegisterLayout", "RegisterDecodeError"]


class RegisterDecodeError(RSPError):
    """A register block did not match the layout."""


class RegisterLayout:
    """The registers of one target and where they sit in the `g` block."""

    def __init__(self, tdesc: TargetDescription, byteorder: str = "little"):
        self.tdesc = tdesc
        self.byteorder = byteorder
        self.registers: dict[str, RegisterInfo] = {r.name: r for r in tdesc.registers}
        self._by_num = {r.regnum: r for r in tdesc.registers}
        # Hex-character slices for the fast path.
        self._slices = {r.name: (2 * r.offset, 2 * (r.offset + r.size)) for r in tdesc.registers}
        self.full_size = sum(r.size for r in tdesc.registers)
        self._schemas: dict[int, cs.Construct] = {}

    def _schema(self, size: int) -> tuple[cs.Construct, list[RegisterInfo]]:
        regs = [r for r in self.tdesc.registers if r.offset + r.size <= size]
        schema = self._schemas.get(size)
        if schema is None:
            fields = [r.name / cs.BytesInteger(r.size, swapped=self.byteorder == "little") for r in regs]
            schema = self._schemas[size] = cs.Struct(*fields)
        return schema, regs

    def present(self, g_payload: bytes) -> list[RegisterInfo]:
        """The registers a `g` reply of this length carries."""
        size = len(g_payload) // 2
        return [r for r in self.tdesc.registers if r.offset + r.size <= size]

    def decode(self, g_payload: bytes) -> dict[str, int | None]:
        """All registers in a `g` reply (ASCII hex); an unavailable register (`xx`) is None.

        Raises:
            RegisterDecodeError: not hex, or shorter than the first register.
        """
        size = len(g_payload) // 2
        schema, regs = self._schema(size)
        text = g_payload.decode("ascii", errors="replace")
        unavailable = {r.name for r in regs if "x" in text[2 * r.offset : 2 * (r.offset + r.size)]}
        if unavailable:
            text = "".join("0" if c == "x" else c for c in text)
        try:
            parsed = schema.parse(bytes.fromhex(text[: 2 * size]))
        except (ValueError, cs.ConstructError) as exc:
            raise RegisterDecodeError(f"bad register block: {exc}") from None
        return {r.name: (None if r.name in unavailable else parsed[r.name]) for r in regs}

    def encode(self, values: Mapping[str, int | None], size: int | None = None) -> bytes:
        """A `G` payload for registers in `values` (the ones of a block of `size` bytes; missing ones 0)."""
        schema, regs = self._schema(size if size is not None else self.full_size)
        try:
            data = schema.build({r.name: (values.get(r.name) or 0) for r in regs})
        except cs.ConstructError as exc:
            raise RegisterDecodeError(f"cannot encode registers: {exc}") from None
        return data.hex().encode()

    def value(self, g_payload: bytes, name: str) -> int | None:
        """One register from a `g` reply, fast (no full decode). None when unavailable or absent."""
        start, end = self._slices[name]
        chunk = g_payload[start:end]
        if len(chunk) != end - start or b"x" in chunk:
            return None
        return int.from_bytes(bytes.fromhex(chunk.decode("ascii")), self.byteorder)

    def patch(self, g_payload: bytes, name: str, value: int) -> bytes:
        """A `g` payload with one register changed (the rest untouched)."""
        start, end = self._slices[name]
        size = (end - start) // 2
        hexed = (value & ((1 << (8 * size)) - 1)).to_bytes(size, self.byteorder).hex().encode()
        return g_payload[:start] + hexed + g_payload[end:]

    def decode_p(self, name: str, p_payload: bytes) -> int | None:
        """A `p` reply for register `name`."""
        if b"x" in p_payload:
            return None
        return int.from_bytes(bytes.fromhex(p_payload.decode("ascii")), self.byteorder)

    def encode_p(self, name: str, value: int) -> bytes:
        """The value part of a `P` packet for register `name`."""
        size = self.registers[name].size
        return (value & ((1 << (8 * size)) - 1)).to_bytes(size, self.byteorder).hex().encode()

    def regnum(self, name: str) -> int:
        return self.registers[name].regnum
