"""Register blocks: `g`/`G` payloads and single `p`/`P` values, sans-IO.

The `g` reply is ASCII hex, each register in target byte order, one after the other in register-number
order; `xx` in place of a byte means "unavailable" (GDB manual, "Packets": `g`). Which registers are in it
is `RegisterInfo.offset` (see `rsp.tdesc`).

A full block goes through `construct` (one schema per layout, built once). A probe hit reads one or two
registers, thousands of times a second, so `value()` takes a precomputed slice of the hex payload instead
and never runs construct's parser.
"""

from __future__ import annotations

import binascii
from collections.abc import Mapping

import construct as cs

from .errors import RSPError
from .tdesc import RegisterInfo, TargetDescription, UnknownRegister

__all__ = ["RegisterDecodeError", "RegisterEncodeError", "RegisterLayout"]

_UNAVAILABLE = ord("x")


class RegisterDecodeError(RSPError):
    """A `g` or `p` reply does not fit the layout (not hex, wrong length)."""


class RegisterEncodeError(RSPError):
    """Values cannot be encoded for `G` or `P` (a register missing, a value too wide)."""


def _block_schema(registers: list[RegisterInfo], little: bool) -> cs.Construct:
    """A construct Struct of the registers, each an unsigned integer of its own size."""
    return cs.Struct(*(reg.name / cs.BytesInteger(reg.size, swapped=little) for reg in registers))


class RegisterLayout:
    """The registers of one target and where they sit in the `g` block.

    Attributes:
        tdesc: the description it was built from.
        byteorder: "little" or "big".
        registers: every register of the description by name (also those only `p` reaches).
        g_registers: the registers of the `g` block, in block order.
        g_size: bytes of the `g` block as QEMU sends it.
    """

    def __init__(self, tdesc: TargetDescription, byteorder: str = "little"):
        """Precompute the slices and the block schema.

        Args:
            tdesc: the target's description (offsets say what is in `g`).
            byteorder: the target's byte order, "little" or "big".

        Raises:
            ValueError: a byte order other than "little" or "big".
        """
        if byteorder not in ("little", "big"):
            raise ValueError(f"byteorder must be 'little' or 'big', not {byteorder!r}")
        self.tdesc = tdesc
        self.byteorder = byteorder
        self.registers: dict[str, RegisterInfo] = {r.name: r for r in tdesc.registers}
        self.g_registers: tuple[RegisterInfo, ...] = tuple(
            sorted((r for r in tdesc.registers if r.offset is not None), key=lambda r: r.offset)
        )
        self.g_size = sum(r.size for r in self.g_registers)
        # Hex-character spans of each register in the g payload, for the fast path.
        self._spans = {r.name: (2 * r.offset, 2 * (r.offset + r.size)) for r in self.g_registers}
        self._schemas: dict[int, tuple[cs.Construct, tuple[RegisterInfo, ...]]] = {}
        self._numbered = tuple((r.regnum, 2 * r.offset, 2 * (r.offset + r.size)) for r in self.g_registers)
        self._tagged = tuple((b"%02x:" % n, start, end) for n, start, end in self._numbered)
        self._tagged_by_names: dict[tuple[str, ...], tuple[tuple[bytes, int, int], ...]] = {}
        self._schema(self.g_size)

    @property
    def full_size(self) -> int:
        """Same as `g_size` (the older name)."""
        return self.g_size

    def _schema(self, size: int) -> tuple[cs.Construct, tuple[RegisterInfo, ...]]:
        """The schema for a block of `size` bytes (whole registers only) and the registers in it."""
        cached = self._schemas.get(size)
        if cached is None:
            regs = tuple(r for r in self.g_registers if r.offset + r.size <= size)
            cached = self._schemas[size] = (_block_schema(list(regs), self.byteorder == "little"), regs)
        return cached

    def _info(self, name: str) -> RegisterInfo:
        try:
            return self.registers[name]
        except KeyError:
            raise UnknownRegister(
                name, tuple(self.registers), self.tdesc.architecture or "the target"
            ) from None

    def present(self, g_payload: bytes) -> list[RegisterInfo]:
        """The registers a `g` reply of this length carries in full."""
        size = len(g_payload) // 2
        return [r for r in self.g_registers if r.offset + r.size <= size]

    def decode(self, g_payload: bytes) -> dict[str, int | None]:
        """Every register in a `g` reply.

        Args:
            g_payload: the reply payload (ASCII hex). A shorter block than `g_size` yields the registers it
                holds in full.

        Returns:
            Values by register name in block order; None for a register sent as `xx` (unavailable).

        Raises:
            RegisterDecodeError: not hex, an odd length, or longer than `g_size` (the layout is wrong).
        """
        if len(g_payload) % 2 or len(g_payload) > 2 * self.g_size:
            raise RegisterDecodeError(
                f"a g reply of {len(g_payload)} hex digits does not fit this layout ({2 * self.g_size} expected)"
            )
        schema, regs = self._schema(len(g_payload) // 2)
        unavailable = set()
        if _UNAVAILABLE in g_payload:
            for reg in regs:
                start, end = self._spans[reg.name]
                if _UNAVAILABLE in g_payload[start:end]:
                    unavailable.add(reg.name)
            g_payload = g_payload.replace(b"x", b"0")
        parsed = _parse_block(schema, g_payload)
        return {r.name: (None if r.name in unavailable else parsed[r.name]) for r in regs}

    def encode(self, values: Mapping[str, int], size: int | None = None) -> bytes:
        """A `G` payload.

        Args:
            values: a value for every register of the block (extra names are ignored).
            size: encode only the registers that fit in this many bytes (default `g_size`).

        Returns:
            The ASCII hex payload.

        Raises:
            RegisterEncodeError: a register without a value (or None), or a value that does not fit.
        """
        schema, regs = self._schema(self.g_size if size is None else size)
        missing = [r.name for r in regs if values.get(r.name) is None]
        if missing:
            raise RegisterEncodeError(
                f"no value for {', '.join(missing)}: G writes every register of the block"
            )
        data = {r.name: self._fit(r, values[r.name]) for r in regs}
        try:
            return binascii.hexlify(schema.build(data))
        except cs.ConstructError as exc:
            raise RegisterEncodeError(f"cannot encode the register block: {exc}") from None

    def expedited(self, g_payload: bytes) -> dict[int, bytes]:
        """A full `g` reply as a stop reply's expedited registers (`n:value;` by register number).

        A stub that sends them spares the debugger its `g` after the stop. Registers sent as `xx` are left
        out, and a block of another length gives none (the debugger then reads `g` itself).
        """
        if len(g_payload) != 2 * self.g_size:
            return {}
        out = {}
        for regnum, start, end in self._numbered:
            chunk = g_payload[start:end]
            if _UNAVAILABLE not in chunk:
                out[regnum] = chunk
        return out

    def expedited_text(self, g_payload: bytes, names: tuple[str, ...] | None = None) -> bytes:
        """`expedited` as it goes into a stop reply (`nn:value;` for each register), built in one pass.

        Args:
            names: only these registers (those of `g` among them), e.g. the general ones: GDB reads the
                rest with `g` if it ever needs them, and parsing a long stop reply costs GDB time too.
        """
        tagged = self._tagged if names is None else self._tagged_for(names)
        if len(g_payload) != 2 * self.g_size or _UNAVAILABLE in g_payload:
            wanted = {int(tag[:-1], 16) for tag, _, _ in tagged}
            return b"".join(
                b"%02x:%s;" % kv for kv in sorted(self.expedited(g_payload).items()) if kv[0] in wanted
            )
        return b"".join([tag + g_payload[start:end] + b";" for tag, start, end in tagged])

    def _tagged_for(self, names: tuple[str, ...]) -> tuple[tuple[bytes, int, int], ...]:
        cached = self._tagged_by_names.get(names)
        if cached is None:
            numbers = {self.registers[n].regnum for n in names if n in self.registers}
            cached = self._tagged_by_names[names] = tuple(
                t for t, (n, _, _) in zip(self._tagged, self._numbered, strict=True) if n in numbers
            )
        return cached

    def value(self, g_payload: bytes, name: str) -> int | None:
        """One register from a `g` reply, without decoding the rest (the hot path).

        Returns:
            Its value; None when the reply marks it unavailable (`xx`), is too short to hold it, or the
            register is not sent in `g` (read it with `p`).

        Raises:
            UnknownRegister: no register of that name.
            RegisterDecodeError: the register's digits are not hex.
        """
        span = self._spans.get(name)
        if span is None:
            self._info(name)  # raises for an unknown name
            return None
        chunk = g_payload[span[0] : span[1]]
        if len(chunk) != span[1] - span[0] or _UNAVAILABLE in chunk:
            return None
        try:
            return int.from_bytes(binascii.unhexlify(chunk), self.byteorder)
        except (binascii.Error, ValueError):
            raise RegisterDecodeError(f"register {name}: {chunk!r} is not hex") from None

    def patch(self, g_payload: bytes, name: str, value: int) -> bytes:
        """A `g` payload with one register changed and the rest untouched.

        Raises:
            UnknownRegister: no register of that name.
            RegisterEncodeError: the register is not in `g`, or the value does not fit.
        """
        info = self._info(name)
        span = self._spans.get(name)
        if span is None:
            raise RegisterEncodeError(f"register {name} is not in the g block; write it with P")
        return g_payload[: span[0]] + self.encode_p(info.name, value) + g_payload[span[1] :]

    def decode_p(self, name: str, p_payload: bytes) -> int | None:
        """The value in a `p` reply for register `name`; None when it is `xx` (unavailable).

        Raises:
            UnknownRegister: no register of that name.
            RegisterDecodeError: not hex, or not the register's size.
        """
        info = self._info(name)
        if len(p_payload) != 2 * info.size:
            raise RegisterDecodeError(
                f"a p reply for {name} has {len(p_payload)} hex digits, not {2 * info.size}"
            )
        if _UNAVAILABLE in p_payload:
            return None
        try:
            return int.from_bytes(binascii.unhexlify(p_payload), self.byteorder)
        except (binascii.Error, ValueError):
            raise RegisterDecodeError(f"a p reply for {name} is not hex: {p_payload[:40]!r}") from None

    def encode_p(self, name: str, value: int) -> bytes:
        """The value part of a `P` packet (`P<regnum>=<this>`) for register `name`.

        Negative values are written in two's complement.

        Raises:
            UnknownRegister: no register of that name.
            RegisterEncodeError: the value does not fit the register.
        """
        info = self._info(name)
        return binascii.hexlify(self._fit(info, value).to_bytes(info.size, self.byteorder))

    def regnum(self, name: str) -> int:
        """The number of register `name` for `p`/`P`.

        Raises:
            UnknownRegister: no register of that name.
        """
        return self._info(name).regnum

    @staticmethod
    def _fit(info: RegisterInfo, value: int) -> int:
        bits = 8 * info.size
        if not -(1 << (bits - 1)) <= value < (1 << bits):
            raise RegisterEncodeError(f"{value:#x} does not fit register {info.name} ({info.bitsize} bits)")
        return value & ((1 << bits) - 1)


def _parse_block(schema: cs.Construct, g_payload: bytes) -> cs.Container:
    """The one place construct's and hex decoding's errors become ours."""
    try:
        return schema.parse(binascii.unhexlify(g_payload))
    except (binascii.Error, ValueError, cs.ConstructError) as exc:
        raise RegisterDecodeError(f"bad register block: {exc}") from None
