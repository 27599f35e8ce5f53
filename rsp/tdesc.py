"""Target descriptions (`target.xml` and the annexes it includes), sans-IO.

From the GDB manual, appendix "Target Descriptions": a `<target>` names its `<architecture>` (and maybe
`<osabi>`) and holds `<feature>`s, directly or through `<xi:include href="..."/>`. Each
`<reg name bitsize [regnum] [type] [group] [save-restore]>` takes the number after the previous register's
unless it says `regnum` ("the register number ... defaults to one higher than the previous register",
counting across features and included documents). Types (`<vector>`, `<flags>`, `<struct>`, `<union>`)
only matter here through each register's `bitsize`.

The caller fetches the documents (`qXfer:features:read:ANNEX`) and hands them over; `includes_of` says
which annexes a document needs.

Which registers the `g` packet carries is QEMU's choice, not the description's. QEMU 7.2 sends the
registers of its core description (`gdb_num_g_regs`) and nothing of the features added after it
(`gdb_register_coprocessor(..., g_pos=0)`), which are reachable only by `p`/`P`. Measured against
QEMU 7.2: i386 (344 bytes) and x86_64 (608 bytes) have a single feature and send all of it, segment bases,
control registers, x87 and SSE included; aarch64 (268 bytes: x0-x30, sp, pc, cpsr) leaves out the fpu and
system-register features; riscv64 (264 bytes: zero-t6, pc) leaves out fpu, virtual and csr. So `offset`
is set for the registers of the first feature, in register-number order, and None for the rest.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, replace

from .errors import RSPError

__all__ = [
    "RegisterInfo",
    "TargetDescription",
    "TargetDescriptionError",
    "UnknownRegister",
    "includes_of",
    "parse_target_description",
]

_XI_NAMESPACE = "http://www.w3.org/2001/XInclude"
_XI_INCLUDE = f"{{{_XI_NAMESPACE}}}include"
_ROOT_TAG = re.compile(r"<(target|feature)\b")
# GDB's own descriptions never nest deeper than target -> include -> feature; a loop means a bad document.
_MAX_INCLUDE_DEPTH = 16


class TargetDescriptionError(RSPError):
    """A target description is malformed or incomplete (bad XML, a missing include, a bad <reg>)."""


class UnknownRegister(TargetDescriptionError, KeyError):
    """A register name the target does not have.

    Attributes:
        name: the name asked for.
        valid: the names there are.
    """

    def __init__(self, name: str, valid: tuple[str, ...], where: str = "the target"):
        self.name = name
        self.valid = valid
        super().__init__(f"unknown register %{name} on {where}; valid: {', '.join(valid)}")

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0])


@dataclass(frozen=True)
class RegisterInfo:
    """One register of a target description.

    Attributes:
        name: the name the description gives it (the one `p`, GDB and probes use).
        regnum: its number for `p`/`P`.
        bitsize: its size in bits.
        type: the description's type name (`int`, `code_ptr`, `vec128`, ...).
        group: the description's group (`general`, `float`, `vector`, `system`), or None.
        feature: the name of the `<feature>` it belongs to.
        offset: its byte offset in the `g` block, or None when QEMU does not send it there.
    """

    name: str
    regnum: int
    bitsize: int
    type: str
    group: str | None
    feature: str
    offset: int | None

    @property
    def size(self) -> int:
        """Its size in bytes (registers are sent as whole bytes)."""
        return (self.bitsize + 7) // 8


@dataclass(frozen=True)
class TargetDescription:
    """What a target says about itself, registers in register-number order."""

    architecture: str | None
    osabi: str | None
    registers: tuple[RegisterInfo, ...]
    features: tuple[str, ...]

    def register(self, name: str) -> RegisterInfo:
        """A register by name.

        Raises:
            UnknownRegister: (a `KeyError` and a `TargetDescriptionError`) listing the names there are.
        """
        for reg in self.registers:
            if reg.name == name:
                return reg
        raise UnknownRegister(name, tuple(r.name for r in self.registers), self.architecture or "the target")

    @property
    def g_size(self) -> int:
        """Bytes of the `g` block: the registers that have an offset."""
        return sum(r.size for r in self.registers if r.offset is not None)


def _parse_xml(text: str, annex: str) -> ET.Element:
    # QEMU's target.xml uses `xi:include` without declaring the prefix; declare it for the parser.
    if "xi:" in text and "xmlns:xi" not in text:
        text = _ROOT_TAG.sub(lambda m: f'{m.group(0)} xmlns:xi="{_XI_NAMESPACE}"', text, count=1)
    try:
        return ET.fromstring(text)
    except ET.ParseError as exc:
        raise TargetDescriptionError(f"{annex}: malformed XML: {exc}") from None


def includes_of(xml_text: str) -> list[str]:
    """The `href`s of a document's `xi:include` elements, in document order.

    Raises:
        TargetDescriptionError: the document is not well-formed XML.
    """
    root = _parse_xml(xml_text, "document")
    return [href for el in root.iter(_XI_INCLUDE) if (href := el.get("href"))]


class _Reader:
    """Walks the root document and its includes, collecting registers in document order."""

    def __init__(self, documents: Mapping[str, str]):
        self.documents = documents
        self.architecture: str | None = None
        self.osabi: str | None = None
        self.features: list[str] = []
        self.registers: list[RegisterInfo] = []
        self.next_regnum = 0

    def read_document(self, annex: str, feature: str, depth: int) -> None:
        if depth > _MAX_INCLUDE_DEPTH:
            raise TargetDescriptionError(
                f"{annex}: includes nested deeper than {_MAX_INCLUDE_DEPTH} (a loop?)"
            )
        self.read_element(_parse_xml(self.documents[annex], annex), annex, feature, depth)

    def read_element(self, element: ET.Element, annex: str, feature: str, depth: int) -> None:
        if element.tag == "feature":
            feature = element.get("name", "")
            self.features.append(feature)
        for child in element:
            if child.tag == _XI_INCLUDE:
                href = child.get("href", "")
                if href not in self.documents:
                    raise TargetDescriptionError(f"{annex} includes {href!r}, which was not provided")
                self.read_document(href, feature, depth + 1)
            elif child.tag == "architecture":
                self.architecture = (child.text or "").strip() or None
            elif child.tag == "osabi":
                self.osabi = (child.text or "").strip() or None
            elif child.tag == "feature":
                self.read_element(child, annex, feature, depth)
            elif child.tag == "reg":
                self.registers.append(self.read_register(child, annex, feature))

    def read_register(self, element: ET.Element, annex: str, feature: str) -> RegisterInfo:
        name, bitsize_text, regnum_text = element.get("name"), element.get("bitsize"), element.get("regnum")
        if not name or not bitsize_text:
            raise TargetDescriptionError(f"{annex}: a <reg> without name or bitsize in feature {feature!r}")
        try:
            bitsize = int(bitsize_text)
            regnum = int(regnum_text) if regnum_text else self.next_regnum
        except ValueError:
            raise TargetDescriptionError(
                f"{annex}: <reg name={name!r}> has a bad bitsize or regnum"
            ) from None
        if bitsize <= 0 or regnum < 0:
            raise TargetDescriptionError(f"{annex}: <reg name={name!r}> has a bitsize or regnum out of range")
        self.next_regnum = regnum + 1
        return RegisterInfo(
            name, regnum, bitsize, element.get("type", "int"), element.get("group"), feature, None
        )


def parse_target_description(documents: Mapping[str, str], root: str = "target.xml") -> TargetDescription:
    """Build a description from the root document and the documents it includes.

    Args:
        documents: every annex by name (`target.xml`, `i386-64bit.xml`, ...), as text.
        root: the annex to start from.

    Returns:
        The description, registers sorted by number, `offset` set for the registers of the first feature
        (the ones QEMU sends in `g`, see the module docstring).

    Raises:
        TargetDescriptionError: malformed XML, a missing document, a `<reg>` without name or size, two
            registers with the same name or number.
    """
    if root not in documents:
        raise TargetDescriptionError(f"the root document {root!r} was not provided")
    reader = _Reader(documents)
    reader.read_document(root, "", 0)
    registers = sorted(reader.registers, key=lambda r: r.regnum)
    _check_unique(registers)
    core = reader.features[0] if reader.features else ""
    laid_out, offset = [], 0
    for reg in registers:
        if reg.feature == core:
            laid_out.append(replace(reg, offset=offset))
            offset += reg.size
        else:
            laid_out.append(reg)
    return TargetDescription(reader.architecture, reader.osabi, tuple(laid_out), tuple(reader.features))


def _check_unique(registers: list[RegisterInfo]) -> None:
    names: set[str] = set()
    numbers: set[int] = set()
    for reg in registers:
        if reg.name in names or reg.regnum in numbers:
            raise TargetDescriptionError(f"register {reg.name!r} (number {reg.regnum}) is described twice")
        names.add(reg.name)
        numbers.add(reg.regnum)
