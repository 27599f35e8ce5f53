"""Target descriptions (`target.xml` and what it includes), sans-IO.

From the GDB manual's "Target Descriptions" appendix: a `<target>` names its `<architecture>` and holds
`<feature>`s, possibly through `<xi:include href="..."/>`; each `<reg name bitsize [regnum] [type] [group]>`
is numbered after the previous one unless it says `regnum`. The caller fetches the documents
(`qXfer:features:read:ANNEX`) and hands them over; `includes_of` says which annexes a document needs.

The `g` packet carries registers in register-number order. QEMU sends only its core registers there; the
offsets computed here are valid for the registers that fit in the reply actually received.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import RSPError

__all__ = [
    "RegisterInfo",
    "TargetDescription",
    "TargetDescriptionError",
    "includes_of",
    "parse_target_description",
]

_XI = "{http://www.w3.org/2001/XInclude}include"


class TargetDescriptionError(RSPError):
    """A target description is malformed or incomplete."""


@dataclass(frozen=True)
class RegisterInfo:
    """One register: its number, size, and byte offset in the `g` block (in register-number order)."""

    name: str
    regnum: int
    bitsize: int
    type: str
    group: str | None
    feature: str
    offset: int

    @property
    def size(self) -> int:
        return (self.bitsize + 7) // 8


@dataclass(frozen=True)
class TargetDescription:
    """What a target says about itself."""

    architecture: str | None
    osabi: str | None
    registers: tuple[RegisterInfo, ...]
    features: tuple[str, ...]

    def register(self, name: str) -> RegisterInfo:
        """A register by name.

        Raises:
            TargetDescriptionError: no such register (the message lists the names there are).
        """
        for reg in self.registers:
            if reg.name == name:
                return reg
        names = ", ".join(r.name for r in self.registers[:40])
        raise TargetDescriptionError(f"no register {name!r}; registers: {names}")


_ROOT_TAG = re.compile(r"<(target|feature)\b")


def _parse(text: str, annex: str) -> ET.Element:
    # QEMU's target.xml uses `xi:include` without declaring the prefix; declare it for the parser.
    if "xi:" in text and "xmlns:xi" not in text:
        text = _ROOT_TAG.sub(lambda m: f'{m.group(0)} xmlns:xi="http://www.w3.org/2001/XInclude"', text, count=1)
    try:
        return ET.fromstring(text)
    except ET.ParseError as exc:
        raise TargetDescriptionError(f"{annex}: malformed XML: {exc}") from None


def includes_of(xml_text: str) -> list[str]:
    """The `href`s of the `xi:include` elements of a document, in order."""
    root = _parse(xml_text, "document")
    return [el.get("href", "") for el in root.iter(_XI) if el.get("href")]


def parse_target_description(documents: Mapping[str, str], root: str = "target.xml") -> TargetDescription:
    """Build a description from the root document and the documents it includes.

    Raises:
        TargetDescriptionError: malformed XML, a missing include, a register without name or size.
    """
    state = {"arch": None, "osabi": None, "next": 0, "offset": 0}
    registers: list[RegisterInfo] = []
    features: list[str] = []

    def walk(element: ET.Element, annex: str, feature: str) -> None:
        for child in element:
            if child.tag == _XI:
                href = child.get("href", "")
                if href not in documents:
                    raise TargetDescriptionError(f"{annex} includes {href!r}, which was not provided")
                walk_root(_parse(documents[href], href), href, feature)
            elif child.tag == "architecture":
                state["arch"] = (child.text or "").strip() or None
            elif child.tag == "osabi":
                state["osabi"] = (child.text or "").strip() or None
            elif child.tag == "feature":
                name = child.get("name", "")
                features.append(name)
                walk(child, annex, name)
            elif child.tag == "reg":
                add_register(child, annex, feature)

    def walk_root(element: ET.Element, annex: str, feature: str) -> None:
        if element.tag == "feature":
            name = element.get("name", "")
            features.append(name)
            walk(element, annex, name)
        else:
            walk(element, annex, feature)

    def add_register(el: ET.Element, annex: str, feature: str) -> None:
        name, bits = el.get("name"), el.get("bitsize")
        if not name or not bits:
            raise TargetDescriptionError(f"{annex}: a <reg> without name or bitsize")
        try:
            regnum = int(el.get("regnum")) if el.get("regnum") else state["next"]
            bitsize = int(bits)
        except ValueError:
            raise TargetDescriptionError(f"{annex}: bad number in <reg name={name!r}>") from None
        state["next"] = regnum + 1
        registers.append(RegisterInfo(name, regnum, bitsize, el.get("type", "int"), el.get("group"), feature, 0))

    walk_root(_parse(documents.get(root) or _missing(root), root), root, "")
    # The g block holds registers in register-number order.
    ordered = sorted(registers, key=lambda r: r.regnum)
    laid_out, offset = [], 0
    for reg in ordered:
        laid_out.append(RegisterInfo(reg.name, reg.regnum, reg.bitsize, reg.type, reg.group, reg.feature, offset))
        offset += reg.size
    return TargetDescription(state["arch"], state["osabi"], tuple(laid_out), tuple(features))


def _missing(root: str) -> str:
    raise TargetDescriptionError(f"the root document {root!r} was not provided")
