"""What a probe's name may be: text that prints as itself and cannot be taken for an id.

Names end up in terminals (`probectl list`, `events`), in logs and in the events file. A name with a newline
would forge a line, an ANSI escape would repaint the terminal, a bidirectional override (U+202E) would show
other text than it is; all are control or format characters (Unicode categories Cc, Cf, ...: every `C*`).
A name of digits only would be ambiguous with probe ids (`probectl rm 3`).
"""

from __future__ import annotations

import unicodedata

from probed.errors import BadSpec

__all__ = ["MAX_NAME", "check_probe_name"]

MAX_NAME = 128


def check_probe_name(name: str) -> None:
    """Refuse a name that is empty, too long, all digits, or holds whitespace or control characters.

    Raises:
        BadSpec: saying which character (by code point and position) or rule is the trouble.
    """
    if not name:
        raise BadSpec(name, "a probe name must not be empty")
    if len(name) > MAX_NAME:
        raise BadSpec(name[:40] + "...", f"a probe name is at most {MAX_NAME} characters, not {len(name)}")
    for column, ch in enumerate(name, 1):
        category = unicodedata.category(ch)
        if category.startswith("C") or category.startswith("Z"):
            what = unicodedata.name(ch, "") or f"category {category}"
            raise BadSpec(
                ascii(name),
                f"a probe name must not hold control, format or space characters: U+{ord(ch):04X} {what} "
                f"at column {column}",
            )
    if name.isdigit() or name.isdecimal() or all(ch.isdigit() for ch in name):
        raise BadSpec(name, "a probe name must not be all digits (it would read as a probe id)")
