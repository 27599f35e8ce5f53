"""The running kernel's types: its BTF read from guest memory (cached on the host), and where `current` is.

The blob lies in the kernel image between the symbols `__start_BTF` and `__stop_BTF` (CONFIG_DEBUG_INFO_BTF,
as Debian, Ubuntu and Fedora build). Reading ~4 MiB through the gdbstub takes a moment under TCG, so the blob
is kept on the host under a key made of the kernel's `linux_banner` (release, build number, compiler, date)
and the blob's address and size; a cached copy is used only when its header equals the guest's.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .btf import Btf, BtfError
from .tasks import CurrentTask, NoCurrentTask, current_task_layout

__all__ = ["KernelTypes", "NoKernelTypes", "load_kernel_types"]

log = logging.getLogger(__name__)

ReadMany = Callable[[Sequence[tuple[int, int]]], Awaitable[list["bytes | Exception"]]]
CHUNK = 64 * 1024  # bytes per request; the target splits it into `m` packets and pipelines them
BATCH = 16  # requests per round trip
BANNER_MAX = 256
MAX_BTF = 64 << 20


class NoKernelTypes(LookupError):
    """The guest's BTF cannot be had; the message says why (no symbols, not mapped, damaged)."""


@dataclass
class KernelTypes:
    """The kernel's BTF and, when the symbols say, where the current task is.

    Attributes:
        btf: the parsed types.
        current: where `current` and its comm/pid/tgid are, or None (with `current_error` saying why).
        source: "guest" (read now) or the cache file it came from.
    """

    btf: Btf
    current: CurrentTask | None
    current_error: str
    source: str

    def params(self, function: str) -> tuple[int, list[Any]] | None:
        """(return type id, [Param]) of a function, or None when BTF has no prototype for it."""
        return self.btf.function(function)


def default_cache() -> Path:
    base = os.environ.get("PROBED_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "probed")
    return Path(base) / "btf"


async def _read(read_many: ReadMany, address: int, length: int) -> bytes:
    requests = [(a, min(CHUNK, address + length - a)) for a in range(address, address + length, CHUNK)]
    out = bytearray()
    for i in range(0, len(requests), BATCH):
        for (a, _n), reply in zip(requests[i : i + BATCH], await read_many(requests[i : i + BATCH]), strict=True):
            if isinstance(reply, Exception):
                raise NoKernelTypes(f"the guest refused to read the BTF at {a:#x}: {reply}")
            out += reply
    return bytes(out)


def _address(symbols: Any, name: str) -> int:
    try:
        return symbols.lookup(name).address
    except Exception as exc:  # UnknownSymbol
        raise NoKernelTypes(f"no symbol {name} in the loaded symbols (is this a Linux kernel built with "
                            "CONFIG_DEBUG_INFO_BTF, with its kallsyms or System.map loaded?)") from exc


async def load_kernel_types(read_many: ReadMany, symbols: Any, cache: Path | None = None) -> KernelTypes:
    """Read and parse the running kernel's BTF.

    Args:
        read_many: the target's batched memory read (the guest must be stopped).
        symbols: the symbol store; it must know `__start_BTF` and `__stop_BTF`.
        cache: directory for cached blobs (default: $PROBED_CACHE/btf or ~/.cache/probed/btf).

    Raises:
        NoKernelTypes: with the reason.
    """
    start, stop = _address(symbols, "__start_BTF"), _address(symbols, "__stop_BTF")
    if not 24 <= stop - start <= MAX_BTF:
        raise NoKernelTypes(f"__start_BTF..__stop_BTF spans {stop - start} bytes: not a BTF blob")
    header = await _read(read_many, start, 24)
    banner = b""
    try:
        banner = (await _read(read_many, _address(symbols, "linux_banner"), BANNER_MAX)).split(b"\0")[0]
    except NoKernelTypes:
        pass
    key = hashlib.sha256(banner + b"%x:%x" % (start, stop - start)).hexdigest()[:24]
    path = (cache or default_cache()) / f"{key}.btf"
    data, source = None, "guest"
    try:
        cached = path.read_bytes()
        if len(cached) == stop - start and cached[:24] == header:
            data, source = cached, str(path)
    except OSError:
        pass
    if data is None:
        data = await _read(read_many, start, stop - start)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
        except OSError as exc:
            log.warning("cannot cache the kernel's BTF in %s: %s", path, exc)
    try:
        btf = Btf(data)
    except BtfError as exc:
        raise NoKernelTypes(f"the blob at __start_BTF ({start:#x}) is not BTF: {exc}") from None
    try:
        current, error = current_task_layout(btf, symbols), ""
    except NoCurrentTask as exc:
        current, error = None, str(exc)
    return KernelTypes(btf, current, error, source)
