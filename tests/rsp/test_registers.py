"""Register layouts against live QEMU 7.2 (its own target descriptions and `g` replies), and by hand.

Each architecture gets one QEMU for the module, stopped before its first instruction (-S, no firmware
run), so every register holds its reset value. A tiny blocking RSP helper stands in for the client here.
"""

from __future__ import annotations

import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rsp.arch import arch_for
from rsp.registers import RegisterDecodeError, RegisterEncodeError, RegisterLayout
from rsp.stop import parse_stop_reply
from rsp.tdesc import TargetDescription, UnknownRegister, includes_of, parse_target_description

MACHINES = {
    "i386": [],
    "x86_64": [],
    "aarch64": ["-M", "virt", "-cpu", "cortex-a57"],
    "riscv64": ["-M", "virt"],
}
TIMEOUT = 10.0


class Stub:
    """One blocking RSP connection to a QEMU gdbstub: send a packet, read its reply."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buffer = b""

    def request(self, payload: bytes) -> bytes:
        self.sock.sendall(b"$%s#%02x" % (payload, sum(payload) & 0xFF))
        while True:
            start = self.buffer.find(b"$")  # skips QEMU's '+' acks
            end = self.buffer.find(b"#", start)
            if start >= 0 and end >= 0 and len(self.buffer) >= end + 3:
                reply, self.buffer = self.buffer[start + 1 : end], self.buffer[end + 3 :]
                self.sock.sendall(b"+")
                return reply
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError(
                    f"QEMU closed the connection while we waited for the reply to {payload!r}"
                )
            self.buffer += data

    def read_annex(self, annex: str) -> str:
        """One `qXfer:features:read` document, chunk by chunk (`m` more, `l` last)."""
        text = b""
        while True:
            reply = self.request(b"qXfer:features:read:%s:%x,%x" % (annex.encode(), len(text), 0x800))
            if reply[:1] not in (b"m", b"l"):
                raise AssertionError(f"qXfer of {annex} answered {reply!r}")
            text += reply[1:]
            if reply[:1] == b"l":
                return text.decode()

    def documents(self) -> dict[str, str]:
        """target.xml and every annex it includes, recursively."""
        documents: dict[str, str] = {}
        todo = ["target.xml"]
        while todo:
            annex = todo.pop(0)
            if annex not in documents:
                documents[annex] = self.read_annex(annex)
                todo += includes_of(documents[annex])
        return documents


@contextmanager
def live_qemu(arch: str) -> Iterator[Stub]:
    """QEMU stopped at reset with its gdbstub on a socket we bound, so connecting needs no retries."""
    with tempfile.TemporaryDirectory() as workdir:
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(Path(workdir) / "gdb"))
        listener.listen(1)
        args = [
            f"qemu-system-{arch}",
            "-S",
            "-display",
            "none",
            "-nodefaults",
            *MACHINES[arch],
            "-chardev",
            f"socket,id=gdb0,fd={listener.fileno()},server=on,wait=off",
            "-gdb",
            "chardev:gdb0",
        ]
        qemu = subprocess.Popen(args, pass_fds=(listener.fileno(),), stdin=subprocess.DEVNULL)
        try:
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(TIMEOUT)
            sock.connect(str(Path(workdir) / "gdb"))
            with sock:
                yield Stub(sock)
        finally:
            listener.close()
            qemu.kill()
            qemu.wait(TIMEOUT)


class Live:
    """What one live QEMU told us, and the connection to ask more."""

    def __init__(self, stub: Stub):
        self.stub = stub
        # QEMU answers p/P only once the description was read, so read it first.
        self.tdesc: TargetDescription = parse_target_description(stub.documents())
        self.layout = RegisterLayout(self.tdesc)
        self.arch = arch_for(self.tdesc)
        self.g = stub.request(b"g")

    def p(self, name: str) -> bytes:
        return self.stub.request(b"p%x" % self.layout.regnum(name))


def _live_fixture(arch: str):
    @pytest.fixture(scope="module")
    def fixture() -> Iterator[Live]:
        with live_qemu(arch) as stub:
            yield Live(stub)

    return fixture


i386 = _live_fixture("i386")
x86_64 = _live_fixture("x86_64")
aarch64 = _live_fixture("aarch64")
riscv64 = _live_fixture("riscv64")


@pytest.fixture(params=list(MACHINES))
def live(request) -> Live:
    return request.getfixturevalue(request.param)


# -- layouts --------------------------------------------------------------------------------------------------

X86_CORE_32 = ["eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi", "eip", "eflags"]
X86_CORE_64 = [
    "rax",
    "rbx",
    "rcx",
    "rdx",
    "rsi",
    "rdi",
    "rbp",
    "rsp",
    *(f"r{i}" for i in range(8, 16)),
    "rip",
    "eflags",
]
X86_REST = [
    "cs", "ss", "ds", "es", "fs", "gs", "fs_base", "gs_base", "k_gs_base", "cr0", "cr2", "cr3", "cr4", "cr8",
    "efer", *(f"st{i}" for i in range(8)), "fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop",
]  # fmt: skip


def test_i386_layout(i386):
    # QEMU 7.2 sends every register of its i386 description in g: 344 bytes.
    assert len(i386.g) == 2 * 344 == 2 * i386.layout.g_size
    names = [r.name for r in i386.tdesc.registers]
    assert names == X86_CORE_32 + X86_REST + [f"xmm{i}" for i in range(8)] + ["mxcsr"]
    assert [r.regnum for r in i386.tdesc.registers] == list(range(50))
    offsets = {r.name: r.offset for r in i386.tdesc.registers}
    assert (offsets["eip"], offsets["cs"], offsets["fs_base"], offsets["st0"], offsets["st1"]) == (
        32,
        40,
        64,
        100,
        110,
    )
    assert (offsets["fctrl"], offsets["xmm0"], offsets["mxcsr"]) == (180, 212, 340)
    assert i386.arch.name == "i386" and i386.tdesc.features == ("org.gnu.gdb.i386.core",)


def test_x86_64_layout(x86_64):
    # 608 bytes: 64-bit general registers, 32-bit eflags and selectors, 64-bit bases and control registers.
    assert len(x86_64.g) == 2 * 608 == 2 * x86_64.layout.g_size
    names = [r.name for r in x86_64.tdesc.registers]
    assert names == X86_CORE_64 + X86_REST + [f"xmm{i}" for i in range(16)] + ["mxcsr"]
    assert [r.regnum for r in x86_64.tdesc.registers] == list(range(66))
    sizes = {r.name: (r.offset, r.bitsize) for r in x86_64.tdesc.registers}
    assert sizes["rip"] == (128, 64)
    assert sizes["eflags"] == (136, 32)
    assert sizes["gs"] == (160, 32)
    assert sizes["fs_base"] == (164, 64)
    assert sizes["efer"] == (228, 64)
    assert sizes["st0"] == (236, 80)
    assert sizes["xmm15"] == (588, 128)
    assert sizes["mxcsr"] == (604, 32)
    assert x86_64.arch.name == "x86_64"


@pytest.mark.parametrize(
    ("fixture", "g_size", "last_in_g", "not_in_g"),
    [
        # aarch64: x0-x30, sp, pc, cpsr; the fpu (v0..) and system registers only through p.
        ("aarch64", 268, ("cpsr", 33), ("v0", 34)),
        # riscv64: zero..t6 and pc; fpu, virtual (priv) and CSRs only through p.
        ("riscv64", 264, ("pc", 32), ("ft0", 33)),
    ],
)
def test_other_layouts_send_only_the_core_feature(request, fixture, g_size, last_in_g, not_in_g):
    live = request.getfixturevalue(fixture)
    assert len(live.g) == 2 * g_size == 2 * live.layout.g_size
    assert (live.layout.g_registers[-1].name, live.layout.g_registers[-1].regnum) == last_in_g
    assert live.layout.g_registers[0].regnum == 0 and live.layout.g_registers[0].offset == 0
    reg = live.tdesc.register(not_in_g[0])
    assert (reg.regnum, reg.offset) == (not_in_g[1], None)
    assert live.arch.name == fixture
    assert {live.arch.pc, live.arch.sp, *live.arch.arg_registers} <= {r.name for r in live.layout.g_registers}


# -- values -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fixture", "expected"),
    [
        # The x86 reset state: cs:ip = f000:fff0, eflags bit 1, cr0 with CD|NW|ET.
        (
            "i386",
            {"eip": 0xFFF0, "cs": 0xF000, "eflags": 0x2, "cr0": 0x60000010, "fctrl": 0x37F, "mxcsr": 0x1F80},
        ),
        (
            "x86_64",
            {"rip": 0xFFF0, "cs": 0xF000, "eflags": 0x2, "cr0": 0x60000010, "fctrl": 0x37F, "mxcsr": 0x1F80},
        ),
        # virt's RISC-V reset vector is the mask ROM at 0x1000.
        ("riscv64", {"pc": 0x1000, "sp": 0, "a0": 0}),
    ],
)
def test_decode_of_a_live_g(request, fixture, expected):
    live = request.getfixturevalue(fixture)
    regs = live.layout.decode(live.g)
    assert {name: regs[name] for name in expected} == expected


def test_every_g_register_equals_its_p(live):
    """Offsets and numbers agree with QEMU: each register's slice of g is what p of its number answers."""
    regs = live.layout.decode(live.g)
    assert list(regs) == [r.name for r in live.layout.g_registers]
    for name, value in regs.items():
        assert live.layout.decode_p(name, live.p(name)) == value, name
        assert live.layout.value(live.g, name) == value, name
    assert regs[live.arch.pc] == live.layout.decode_p(live.arch.pc, live.p(live.arch.pc))


@pytest.mark.parametrize(
    ("fixture", "name", "value"),
    [
        ("aarch64", "v0", 0),
        ("aarch64", "fpsr", 0),
        ("riscv64", "ft0", 0),
        ("riscv64", "priv", 3),  # machine mode at reset
    ],
)
def test_registers_outside_g_are_read_with_p(request, fixture, name, value):
    live = request.getfixturevalue(fixture)
    assert live.layout.value(live.g, name) is None
    assert live.layout.decode_p(name, live.p(name)) == value


def test_p_and_P_round_trip_through_qemu(x86_64):
    layout, stub = x86_64.layout, x86_64.stub

    def write(name: str, value: int) -> bytes:
        return stub.request(b"P%x=%s" % (layout.regnum(name), layout.encode_p(name, value)))

    assert write("rsi", 0x11223344) == b"OK"
    g = stub.request(b"g")
    assert layout.value(g, "rsi") == 0x11223344 == layout.decode_p("rsi", x86_64.p("rsi"))
    assert layout.patch(x86_64.g, "rsi", 0x11223344) == g
    # Outside long mode (here: real mode at reset) QEMU 7.2 keeps only the low 32 bits of a write to
    # rax..rdi and ignores a write to r8..r15, though it still answers OK.
    assert write("rsi", 0x1122334455667788) == b"OK"
    assert write("r12", 0x1122334455667788) == b"OK"
    g = stub.request(b"g")
    assert (layout.value(g, "rsi"), layout.value(g, "r12")) == (0x55667788, 0)
    assert write("rsi", 0) == b"OK"


def test_G_of_an_encoded_block_is_what_g_reads_back(i386):
    layout, stub = i386.layout, i386.stub
    regs = layout.decode(i386.g)
    changed = {**regs, "eax": 0xDEADBEEF, "esi": 0x12345678}
    assert stub.request(b"G" + layout.encode(changed)) == b"OK"
    assert layout.decode(stub.request(b"g")) == changed
    assert stub.request(b"G" + i386.g) == b"OK"


@pytest.mark.parametrize("fixture", list(MACHINES))
def test_encode_decode_round_trip_on_live_layouts(request, fixture):
    layout = request.getfixturevalue(fixture).layout

    @settings(deadline=None)  # a loaded machine is not a failure
    @given(st.binary(min_size=layout.g_size, max_size=layout.g_size))
    def round_trip(block: bytes) -> None:
        g = block.hex().encode()
        regs = layout.decode(g)
        assert layout.encode(regs) == g
        for reg in layout.g_registers[:: max(1, len(layout.g_registers) // 8)]:
            assert layout.value(g, reg.name) == regs[reg.name]

    round_trip()


# -- by hand ------------------------------------------------------------------------------------------------------

SMALL = {
    "target.xml": """<target><architecture>i386</architecture>
      <feature name="core"><reg name="a" bitsize="32"/><reg name="b" bitsize="16"/><reg name="c" bitsize="80"/>
      </feature><feature name="extra"><reg name="d" bitsize="64"/></feature></target>"""
}


@pytest.fixture
def small() -> RegisterLayout:
    return RegisterLayout(parse_target_description(SMALL))


def test_unavailable_registers_are_none(small):
    g = b"78563412" + b"xxxx" + b"00" * 10
    assert small.decode(g) == {"a": 0x12345678, "b": None, "c": 0}
    assert small.value(g, "b") is None
    assert small.decode_p("b", b"xxxx") is None


def test_a_short_block_holds_the_registers_it_has_in_full(small):
    g = bytes(range(16)).hex().encode()
    assert small.present(g[:14]) == list(small.g_registers[:2])
    assert small.decode(g[:14]) == {"a": 0x03020100, "b": 0x0504}
    assert small.value(g[:14], "c") is None
    assert small.encode({"a": 0x03020100, "b": 0x0504}, size=6) == g[:12]


def test_registers_outside_g_have_no_value_in_g(small):
    assert small.g_size == 16
    assert small.value(bytes(16).hex().encode(), "d") is None
    assert small.encode_p("d", -1) == b"ff" * 8
    with pytest.raises(RegisterEncodeError, match="not in the g block; write it with P"):
        small.patch(bytes(16).hex().encode(), "d", 1)


def test_bad_blocks_and_values_are_typed_errors(small):
    with pytest.raises(RegisterDecodeError, match="34 hex digits does not fit"):
        small.decode(b"00" * 17)
    with pytest.raises(RegisterDecodeError, match="bad register block"):
        small.decode(b"zz" * 16)
    with pytest.raises(RegisterDecodeError, match="register a: b'zz000000' is not hex"):
        small.value(b"zz" + b"00" * 15, "a")
    with pytest.raises(RegisterDecodeError, match="has 2 hex digits, not 4"):
        small.decode_p("b", b"00")
    with pytest.raises(RegisterEncodeError, match="no value for b, c"):
        small.encode({"a": 1})
    with pytest.raises(RegisterEncodeError, match="0x10000 does not fit register b .16 bits"):
        small.encode_p("b", 0x10000)
    with pytest.raises(UnknownRegister, match="unknown register %zz"):
        small.value(b"", "zz")
    with pytest.raises(UnknownRegister):
        small.regnum("zz")


def test_big_endian_layouts(small):
    big = RegisterLayout(small.tdesc, byteorder="big")
    g = bytes(range(16)).hex().encode()
    assert big.decode(g)["a"] == 0x00010203 == big.value(g, "a")
    assert big.encode_p("b", 0x0102) == b"0102"
    assert big.encode(big.decode(g)) == g
    with pytest.raises(ValueError, match="byteorder"):
        RegisterLayout(small.tdesc, byteorder="middle")


@pytest.mark.parametrize("fixture", list(MACHINES))
def test_expedited_registers_round_trip_through_a_stop_reply(request, fixture):
    layout = request.getfixturevalue(fixture).layout

    @settings(deadline=None)  # a loaded machine is not a failure
    @given(st.binary(min_size=layout.g_size, max_size=layout.g_size))
    def check(block: bytes) -> None:
        g = block.hex().encode()
        stop = parse_stop_reply(b"T05" + layout.expedited_text(g) + b"thread:01;")
        assert stop.registers == layout.expedited(g)
        assert stop.registers == {r.regnum: g[2 * r.offset : 2 * (r.offset + r.size)] for r in layout.g_registers}

    check()


def test_expedited_leaves_out_what_it_cannot_say(small):
    g = b"78563412" + b"xxxx" + b"00" * 10
    assert small.expedited(g) == {0: b"78563412", 2: b"00" * 10}
    assert small.expedited_text(g) == b"00:78563412;02:" + b"00" * 10 + b";"
    # Not a whole block: nothing (GDB then reads `g` itself).
    assert small.expedited(g[:-2]) == {} and small.expedited_text(g[:-2]) == b""
    # Only some registers: those of the block among them, in block order.
    whole = b"78563412" + b"3412" + b"00" * 10
    assert small.expedited_text(whole, ("c", "a", "d")) == b"00:78563412;02:" + b"00" * 10 + b";"
    assert small.expedited_text(g, ("b", "c")) == b"02:" + b"00" * 10 + b";"
