"""A reader of the kernel's maple trees (6.1 and later: `mm->mm_mt` holds a process's VMAs), from outside.

The tree's layout, as lib/maple_tree.c encodes it:
- `struct maple_tree` has `ma_root`: NULL, a single entry, or a node pointer marked with bit 1
  (MAPLE_ROOT_NODE).
- A node pointer ("enode") is a 256-byte-aligned `struct maple_node` address with the node's type in bits
  3..6: 0 dense, 1 leaf_64, 2 range_64, 3 arange_64. Types below range_64 are leaves.
- range_64 and leaf_64 nodes are `struct maple_range_64` (parent, pivot[15], slot[16]); arange_64 nodes
  (the internal nodes of trees that track gaps, as mm_mt does) are `struct maple_arange_64` (parent,
  pivot[9], slot[10], gap[10]). The member offsets and array lengths come from the kernel's BTF.
- Slot i covers [previous pivot + 1, pivot[i]]; the last used slot ends at the node's max. Where the data
  ends is as `ma_data_end()` says: arange nodes keep it in their metadata (`meta.end`); range and leaf
  nodes have it there too when their last pivot is 0, else it is the last pivot's slot if that pivot is
  the node's max, else the last slot.

Walks are sans-IO: generators that yield `(address, length)` reads and get the bytes back.
"""

from __future__ import annotations

import struct
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

from .btf import Btf

__all__ = ["MapleLayout", "MapleError", "maple_entries"]

NODE_MASK = 0xFF
ROOT_NODE = 0x2
TYPE_SHIFT, TYPE_MASK = 3, 0xF
LEAF_TYPES = (0, 1)  # maple_dense, maple_leaf_64
RANGE_TYPES = (1, 2)  # leaf_64 and range_64 share struct maple_range_64
ARANGE = 3
ULONG_MAX = (1 << 64) - 1
MAX_DEPTH = 16
_Read = Generator[tuple[int, int], Any, bytes]


class MapleError(ValueError):
    """The tree does not look like a maple tree (a bad node type, too deep): the message says where."""


@dataclass(frozen=True)
class _NodeShape:
    pivots: int  # offset of pivot[]
    slots: int  # offset of slot[]
    count: int  # number of slots (pivots: count - 1)
    meta: int  # offset of meta (struct maple_metadata: `end` is its first byte)


@dataclass(frozen=True)
class MapleLayout:
    """Where a maple node's pivots and slots are, for each node type, and ma_root in the tree."""

    root: int
    node_size: int
    range64: _NodeShape
    arange64: _NodeShape

    @classmethod
    def from_btf(cls, btf: Btf) -> MapleLayout:
        """Offsets from the kernel's own `struct maple_tree`, `maple_range_64`, `maple_arange_64`.

        Raises:
            UnknownType, UnknownMember: a kernel without maple trees (before 6.1).
        """

        def shape(name: str) -> _NodeShape:
            sid = btf.struct(name)
            slot = btf.member(sid, "slot")
            return _NodeShape(btf.member(sid, "pivot").bit_offset // 8, slot.bit_offset // 8,
                              btf.array_length(btf.strip(slot.type)), btf.member(sid, "meta").bit_offset // 8)

        return cls(btf.member(btf.struct("maple_tree"), "ma_root").bit_offset // 8,
                   btf.size_of(btf.struct("maple_node")), shape("maple_range_64"), shape("maple_arange_64"))


def _data_end(shape: _NodeShape, kind: int, pivots: tuple[int, ...], data: bytes, high: int) -> int:
    """The index of the node's last used slot (lib/maple_tree.c: ma_data_end)."""
    meta_end = min(data[shape.meta], shape.count - 1)
    if kind == ARANGE:
        return meta_end
    if not pivots[-1]:
        return meta_end
    return shape.count - 2 if pivots[-1] == high else shape.count - 1


def _is_node(entry: int) -> bool:
    return entry & 3 == 2 and entry > 4096  # xa_is_node: internal entries above the reserved values


def _is_value(entry: int) -> bool:
    return entry != 0 and entry & 3 != 2  # internal entries (retry, zero) are not values


def maple_entries(layout: MapleLayout, tree: int, read: Any) -> Generator[tuple[int, int], Any, list[tuple[int, int, int]]]:
    """Every entry of the maple tree at `tree`: `(first index, last index, entry)` in index order.

    Args:
        read: a generator function `read(address, length)` yielding one read and returning its bytes.

    Raises:
        MapleError: a node of an unknown type, or a tree deeper than any real one.
    """
    (root,) = struct.unpack("<Q", (yield from read(tree + layout.root, 8)))
    out: list[tuple[int, int, int]] = []
    if not root:
        return out
    if not _is_node(root):
        if _is_value(root):
            out.append((0, 0, root))
        return out
    yield from _walk(layout, root & ~ROOT_NODE, 0, ULONG_MAX, read, out, 0)
    return out


def _walk(layout: MapleLayout, enode: int, low: int, high: int, read: Any, out: list, depth: int) -> _Read:
    if depth > MAX_DEPTH:
        raise MapleError(f"maple tree deeper than {MAX_DEPTH} levels at node {enode:#x}")
    kind = (enode >> TYPE_SHIFT) & TYPE_MASK
    if kind in RANGE_TYPES:
        shape = layout.range64
    elif kind == ARANGE:
        shape = layout.arange64
    else:
        raise MapleError(f"maple node {enode:#x} has type {kind}, not a range or arange node")
    data = yield from read(enode & ~NODE_MASK, layout.node_size)
    pivots = struct.unpack_from(f"<{shape.count - 1}Q", data, shape.pivots)
    slots = struct.unpack_from(f"<{shape.count}Q", data, shape.slots)
    last = _data_end(shape, kind, pivots, data, high)
    start = low
    for i in range(last + 1):
        end = high if i == last or i == shape.count - 1 else min(pivots[i], high)
        entry = slots[i]
        if kind in LEAF_TYPES:
            if _is_value(entry):
                out.append((start, end, entry))
        elif entry > 4096:
            yield from _walk(layout, entry, start, end, read, out, depth + 1)
        if end >= high:
            break
        start = end + 1
    return None
