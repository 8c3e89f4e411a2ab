"""Reply parsers: "Stop Reply Packets", qSupported, "Standard Replies"."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kairos_libvirt.introspect.rsp.errors import (
    RspProtocolError, RspRemoteError, RspUnsupportedError)
from kairos_libvirt.introspect.rsp.packets import (
    SIGINT, SIGTRAP, StopReply, ThreadId, check_reply, is_console_output, is_stop_reply,
    parse_console_output, parse_stop_reply, parse_supported, parse_thread_id)


def test_thread_ids() -> None:
    assert parse_thread_id(b"01") == ThreadId(1)
    assert parse_thread_id(b"p01.02") == ThreadId(2, 1)
    assert parse_thread_id(b"p1") == ThreadId(-1, 1)
    assert parse_thread_id(b"-1") == ThreadId(-1)
    assert parse_thread_id(b"p-1.-1") == ThreadId(-1, -1)
    assert ThreadId(2, 1).encode() == b"p1.2"
    assert ThreadId(-1).encode() == b"-1"
    assert ThreadId(10).encode() == b"a"
    for bad in (b"", b"zz", b"p.1", b"p1.x"):
        with pytest.raises(RspProtocolError):
            parse_thread_id(bad)


def test_qemu_breakpoint_stop() -> None:
    # QEMU 7.2 reports a breakpoint as a bare T05 (no swbreak reason).
    stop = parse_stop_reply(b"T05thread:01;")
    assert stop == StopReply("signal", b"T05thread:01;", signal=SIGTRAP, thread=ThreadId(1))
    assert stop.stopped and stop.is_breakpoint


def test_qemu_interrupt_stop() -> None:
    stop = parse_stop_reply(b"T02thread:p01.01;")
    assert stop.signal == SIGINT and stop.thread == ThreadId(1, 1)
    assert stop.stopped and not stop.is_breakpoint


def test_stop_with_reason_registers_and_core() -> None:
    stop = parse_stop_reply(b"T05thread:p01.02;swbreak:;10:efbeadde00000000;core:1;")
    assert stop.reason == "swbreak" and stop.reason_value == b""
    assert stop.registers == {0x10: bytes.fromhex("efbeadde00000000")}
    assert stop.core == 1 and stop.thread == ThreadId(2, 1)
    assert stop.is_breakpoint


def test_hwbreak_counts_as_breakpoint_even_with_another_signal() -> None:
    assert parse_stop_reply(b"T0bhwbreak:;").is_breakpoint


def test_watch_reason_keeps_address_and_unknown_pairs_are_ignored() -> None:
    stop = parse_stop_reply(b"T05watch:ffff8880001000;frobnicate:zz;")
    assert stop.reason == "watch" and stop.reason_value == b"ffff8880001000"
    assert stop.registers == {}


def test_s_w_x_replies() -> None:
    assert parse_stop_reply(b"S05") == StopReply("signal", b"S05", signal=5)
    assert parse_stop_reply(b"W00") == StopReply("exited", b"W00", exit_status=0)
    w = parse_stop_reply(b"W01;process:1a")
    assert w.exit_status == 1 and w.pid == 0x1A and not w.stopped and not w.is_breakpoint
    x = parse_stop_reply(b"X09")
    assert x.kind == "terminated" and x.signal == 9 and not x.stopped


@pytest.mark.parametrize("raw", [
    b"OK", b"T", b"T0", b"Tzz", b"S05x", b"W00;pid:1", b"W00;process:zz",
    b"T05thread", b"T0510:zz;", b"T05thread:q;", b"T05core:zz;",
])
def test_malformed_stop_replies_keep_raw(raw: bytes) -> None:
    with pytest.raises(RspProtocolError) as exc:
        parse_stop_reply(raw)
    assert exc.value.raw


def test_empty_core_value() -> None:
    assert parse_stop_reply(b"T05core:;").core is None


def test_is_stop_reply() -> None:
    assert is_stop_reply(b"T05") and is_stop_reply(b"W00")
    assert not is_stop_reply(b"OK") and not is_stop_reply(b"T0") and not is_stop_reply(b"")


def test_console_output() -> None:
    assert is_console_output(b"O68690a")
    assert parse_console_output(b"O68690a") == b"hi\n"
    assert not is_console_output(b"OK")
    assert not is_console_output(b"O")
    assert not is_console_output(b"O6")
    assert not is_console_output(b"Ozz")


def test_parse_supported_recorded_qemu_reply() -> None:
    features = parse_supported(
        b"PacketSize=1000;qXfer:features:read+;vContSupported+;multiprocess+")
    assert features == {"PacketSize": "1000", "qXfer:features:read": True,
                        "vContSupported": True, "multiprocess": True}


def test_parse_supported_minus_query_and_empty_items() -> None:
    assert parse_supported(b"a-;b?;;QStartNoAckMode+") == {
        "a": False, "b": None, "QStartNoAckMode": True}
    with pytest.raises(RspProtocolError):
        parse_supported(b"PacketSize")


def test_check_reply() -> None:
    assert check_reply(b"m0,4", b"00000000") == b"00000000"
    assert check_reply(b"g", b"Ea") == b"Ea"  # not an error reply: odd hex cannot be data
    with pytest.raises(RspRemoteError) as exc:
        check_reply(b"m0,4", b"E14")
    assert exc.value.errno == 14 and exc.value.code == "14" and exc.value.raw == b"E14"
    assert "E14" in str(exc.value) and "m0,4" in str(exc.value)
    with pytest.raises(RspRemoteError) as exc:
        check_reply(b"Z0,1,1", b"E0a")
    assert exc.value.errno == 10
    with pytest.raises(RspRemoteError) as exc:
        check_reply(b"qRcmd", b"E.no such thing")
    assert exc.value.text == "no such thing" and exc.value.errno is None
    with pytest.raises(RspUnsupportedError, match="no Z1 here") as uexc:
        check_reply(b"Z1,0,1", b"", hint="no Z1 here")
    assert uexc.value.request == b"Z1,0,1"


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=60))
def test_parsers_raise_only_protocol_errors(raw: bytes) -> None:
    for parse in (parse_stop_reply, parse_supported, parse_thread_id):
        try:
            parse(raw)
        except RspProtocolError:
            pass
