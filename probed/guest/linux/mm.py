"""Processes' memory maps and files as x86_64 Linux keeps them, read from outside: tasks, their mm's VMAs
(a maple tree since 6.1), the file each VMA maps, and a path looked up in the dentry cache.

What user-space probes need:
- `MmLayout.from_btf`: the offsets of the members used below, from the kernel's BTF.
- `read_vma`: one VMA's range, page offset, mm and file inode.
- `mm_vmas`: every VMA of an mm (walking `mm->mm_mt`).
- `tasks`: every task on `init_task.tasks` with its mm.
- `lookup_path`: a path's inode, walking dentries from the root (`init_task.fs->root`) through
  `d_subdirs`/`d_child` by name. It finds what the dentry cache holds and does not cross mount points:
  enough for an initramfs or a file that was opened once, as a probed program has been.
- `pgd_of`: an mm's page-table root as a physical address, what CR3 holds while that mm runs (PCID bits
  aside), so a stop tells its address space without reading memory.

Functions are sans-IO generators: they yield `(address, length)` and get the bytes back (see `run_reads`).
"""

from __future__ import annotations

import struct
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

from .btf import Btf
from .maple import MapleLayout, maple_entries

__all__ = ["FileId", "MmLayout", "NotInDcache", "Vma", "lookup_path", "mm_vmas", "pgd_of", "read_vma", "tasks",
           "DIRECT_MAP_DEFAULT", "CR3_ADDRESS_MASK"]

DIRECT_MAP_DEFAULT = 0xFFFF888000000000  # page_offset_base without KASLR's memory randomisation
CR3_ADDRESS_MASK = 0x000F_FFFF_FFFF_F000  # the page-table root; bits 0-11 PCID, bit 63 no-flush
MAX_TASKS = 1 << 16
MAX_CHILDREN = 1 << 16
_Gen = Generator[tuple[int, int], Any, Any]


class NotInDcache(LookupError):
    """A path's component is not in the guest's dentry cache (or the path crosses a mount point)."""


@dataclass(frozen=True)
class FileId:
    """A file in the guest: its inode's address, inode number and superblock (what uprobes key on)."""

    inode: int
    ino: int
    sb: int


@dataclass(frozen=True)
class Vma:
    """One VMA: [start, end), the file page it starts at (`pgoff`), its mm, and the mapped file's inode (0: none)."""

    address: int
    start: int
    end: int
    pgoff: int
    mm: int
    inode: int

    def file_offset(self, address: int) -> int:
        return self.pgoff * 4096 + (address - self.start)

    def address_of(self, offset: int) -> int | None:
        """The virtual address where this VMA maps file offset `offset`, or None if it does not."""
        address = self.start + offset - self.pgoff * 4096
        return address if self.start <= address < self.end else None


def _off(btf: Btf, struct_name: str, member: str) -> int:
    return btf.member(btf.struct(struct_name), member).bit_offset // 8


@dataclass(frozen=True)
class MmLayout:
    """Byte offsets of the members the readers here use (from BTF: no kernel build is assumed)."""

    maple: MapleLayout
    task_tasks: int
    task_mm: int
    task_fs: int
    task_pid: int
    task_tgid: int
    mm_mt: int
    mm_pgd: int
    vma_start: int
    vma_end: int
    vma_mm: int
    vma_pgoff: int
    vma_file: int
    vma_size: int
    file_inode: int
    inode_ino: int
    inode_sb: int
    fs_root: int  # fs_struct.root (a struct path): its dentry
    dentry_parent: int
    dentry_name: int  # d_name.name
    dentry_inode: int
    dentry_child: int
    dentry_subdirs: int

    @classmethod
    def from_btf(cls, btf: Btf) -> MmLayout:
        """Raises UnknownType/UnknownMember (LookupError) on a kernel without these members (before 6.1)."""
        return cls(
            maple=MapleLayout.from_btf(btf),
            task_tasks=_off(btf, "task_struct", "tasks"),
            task_mm=_off(btf, "task_struct", "mm"),
            task_fs=_off(btf, "task_struct", "fs"),
            task_pid=_off(btf, "task_struct", "pid"),
            task_tgid=_off(btf, "task_struct", "tgid"),
            mm_mt=_off(btf, "mm_struct", "mm_mt"),
            mm_pgd=_off(btf, "mm_struct", "pgd"),
            vma_start=_off(btf, "vm_area_struct", "vm_start"),
            vma_end=_off(btf, "vm_area_struct", "vm_end"),
            vma_mm=_off(btf, "vm_area_struct", "vm_mm"),
            vma_pgoff=_off(btf, "vm_area_struct", "vm_pgoff"),
            vma_file=_off(btf, "vm_area_struct", "vm_file"),
            vma_size=btf.size_of(btf.struct("vm_area_struct")),
            file_inode=_off(btf, "file", "f_inode"),
            inode_ino=_off(btf, "inode", "i_ino"),
            inode_sb=_off(btf, "inode", "i_sb"),
            fs_root=_off(btf, "fs_struct", "root") + _off(btf, "path", "dentry"),
            dentry_parent=_off(btf, "dentry", "d_parent"),
            dentry_name=_off(btf, "dentry", "d_name") + _off(btf, "qstr", "name"),
            dentry_inode=_off(btf, "dentry", "d_inode"),
            dentry_child=_off(btf, "dentry", "d_child"),
            dentry_subdirs=_off(btf, "dentry", "d_subdirs"),
        )


def read_word(read: Any, address: int) -> _Gen:
    return struct.unpack("<Q", (yield from read(address, 8)))[0]


def read_vma(layout: MmLayout, read: Any, vma: int) -> _Gen:
    """The VMA at `vma` (two reads when it maps a file: the VMA, then its file's inode pointer)."""
    data = yield from read(vma, layout.vma_size)

    def word(off: int) -> int:
        return struct.unpack_from("<Q", data, off)[0]

    file = word(layout.vma_file)
    inode = (yield from read_word(read, file + layout.file_inode)) if file else 0
    return Vma(vma, word(layout.vma_start), word(layout.vma_end), word(layout.vma_pgoff), word(layout.vma_mm), inode)


def mm_vmas(layout: MmLayout, read: Any, mm: int) -> _Gen:
    """Every VMA of the mm at `mm`, in address order."""
    entries = yield from maple_entries(layout.maple, mm + layout.mm_mt, read)
    out = []
    for _first, _last, vma in entries:
        v = yield from read_vma(layout, read, vma)
        if v.mm == mm and v.start < v.end:  # a slot the tree no longer uses would name another mm's VMA
            out.append(v)
    return out


def pgd_of(layout: MmLayout, read: Any, mm: int, direct_map: int) -> _Gen:
    """The physical address of the mm's page-table root (CR3 & CR3_ADDRESS_MASK while it runs)."""
    return ((yield from read_word(read, mm + layout.mm_pgd)) - direct_map) & CR3_ADDRESS_MASK


def tasks(layout: MmLayout, read: Any, init_task: int) -> _Gen:
    """(task, tgid, pid, mm) of every task on init_task's list (threads share their leader's mm)."""
    out = []
    task = init_task
    for _ in range(MAX_TASKS):
        data = yield from read(task, max(layout.task_tasks, layout.task_mm, layout.task_pid, layout.task_tgid) + 8)
        mm = struct.unpack_from("<Q", data, layout.task_mm)[0]
        pid, tgid = struct.unpack_from("<i", data, layout.task_pid)[0], struct.unpack_from("<i", data, layout.task_tgid)[0]
        out.append((task, tgid, pid, mm))
        task = struct.unpack_from("<Q", data, layout.task_tasks)[0] - layout.task_tasks
        if task == init_task:
            return out
    return out


def lookup_path(layout: MmLayout, read: Any, init_task: int, path: str) -> _Gen:
    """The FileId of the absolute `path`, by dentry names from the root.

    Raises:
        NotInDcache: a component is not there (no such file, not cached, or behind a mount point).
    """
    fs = yield from read_word(read, init_task + layout.task_fs)
    dentry = yield from read_word(read, fs + layout.fs_root)
    walked = ""
    for part in [p for p in path.split("/") if p and p != "."]:
        if part == "..":
            dentry = yield from read_word(read, dentry + layout.dentry_parent)
            continue
        found = yield from _child(layout, read, dentry, part)
        walked += "/" + part
        if found is None:
            raise NotInDcache(f"{walked} is not in the guest's dentry cache (no such file, or behind a mount "
                              "point: probes need a path on the root file system)")
        dentry = found
    inode = yield from read_word(read, dentry + layout.dentry_inode)
    if not inode:
        raise NotInDcache(f"{path} does not exist in the guest (a negative dentry)")
    ino = yield from read_word(read, inode + layout.inode_ino)
    sb = yield from read_word(read, inode + layout.inode_sb)
    return FileId(inode, ino, sb)


def _child(layout: MmLayout, read: Any, parent: int, name: str) -> _Gen:
    head = parent + layout.dentry_subdirs
    node = yield from read_word(read, head)
    want = name.encode()
    for _ in range(MAX_CHILDREN):
        if node == head:
            return None
        child = node - layout.dentry_child
        data = yield from read(child, max(layout.dentry_name, layout.dentry_inode, layout.dentry_child) + 8)
        name_ptr = struct.unpack_from("<Q", data, layout.dentry_name)[0]
        inode = struct.unpack_from("<Q", data, layout.dentry_inode)[0]
        if inode and name_ptr:
            text = yield from read(name_ptr, len(want) + 1)
            if text == want + b"\0":
                return child
        node = struct.unpack_from("<Q", data, layout.dentry_child)[0]
    return None

