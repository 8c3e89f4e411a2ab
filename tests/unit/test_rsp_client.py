"""RspClient against scripted gdbstub conversations (shapes recorded from QEMU 7.2)."""
from __future__ import annotations

import logging
import socket
import threading
from typing import Dict, List, Tuple

import pytest

from kairos_libvirt.introspect.rsp import (
    X86_64, RspClient, RspConnectionError, RspProtocolError, RspRemoteError, RspTimeout,
    RspUnsupportedError, Runstate, Session, StateError, ThreadId)
from kairos_libvirt.introspect.rsp.framing import encode_packet as pkt
from kairos_libvirt.introspect.rsp.registers import RegisterTable, parse_target_description

Step = Tuple[str, bytes]


# The strict replaying transport, shared with the session tests.
from .test_rsp_session import TIMEOUT, FakeTransport, recv, send  # noqa: E402


def x(request: bytes, reply: bytes) -> List[Step]:
    """One no-ack exchange."""
    return [send(pkt(request)), recv(pkt(reply))]


def client_with(*script: Step, packet_size: int = 0x1000,
                vcont: frozenset = frozenset({"c", "C", "s", "S"})) -> Tuple[RspClient, FakeTransport]:
    t = FakeTransport(*script)
    s = Session(t)  # type: ignore[arg-type]
    s.state, s.ack_mode, s.packet_size = Runstate.STOPPED, False, packet_size
    c = RspClient(s)
    c.vcont_actions = vcont
    return c, t


# -- a target description with QEMU's quirks -----------------------------------

TARGET_XML = (b'<?xml version="1.0"?><!DOCTYPE target SYSTEM "gdb-target.dtd"><target>'
              b'<architecture>i386:x86-64</architecture><xi:include href="core.xml"/></target>')


def core_xml() -> bytes:
    regs = []
    for r in X86_64:
        extra = ' regnum="0"' if r.regnum == 0 else ""
        regs.append(f'  <reg name="{r.name}" bitsize="{r.bitsize}" type="int"{extra}/>\n')
        if r.name == "gs":
            regs.append('  <!--reg name="cs_base" bitsize="64" type="int64"/-->\n')
    return ('<?xml version="1.0"?>\n<!DOCTYPE feature SYSTEM "gdb-target.dtd">\n'
            '<feature name="org.gnu.gdb.i386.core">\n' + "".join(regs) + "</feature>\n").encode()


def g_reply(values: Dict[str, int]) -> bytes:
    out = b""
    for r in X86_64:
        out += values.get(r.name, 0).to_bytes(r.size, "little").hex().encode()
    return out


# -- attach ------------------------------------------------------------------------

QSUP = b"qSupported:swbreak+;hwbreak+;vContSupported+"


def attach_script_ack_mode() -> List[Step]:
    """What QEMU 7.2 does: ack mode, attach T02 first, target.xml via qXfer."""
    def a(request: bytes, reply: bytes) -> List[Step]:
        return [send(pkt(request)), recv(b"+" + pkt(reply)), send(b"+")]
    core = core_xml()
    half = len(core) // 2
    return [
        send(b"+"), send(pkt(QSUP)),
        recv(pkt(b"T02thread:01;") + b"+" + pkt(
            b"PacketSize=1000;qXfer:features:read+;vContSupported+;multiprocess+")),
        send(b"+"), send(b"+"),
        *a(b"qXfer:features:read:target.xml:0,7f8", b"l" + TARGET_XML),
        *a(b"qXfer:features:read:core.xml:0,7f8", b"m" + core[:half]),
        *a(b"qXfer:features:read:core.xml:%x,7f8" % half, b"l" + core[half:]),
        *a(b"vCont?", b"vCont;c;C;s;S"),
        *a(b"?", b"T02thread:01;"),
    ]


def test_attach_like_qemu72() -> None:
    t = FakeTransport(*attach_script_ack_mode())
    c = RspClient.attach(t)  # type: ignore[arg-type]
    assert t.done()
    assert c.state is Runstate.STOPPED and c.session.ack_mode
    assert c.architecture == "i386:x86-64"
    assert c.registers.names == X86_64.names and c.registers.g_size == 608
    assert c.vcont_actions == {"c", "C", "s", "S"}
    assert c.stop is not None and c.stop.signal == 2


def test_attach_with_no_ack_and_no_qxfer_keeps_builtin_table() -> None:
    t = FakeTransport(
        send(b"+"), send(pkt(QSUP)), recv(b"+" + pkt(b"PacketSize=800;QStartNoAckMode+")), send(b"+"),
        send(pkt(b"QStartNoAckMode")), recv(b"+" + pkt(b"OK")), send(b"+"),
        *x(b"vCont?", b""), *x(b"?", b"S05"))
    c = RspClient.attach(t)  # type: ignore[arg-type]
    assert t.done() and not c.session.ack_mode and c.registers is X86_64
    assert c.vcont_actions == frozenset()


def test_attach_bad_target_description_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    t = FakeTransport(
        send(b"+"), send(pkt(QSUP)),
        recv(b"+" + pkt(b"PacketSize=1000;qXfer:features:read+;QStartNoAckMode+")), send(b"+"),
        send(pkt(b"QStartNoAckMode")), recv(b"+" + pkt(b"OK")), send(b"+"),
        *x(b"qXfer:features:read:target.xml:0,7f8", b"E00"),
        *x(b"vCont?", b"vCont;c"), *x(b"?", b"T05thread:01;"))
    with caplog.at_level(logging.WARNING):
        c = RspClient.attach(t)  # type: ignore[arg-type]
    assert c.registers is X86_64 and "built-in" in caplog.text and t.done()


def test_failed_attach_tries_to_detach_then_closes() -> None:
    # A broken '?' reply: QEMU already paused the VM, so we send D before closing.
    t = FakeTransport(
        send(b"+"), send(pkt(QSUP)), recv(b"+" + pkt(b"QStartNoAckMode+")), send(b"+"),
        send(pkt(b"QStartNoAckMode")), recv(b"+" + pkt(b"OK")), send(b"+"),
        *x(b"vCont?", b""), *x(b"?", b"OK"), *x(b"D", b"OK"))
    with pytest.raises(RspProtocolError, match="not a stop reply"):
        RspClient.attach(t)  # type: ignore[arg-type]
    assert t.done() and t.closed


def test_failed_attach_whose_detach_fails_still_closes(caplog: pytest.LogCaptureFixture) -> None:
    t = FakeTransport(
        send(b"+"), send(pkt(QSUP)), recv(b"+" + pkt(b"QStartNoAckMode+")), send(b"+"),
        send(pkt(b"QStartNoAckMode")), recv(b"+" + pkt(b"OK")), send(b"+"),
        *x(b"vCont?", b""), *x(b"?", b"OK"), send(pkt(b"D")), TIMEOUT)
    with caplog.at_level(logging.WARNING), pytest.raises(RspProtocolError):
        RspClient.attach(t)  # type: ignore[arg-type]
    assert "could not detach" in caplog.text and t.closed


def test_read_feature_errors() -> None:
    c, t = client_with(*x(b"qXfer:features:read:a.xml:0,7f8", b"zz"))
    with pytest.raises(RspProtocolError, match="unexpected reply"):
        c.read_feature("a.xml")
    c, t = client_with(*x(b"qXfer:features:read:a.xml:0,7f8", b"m"))
    with pytest.raises(RspProtocolError, match="empty 'm' chunk"):
        c.read_feature("a.xml")
    big = b"m" + b"a" * 0x7F8
    script = []
    for i in range(0, (1 << 20) + 0x7F8, 0x7F8):
        script += x(b"qXfer:features:read:a.xml:%x,7f8" % i, big)
    c, t = client_with(*script)
    with pytest.raises(RspProtocolError, match="larger than"):
        c.read_feature("a.xml")


# -- registers -----------------------------------------------------------------------

def test_read_registers_g() -> None:
    values = {"rax": 1, "rip": 0xFFFFFFFF810E3E40, "eflags": 0x246, "cs": 0x10,
              "cr3": 0x2A10000, "st0": (1 << 79) | 5, "xmm15": (1 << 127) | 7, "mxcsr": 0x1F80}
    c, t = client_with(*x(b"g", g_reply(values)))
    regs = c.read_registers()
    assert len(regs) == 66
    for name, value in values.items():
        assert regs[name] == value
    assert regs["rbx"] == 0


def test_read_registers_short_and_unavailable() -> None:
    reply = g_reply({"rip": 0x1234})[:X86_64["cs"].offset * 2]
    reply = b"xx" * 8 + reply[16:]           # rax unavailable
    c, t = client_with(*x(b"g", reply))
    regs = c.read_registers()
    assert "rax" not in regs and regs["rip"] == 0x1234 and regs["eflags"] == 0
    assert "cs" not in regs


def test_read_registers_odd_reply() -> None:
    c, t = client_with(*x(b"g", b"000"))
    with pytest.raises(RspProtocolError, match="odd-length"):
        c.read_registers()


def test_read_register_p() -> None:
    c, t = client_with(*x(b"p10", b"403e0e81ffffffff"), *x(b"p11", b"46020000"))
    assert c.read_register("rip") == 0xFFFFFFFF810E3E40
    assert c.read_register("eflags") == 0x246
    assert t.done()


def test_read_register_falls_back_to_g_when_p_is_unsupported() -> None:
    # QEMU 7.2 answers p with '' until target.xml was read.
    c, t = client_with(*x(b"p1d", b""), *x(b"g", g_reply({"cr3": 0x2A10000})),
                       *x(b"g", g_reply({"cr3": 0x1000})))
    assert c.read_register("cr3") == 0x2A10000
    assert c.read_register("cr3") == 0x1000   # p is not tried again
    assert t.done()


def test_read_register_errors() -> None:
    c, t = client_with(*x(b"p10", b"E14"), *x(b"p10", b"xxxxxxxxxxxxxxxx"), *x(b"p10", b"0000"),
                       *x(b"p10", b""), *x(b"g", b"00" * 8))
    with pytest.raises(RspRemoteError):
        c.read_register("rip")
    with pytest.raises(RspUnsupportedError, match="unavailable"):
        c.read_register("rip")
    with pytest.raises(RspProtocolError, match="rip is 8 bytes, the stub sent 2"):
        c.read_register("rip")
    with pytest.raises(RspUnsupportedError, match="not in the stub's 'g' reply"):
        c.read_register("rip")
    with pytest.raises(RspUnsupportedError, match="not in this target's description"):
        c.read_register("r99")


def test_set_register_p() -> None:
    c, t = client_with(*x(b"P10=453e0e81ffffffff", b"OK"))
    c.set_register("rip", 0xFFFFFFFF810E3E45)
    assert t.done()


def test_set_register_falls_back_to_g_and_G() -> None:
    before = g_reply({"rip": 0x1000, "rax": 7})
    after = g_reply({"rip": 0x1005, "rax": 7})
    c, t = client_with(*x(b"P10=0510000000000000", b""), *x(b"g", before), *x(b"G" + after, b"OK"),
                       *x(b"g", after), *x(b"G" + g_reply({"rip": 0x1006, "rax": 7}), b"OK"))
    c.set_register("rip", 0x1005)
    c.set_register("rip", 0x1006)   # P is not tried again
    assert t.done()


def test_set_register_errors() -> None:
    c, t = client_with(*x(b"P10=0000000000000000", b"E22"), *x(b"P10=0000000000000000", b"??"),
                       *x(b"P10=0000000000000000", b""), *x(b"g", b"00" * 8),
                       *x(b"g", g_reply({})), *x(b"G" + g_reply({}), b"E01"),
                       *x(b"g", g_reply({})), *x(b"G" + g_reply({}), b"KO"))
    with pytest.raises(RspRemoteError):
        c.set_register("rip", 0)
    with pytest.raises(RspProtocolError, match="unexpected reply to P"):
        c.set_register("rip", 0)
    with pytest.raises(RspUnsupportedError, match="not in the stub's 'g' reply"):
        c.set_register("rip", 0)
    with pytest.raises(RspRemoteError):
        c.set_register("rip", 0)
    with pytest.raises(RspProtocolError, match="unexpected reply to G"):
        c.set_register("rip", 0)
    assert t.done()


def test_select_thread() -> None:
    c, t = client_with(*x(b"Hg2", b"OK"), *x(b"Hgp1.2", b"OK"), *x(b"Hg1", b"E22"), *x(b"Hg1", b"X"))
    c.select_thread(2)
    c.select_thread(ThreadId(2, 1))
    with pytest.raises(RspRemoteError):
        c.select_thread(1)
    with pytest.raises(RspProtocolError):
        c.select_thread(1)


# -- memory ------------------------------------------------------------------------

def test_read_memory_is_chunked_by_packet_size() -> None:
    # PacketSize 0x100: at most (256 - 16) // 2 = 120 bytes per 'm'.
    data = bytes(range(256)) + bytes(44)
    c, t = client_with(*x(b"m1000,78", data[:120].hex().encode()),
                       *x(b"m1078,78", data[120:240].hex().encode()),
                       *x(b"m10f0,3c", data[240:].hex().encode()), packet_size=0x100)
    assert c.max_read == 120
    assert c.read_memory(0x1000, 300) == data
    assert t.done()


def test_read_memory_accepts_short_chunks() -> None:
    c, t = client_with(*x(b"m1000,8", b"00112233"), *x(b"m1004,4", b"44556677"))
    assert c.read_memory(0x1000, 8) == bytes.fromhex("0011223344556677")


def test_read_memory_zero_length() -> None:
    c, t = client_with()
    assert c.read_memory(0x1000, 0) == b""


@pytest.mark.parametrize("reply,exc,match", [
    (b"E14", RspRemoteError, "E14"),
    (b"", RspUnsupportedError, "m1000,4"),
    (b"0011223344", RspProtocolError, "asked for 4 bytes, the stub sent 5"),
    (b"OK", RspProtocolError, "hex"),
])
def test_read_memory_errors(reply: bytes, exc: type, match: str) -> None:
    c, t = client_with(*x(b"m1000,4", reply))
    with pytest.raises(exc, match=match):
        c.read_memory(0x1000, 4)


def test_read_memory_empty_reply_is_unsupported() -> None:
    # An 'm' reply with no data would loop forever; it is the "unsupported" reply.
    c, t = client_with(send(pkt(b"m1000,4")), recv(b"$#00"))
    with pytest.raises(RspUnsupportedError):
        c.read_memory(0x1000, 4)


def test_read_memory_unmapped_errno() -> None:
    c, t = client_with(*x(b"mdead000000000000,8", b"E14"))
    with pytest.raises(RspRemoteError) as exc:
        c.read_memory(0xDEAD000000000000, 8)
    assert exc.value.errno == 14


def test_write_memory_chunks() -> None:
    data = bytes(range(200))
    # PacketSize 0x100: at most (256 - 48) // 2 = 104 bytes per 'M'.
    c, t = client_with(*x(b"M2000,68:" + data[:104].hex().encode(), b"OK"),
                       *x(b"M2068,60:" + data[104:].hex().encode(), b"OK"),
                       *x(b"M0,1:00", b"E14"), *x(b"M0,1:00", b""), packet_size=0x100)
    c.write_memory(0x2000, data)
    with pytest.raises(RspRemoteError):
        c.write_memory(0, b"\0")
    with pytest.raises(RspUnsupportedError):
        c.write_memory(0, b"\0")


def test_write_memory_odd_reply() -> None:
    c, t = client_with(*x(b"M0,1:00", b"KO"))
    with pytest.raises(RspProtocolError, match="unexpected reply to M"):
        c.write_memory(0, b"\0")


# -- breakpoints and execution ----------------------------------------------------------------

def test_breakpoints() -> None:
    site = 0xFFFFFFFF810E3E40
    c, t = client_with(*x(b"Z0,ffffffff810e3e40,1", b"OK"), *x(b"z0,ffffffff810e3e40,1", b"OK"),
                       *x(b"Z1,ffffffff810e3e40,1", b"OK"), *x(b"z1,ffffffff810e3e40,1", b"OK"))
    c.insert_breakpoint(site)
    c.remove_breakpoint(site)
    c.insert_hw_breakpoint(site)
    c.remove_hw_breakpoint(site)
    assert t.done()


def test_breakpoint_errors() -> None:
    c, t = client_with(*x(b"Z1,1000,1", b""), *x(b"Z0,1000,1", b"E22"), *x(b"Z0,1000,1", b"1"))
    with pytest.raises(RspUnsupportedError, match="cannot plant"):
        c.insert_hw_breakpoint(0x1000)
    with pytest.raises(RspRemoteError):
        c.insert_breakpoint(0x1000)
    with pytest.raises(RspProtocolError, match="unexpected reply to Z0"):
        c.insert_breakpoint(0x1000)


def test_trap_cycle_resume_past_the_fentry_nop() -> None:
    """The backend's loop: continue, stop at the site, read, RIP = site + 5, continue."""
    site = 0xFFFFFFFF810E3E40
    c, t = client_with(
        *x(b"Z0,ffffffff810e3e40,1", b"OK"),
        send(pkt(b"vCont;c")), recv(pkt(b"T05thread:01;")),
        *x(b"p10", (site).to_bytes(8, "little").hex().encode()),
        *x(b"P10=" + (site + 5).to_bytes(8, "little").hex().encode(), b"OK"),
        send(pkt(b"vCont;c")), TIMEOUT, send(b"\x03"), recv(pkt(b"T02thread:01;")),
        *x(b"D", b"OK"))
    c.insert_breakpoint(site)
    c.cont()
    assert c.state is Runstate.RUNNING
    stop = c.wait_stop(1.0)
    assert stop.is_breakpoint and c.read_register("rip") == site
    c.set_register("rip", site + 5)
    c.cont()
    with pytest.raises(RspTimeout):
        c.wait_stop(0.01)
    assert c.interrupt().signal == 2
    c.detach()
    assert c.state is Runstate.DISCONNECTED and t.closed and t.done()


def test_cont_without_vcont_uses_c() -> None:
    c, t = client_with(send(pkt(b"c")), vcont=frozenset())
    c.cont()
    assert t.done()


def test_methods_need_the_right_state() -> None:
    c, t = client_with(send(pkt(b"vCont;c")))
    with pytest.raises(StateError):
        c.wait_stop()
    with pytest.raises(StateError):
        c.interrupt()
    c.cont()
    for call in (lambda: c.read_memory(0, 1), lambda: c.read_registers(),
                 lambda: c.insert_breakpoint(0), lambda: c.set_register("rip", 0), c.cont):
        with pytest.raises(StateError, match="running, needs stopped"):
            call()


# -- detach -----------------------------------------------------------------------------------

def test_detach_while_running_interrupts_first() -> None:
    c, t = client_with(send(pkt(b"vCont;c")), send(b"\x03"), recv(pkt(b"T02thread:01;")),
                       *x(b"D", b"OK"))
    c.cont()
    c.detach()
    assert t.done() and t.closed
    c.detach()  # idempotent


def test_detach_when_the_target_exits_meanwhile() -> None:
    c, t = client_with(send(pkt(b"c")), send(b"\x03"), recv(pkt(b"W00")), vcont=frozenset())
    c.cont()
    c.detach()
    assert t.done() and t.closed


def test_detach_error_still_closes() -> None:
    c, t = client_with(*x(b"D", b"E22"))
    with pytest.raises(RspRemoteError):
        c.detach()
    assert t.closed
    c, t = client_with(*x(b"D", b"??"))
    with pytest.raises(RspProtocolError, match="unexpected reply to D"):
        c.detach()


def test_context_manager_detaches_and_swallows_rsp_errors(caplog: pytest.LogCaptureFixture) -> None:
    c, t = client_with(*x(b"D", b"OK"))
    with c:
        pass
    assert t.closed and t.done()
    c, t = client_with(*x(b"D", b"E22"))
    with caplog.at_level(logging.WARNING), c:
        pass
    assert t.closed and "detach failed" in caplog.text


def test_close_does_not_detach() -> None:
    c, t = client_with()
    c.close()
    assert t.closed and c.state is Runstate.DISCONNECTED


# -- over a real socket -----------------------------------------------------------------------

def test_connect_unix_against_a_scripted_stub(tmp_path: object) -> None:
    path = f"{tmp_path}/gdb.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)
    script = [(b"+$qSupported:swbreak+;hwbreak+;vContSupported+#", b"+$QStartNoAckMode+#" +
               b"%02x" % (sum(b"QStartNoAckMode+") & 255)),
              (b"+$QStartNoAckMode#b0", b"+$OK#9a"),
              (b"+$vCont?#49", b"$vCont;c#a8"),
              (b"$?#3f", b"$T05thread:01;#07"),
              (b"$D#44", b"$OK#9a")]
    received: List[bytes] = []

    def stub() -> None:
        conn, _ = srv.accept()
        buf = b""
        for want, reply in script:
            while want not in buf:
                data = conn.recv(4096)
                if not data:
                    return
                buf += data
            received.append(buf)
            buf = buf[buf.index(want) + len(want):]
            if want.endswith(b"#"):
                buf = buf[2:]  # checksum
            conn.sendall(reply)
        conn.close()

    th = threading.Thread(target=stub, daemon=True)
    th.start()
    c = RspClient.connect_unix(path, timeout=2.0)
    assert c.state is Runstate.STOPPED and not c.session.ack_mode and c.vcont_actions == {"c"}
    c.detach()
    th.join(2.0)
    assert len(received) == 5
    srv.close()


def test_connect_tcp_refused() -> None:
    srv = socket.socket(socket.AF_INET)
    srv.bind(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    srv.close()
    with pytest.raises(RspConnectionError, match="cannot connect"):
        RspClient.connect_tcp("127.0.0.1", port, timeout=0.5)


# -- register tables ------------------------------------------------------------------------------

def test_builtin_x86_64_table_matches_qemu_numbering() -> None:
    expect = {"rax": 0, "rbx": 1, "rcx": 2, "rdx": 3, "rsi": 4, "rdi": 5, "rbp": 6, "rsp": 7,
              "r8": 8, "r15": 15, "rip": 16, "eflags": 17, "cs": 18, "ss": 19, "ds": 20,
              "es": 21, "fs": 22, "gs": 23, "fs_base": 24, "gs_base": 25, "k_gs_base": 26,
              "cr0": 27, "cr2": 28, "cr3": 29, "cr4": 30, "cr8": 31, "efer": 32, "st0": 33,
              "st7": 40, "fctrl": 41, "fop": 48, "xmm0": 49, "xmm15": 64, "mxcsr": 65}
    for name, num in expect.items():
        assert X86_64[name].regnum == num, name
        assert X86_64.by_number(num) is X86_64[name]
    assert X86_64["eflags"].size == 4 and X86_64["st0"].size == 10 and X86_64["xmm0"].size == 16
    assert X86_64["rip"].offset == 128 and X86_64["cr3"].offset == 204
    assert X86_64.g_size == 608 and len(X86_64) == 66 and "rip" in X86_64


def test_parse_target_description_quirks() -> None:
    docs = {"target.xml": TARGET_XML, "core.xml": core_xml()}
    table = parse_target_description(docs.__getitem__)
    assert table.names == X86_64.names and table.architecture == "i386:x86-64"
    assert "cs_base" not in table


def test_parse_target_description_regnum_gaps() -> None:
    doc = (b"<target><feature><reg name='a' bitsize='32'/><reg name='b' bitsize='64' regnum='5'/>"
           b"<reg name='c' bitsize='8'/></feature></target>")
    t = parse_target_description(lambda name: doc)
    assert [(r.name, r.regnum, r.offset) for r in t] == [("a", 0, 0), ("b", 5, 4), ("c", 6, 12)]


@pytest.mark.parametrize("docs,match", [
    ({"target.xml": b"<target/>"}, "lists no registers"),
    ({"target.xml": b"<reg name='a'/>"}, "unusable <reg>"),
    ({"target.xml": b"<reg name='a' bitsize='x'/>"}, "unusable <reg>"),
    ({"target.xml": b"<reg name='a' bitsize='12'/>"}, "unusable bitsize"),
    ({"target.xml": b"<reg name='a' bitsize='8'/><reg name='a' bitsize='8'/>"}, "described twice"),
    ({"target.xml": b"<xi:include href='target.xml'/>"}, "repeated include"),
    ({"target.xml": b"<xi:include/>"}, "bad or repeated include"),
])
def test_parse_target_description_errors(docs: Dict[str, bytes], match: str) -> None:
    with pytest.raises(RspProtocolError, match=match):
        parse_target_description(docs.__getitem__)


def test_parse_target_description_include_depth() -> None:
    def fetch(name: str) -> bytes:
        n = int(name.split(".")[0]) if name != "target.xml" else 0
        return b"<xi:include href='%d.xml'/>" % (n + 1)
    with pytest.raises(RspProtocolError, match="nest too deep"):
        parse_target_description(fetch)


def test_register_table_from_spec() -> None:
    t = RegisterTable([("pc", 32, None), ("sp", 32, None)], architecture="arm", byteorder="little")
    assert t["sp"].offset == 4 and t.g_size == 8 and t.names == ["pc", "sp"]


def test_failed_attach_after_the_session_is_gone_sends_nothing() -> None:
    t = FakeTransport(send(b"+"), send(pkt(QSUP)), TIMEOUT)
    with pytest.raises(RspTimeout):
        RspClient.attach(t)  # type: ignore[arg-type]
    assert t.done() and t.closed
