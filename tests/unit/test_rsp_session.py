"""Session tests against a fake transport replaying scripted gdbstub conversations."""
from __future__ import annotations

import os
import socket
from collections import deque
from typing import List, Optional, Tuple

import pytest

from kairos_libvirt.introspect.rsp.errors import (
    RspBusyError, RspConnectionError, RspProtocolError, RspRemoteError, RspTimeout,
    RspUnsupportedError, StateError)
from kairos_libvirt.introspect.rsp.framing import encode_packet as pkt
from kairos_libvirt.introspect.rsp.packets import ThreadId
from kairos_libvirt.introspect.rsp.session import Runstate, Session
from kairos_libvirt.introspect.rsp.transport import SocketTransport

Step = Tuple[str, bytes]


def send(data: bytes) -> Step:
    """The client must write exactly these bytes next."""
    return ("send", data)


def recv(data: bytes) -> Step:
    """The stub delivers these bytes on the client's next read."""
    return ("recv", data)


TIMEOUT: Step = ("timeout", b"")
EOF: Step = ("eof", b"")
BROKEN: Step = ("broken", b"")


class FakeTransport:
    """Replays a script strictly: a write or read out of turn fails the test."""

    def __init__(self, *script: Step) -> None:
        self.script = deque(script)
        self.closed = False
        self.fail_send = False

    def send(self, data: bytes) -> None:
        assert not self.closed, "send after close"
        if self.fail_send:
            raise RspConnectionError("cannot send", BrokenPipeError(32, "Broken pipe"))
        data = bytes(data)
        while data:
            assert self.script and self.script[0][0] == "send", \
                f"client sent {data!r} but the script expects {self.script[0] if self.script else 'nothing'}"
            want = self.script[0][1]
            n = min(len(want), len(data))
            assert data[:n] == want[:n], f"client sent {data!r}, script expects {want!r}"
            data = data[n:]
            if n == len(want):
                self.script.popleft()
            else:
                self.script[0] = ("send", want[n:])

    def recv(self, timeout: Optional[float], wake: Optional[int] = None) -> bytes:
        assert not self.closed, "recv after close"
        assert self.script and self.script[0][0] != "send", \
            f"client reads but the script expects it to send {self.script[0] if self.script else 'nothing'}"
        kind, data = self.script.popleft()
        if kind == "timeout":
            raise TimeoutError("scripted timeout")
        if kind == "eof":
            return b""
        if kind == "broken":
            raise RspConnectionError("cannot read", ConnectionResetError(104, "reset"))
        return data

    def close(self) -> None:
        self.closed = True

    def done(self) -> bool:
        return not self.script


def ack_request(request: bytes, reply: bytes) -> List[Step]:
    """One exchange in ack mode, as QEMU 7.2 does it."""
    return [send(pkt(request)), recv(b"+" + pkt(reply)), send(b"+")]


def noack_request(request: bytes, reply: bytes) -> List[Step]:
    return [send(pkt(request)), recv(pkt(reply))]


QSUP = b"qSupported:swbreak+;hwbreak+;vContSupported+"
QEMU72_FEATURES = b"PacketSize=1000;qXfer:features:read+;vContSupported+;multiprocess+"
NEW_FEATURES = QEMU72_FEATURES + b";QStartNoAckMode+"


def stopped_session(*script: Step, ack: bool = False, **kw: object) -> Tuple[Session, FakeTransport]:
    t = FakeTransport(*script)
    s = Session(t, **kw)  # type: ignore[arg-type]
    s.state = Runstate.STOPPED
    s.ack_mode = ack
    return s, t


# -- handshake -----------------------------------------------------------------

def test_handshake_qemu72_stays_in_ack_mode_and_routes_attach_stop() -> None:
    # Recorded shape: QEMU 7.2 sends its T02 for the attach pause in front of the
    # '+' for our first packet, and does not offer QStartNoAckMode.
    t = FakeTransport(
        send(b"+"), send(pkt(QSUP)),
        recv(b"$T02thread:01;#04+$PacketSize=1000;qXfer:features:read+;"
             b"vContSupported+;multiprocess+#92"),
        send(b"+"), send(b"+"),
    )
    s = Session(t)
    features = s.handshake()
    assert features["qXfer:features:read"] is True
    assert s.packet_size == 0x1000 and s.ack_mode
    assert s.state is Runstate.STOPPED and s.stop is not None and s.stop.signal == 2
    assert t.done()


def test_handshake_switches_to_no_ack_mode() -> None:
    t = FakeTransport(
        send(b"+"), *ack_request(QSUP, NEW_FEATURES),
        *ack_request(b"QStartNoAckMode", b"OK"),   # the OK is still acknowledged
        *noack_request(b"?", b"T05thread:01;"),      # then nobody acks
    )
    s = Session(t)
    s.handshake()
    assert not s.ack_mode
    assert s.halt_reason().thread == ThreadId(1)
    assert s.state is Runstate.STOPPED and t.done()


def test_handshake_no_ack_refused_with_empty_reply_stays_in_ack_mode() -> None:
    t = FakeTransport(send(b"+"), *ack_request(QSUP, NEW_FEATURES),
                      *ack_request(b"QStartNoAckMode", b""))
    s = Session(t)
    s.handshake()
    assert s.ack_mode and t.done()


def test_handshake_no_ack_not_wanted() -> None:
    t = FakeTransport(send(b"+"), *ack_request(QSUP, NEW_FEATURES))
    s = Session(t)
    s.handshake(no_ack=False)
    assert s.ack_mode and t.done()


def test_handshake_no_ack_error_reply() -> None:
    t = FakeTransport(send(b"+"), *ack_request(QSUP, NEW_FEATURES),
                      *ack_request(b"QStartNoAckMode", b"E01"))
    with pytest.raises(RspRemoteError):
        Session(t).handshake()


def test_handshake_no_ack_odd_reply() -> None:
    t = FakeTransport(send(b"+"), *ack_request(QSUP, NEW_FEATURES),
                      *ack_request(b"QStartNoAckMode", b"KO"))
    with pytest.raises(RspProtocolError, match="QStartNoAckMode") as exc:
        Session(t).handshake()
    assert exc.value.raw == b"KO"


def test_handshake_without_qsupported() -> None:
    t = FakeTransport(send(b"+"), *ack_request(QSUP, b""))
    s = Session(t)
    assert s.handshake() == {} and s.packet_size == 400


@pytest.mark.parametrize("size,why", [(b"zz", "not a hex number"), (b"10", "too small")])
def test_handshake_bad_packet_size(size: bytes, why: str) -> None:
    t = FakeTransport(send(b"+"), *ack_request(QSUP, b"PacketSize=" + size))
    with pytest.raises(RspProtocolError, match=why):
        Session(t).handshake()


def test_handshake_error_reply() -> None:
    t = FakeTransport(send(b"+"), *ack_request(QSUP, b"E01"))
    with pytest.raises(RspRemoteError):
        Session(t).handshake()


# -- acks, NAKs, bad frames --------------------------------------------------------

def test_retransmit_on_nak() -> None:
    s, t = stopped_session(
        send(pkt(b"g")), recv(b"-"), send(pkt(b"g")), recv(b"+"), recv(pkt(b"00")), send(b"+"),
        ack=True)
    assert s.request(b"g") == b"00" and t.done()


def test_too_many_naks() -> None:
    s, t = stopped_session(send(pkt(b"g")), recv(b"-"), send(pkt(b"g")), recv(b"--"),
                           send(pkt(b"g")), ack=True, max_retransmits=2)
    with pytest.raises(RspProtocolError, match="rejected our packet 3 times") as exc:
        s.request(b"g")
    assert exc.value.raw == pkt(b"g")


def test_bad_checksum_is_naked_in_ack_mode() -> None:
    s, t = stopped_session(send(pkt(b"m0,1")), recv(b"+$00#00"), send(b"-"),
                           recv(pkt(b"00")), send(b"+"), ack=True)
    assert s.request(b"m0,1") == b"00" and t.done()


def test_bad_frames_beyond_the_limit() -> None:
    s, t = stopped_session(send(pkt(b"g")), recv(b"$00#00"), send(b"-"), recv(b"$00#00"),
                           ack=True, max_retransmits=1)
    with pytest.raises(RspProtocolError, match="checksum mismatch") as exc:
        s.request(b"g")
    assert exc.value.raw == b"$00#00"


def test_bad_checksum_in_no_ack_mode_is_an_error() -> None:
    s, t = stopped_session(send(pkt(b"g")), recv(b"$00#01"))
    with pytest.raises(RspProtocolError, match="checksum mismatch"):
        s.request(b"g")


def test_noise_notifications_and_no_ack_naks_are_ignored() -> None:
    s, t = stopped_session(send(pkt(b"g")),
                           recv(b"\r\n-\x03" + b"%Stop:T05#" + b"%02x" % (sum(b"Stop:T05") & 255)),
                           recv(pkt(b"00")))
    assert s.request(b"g") == b"00" and t.done()


# -- requests ------------------------------------------------------------------------

def test_error_reply_is_returned_for_the_caller() -> None:
    s, t = stopped_session(*noack_request(b"m0,4", b"E14"))
    assert s.request(b"m0,4") == b"E14"


def test_console_output_during_a_request() -> None:
    seen: List[bytes] = []
    s, t = stopped_session(send(pkt(b"qRcmd,6865")), recv(pkt(b"O68690a")), recv(pkt(b"OK")),
                           on_console=seen.append)
    assert s.request(b"qRcmd,6865") == b"OK" and seen == [b"hi\n"]


def test_console_output_without_callback_goes_to_the_log(caplog: pytest.LogCaptureFixture) -> None:
    import logging
    caplog.set_level(logging.DEBUG, logger="kairos_libvirt.introspect.rsp.session")
    s, t = stopped_session(send(pkt(b"g")), recv(pkt(b"O6869")), recv(pkt(b"00")))
    assert s.request(b"g") == b"00"
    assert "hi" in caplog.text


def test_request_timeout_closes_the_session() -> None:
    s, t = stopped_session(send(pkt(b"m1000,4")), TIMEOUT, timeout=0.5)
    with pytest.raises(RspTimeout) as exc:
        s.request(b"m1000,4")
    assert exc.value.closed and "m1000,4" in exc.value.pending and exc.value.timeout == 0.5
    assert "reconnect" in str(exc.value)
    assert s.state is Runstate.DISCONNECTED and t.closed


def test_endless_noise_still_times_out() -> None:
    ticks = iter(range(100))
    s, t = stopped_session(send(pkt(b"g")), *[recv(b"~")] * 10, timeout=3,
                           clock=lambda: float(next(ticks)))
    with pytest.raises(RspTimeout):
        s.request(b"g")
    assert s.state is Runstate.DISCONNECTED


def test_eof_during_request() -> None:
    s, t = stopped_session(send(pkt(b"g")), EOF)
    with pytest.raises(RspConnectionError, match="closed the connection"):
        s.request(b"g")
    assert s.state is Runstate.DISCONNECTED and t.closed


def test_eof_inside_a_frame_keeps_the_partial_bytes() -> None:
    s, t = stopped_session(send(pkt(b"g")), recv(b"$0011"), EOF)
    with pytest.raises(RspProtocolError) as exc:
        s.request(b"g")
    assert exc.value.raw == b"$0011"


def test_transport_read_failure_disconnects() -> None:
    s, t = stopped_session(send(pkt(b"g")), BROKEN)
    with pytest.raises(RspConnectionError, match="reset"):
        s.request(b"g")
    assert s.state is Runstate.DISCONNECTED


def test_transport_write_failure_disconnects() -> None:
    s, t = stopped_session()
    t.fail_send = True
    with pytest.raises(RspConnectionError, match="Broken pipe"):
        s.request(b"g")
    assert s.state is Runstate.DISCONNECTED and t.closed


def test_one_outstanding_request() -> None:
    s: Session

    def reenter(text: bytes) -> None:
        s.request(b"g")

    s, t = stopped_session(send(pkt(b"qRcmd,00")), recv(pkt(b"O6869")), on_console=reenter)
    with pytest.raises(RspBusyError, match="qRcmd") as exc:
        s.request(b"qRcmd,00")
    assert exc.value.pending == b"qRcmd,00"
    assert s._pending is None  # released for the next request


def test_unsolicited_stop_that_is_not_parseable_is_the_reply() -> None:
    # 'Tracepoints+' looks like a T stop reply but is not one.
    s, t = stopped_session(*noack_request(b"qSupported", b"Tracepoints+"))
    assert s.request(b"qSupported") == b"Tracepoints+"


def test_unsolicited_exit_during_request() -> None:
    s, t = stopped_session(send(pkt(b"g")), recv(pkt(b"W00")))
    with pytest.raises(RspConnectionError, match="target ended"):
        s.request(b"g")
    assert s.state is Runstate.DISCONNECTED and s.stop is not None and s.stop.kind == "exited"


def test_stale_stop_before_the_reply_to_question_mark_is_skipped_later() -> None:
    # If '?' gets the attach T02, its own reply arrives in front of the next answer.
    s, t = stopped_session(*noack_request(b"?", b"T02thread:01;"),
                           send(pkt(b"g")), recv(pkt(b"T02thread:01;") + pkt(b"00")))
    assert s.halt_reason().signal == 2
    assert s.request(b"g") == b"00"


def test_halt_reason_exited() -> None:
    s, t = stopped_session(*noack_request(b"?", b"W00"))
    assert s.halt_reason().kind == "exited"
    assert s.state is Runstate.DISCONNECTED and t.closed


# -- running ---------------------------------------------------------------------------

def test_resume_stop_with_thread_swbreak_and_console() -> None:
    seen: List[bytes] = []
    s, t = stopped_session(
        send(pkt(b"vCont;c")), recv(b"+"),
        recv(pkt(b"O626f6f740a")), send(b"+"),
        recv(pkt(b"T05thread:p01.02;swbreak:;")), send(b"+"),
        ack=True, on_console=seen.append)
    s.resume(b"vCont;c")
    assert s.state is Runstate.RUNNING and s.stop is None
    stop = s.wait_stop()
    assert stop.reason == "swbreak" and stop.thread == ThreadId(2, 1)
    assert seen == [b"boot\n"]
    assert s.state is Runstate.STOPPED and s.stop is stop and t.done()


def test_resume_nak_is_retransmitted() -> None:
    s, t = stopped_session(send(pkt(b"c")), recv(b"-"), send(pkt(b"c")), recv(b"+"), ack=True)
    s.resume(b"c")
    assert s.state is Runstate.RUNNING and t.done()


def test_resume_stop_before_ack_is_kept_for_wait_stop() -> None:
    s, t = stopped_session(send(pkt(b"c")), recv(pkt(b"T05thread:01;")), send(b"+"), ack=True)
    s.resume(b"c")
    assert s.wait_stop().signal == 5 and t.done()


def test_resume_ack_timeout_closes() -> None:
    s, t = stopped_session(send(pkt(b"c")), TIMEOUT, ack=True)
    with pytest.raises(RspTimeout) as exc:
        s.resume(b"c")
    assert exc.value.closed and "acknowledgment" in exc.value.pending
    assert s.state is Runstate.DISCONNECTED


def test_resume_in_no_ack_mode_waits_for_nothing() -> None:
    s, t = stopped_session(send(pkt(b"c")), recv(b"\r\n"), recv(pkt(b"S05")))
    s.resume(b"c")
    assert s.wait_stop().signal == 5 and t.done()


def test_wait_stop_timeout_leaves_target_running_then_interrupt() -> None:
    s, t = stopped_session(send(pkt(b"vCont;c")), TIMEOUT, send(b"\x03"),
                           recv(pkt(b"T02thread:01;")))
    s.resume(b"vCont;c")
    with pytest.raises(RspTimeout) as exc:
        s.wait_stop(0.25)
    assert not exc.value.closed and "stop reply after 'vCont;c'" in exc.value.pending
    assert s.state is Runstate.RUNNING
    s.interrupt()
    assert s.wait_stop().signal == 2 and s.state is Runstate.STOPPED


def test_wait_stop_exit_closes() -> None:
    s, t = stopped_session(send(pkt(b"c")), recv(pkt(b"X09;process:1")))
    s.resume(b"c")
    stop = s.wait_stop()
    assert stop.kind == "terminated" and stop.signal == 9
    assert s.state is Runstate.DISCONNECTED and t.closed


@pytest.mark.parametrize("reply,exc_type", [(b"E22", RspRemoteError), (b"", RspUnsupportedError)])
def test_refused_resume_means_still_stopped(reply: bytes, exc_type: type) -> None:
    s, t = stopped_session(send(pkt(b"vCont;c")), recv(pkt(reply)))
    s.resume(b"vCont;c")
    with pytest.raises(exc_type):
        s.wait_stop()
    assert s.state is Runstate.STOPPED


@pytest.mark.parametrize("reply", [b"OK", b"Exyz"])
def test_unexpected_packet_while_running(reply: bytes) -> None:
    s, t = stopped_session(send(pkt(b"c")), recv(pkt(reply)))
    s.resume(b"c")
    with pytest.raises(RspProtocolError, match="unexpected packet") as exc:
        s.wait_stop()
    assert exc.value.raw == pkt(reply)
    assert s.state is Runstate.RUNNING


def test_malformed_stop_reply_assumes_stopped() -> None:
    s, t = stopped_session(send(pkt(b"c")), recv(pkt(b"T05nocolon")))
    s.resume(b"c")
    with pytest.raises(RspProtocolError):
        s.wait_stop()
    assert s.state is Runstate.STOPPED


# -- run-state guard ---------------------------------------------------------------------

def test_state_guard() -> None:
    s, t = stopped_session(send(pkt(b"c")))
    with pytest.raises(StateError) as exc:
        s.wait_stop()
    assert exc.value.state is Runstate.STOPPED and exc.value.required == (Runstate.RUNNING,)
    assert "wait_stop" in str(exc.value) and "needs running" in str(exc.value)
    with pytest.raises(StateError):
        s.interrupt()
    with pytest.raises(StateError):
        s.handshake()
    s.resume(b"c")
    with pytest.raises(StateError, match="request: gdbstub session is running"):
        s.request(b"g")
    with pytest.raises(StateError):
        s.resume(b"c")
    s.close()
    assert s.state is Runstate.DISCONNECTED and t.closed
    with pytest.raises(StateError):
        s.request(b"g")
    s.close()  # idempotent


# -- the socket transport ----------------------------------------------------------------

def test_socket_transport_roundtrip_timeout_and_eof() -> None:
    a, b = socket.socketpair()
    t = SocketTransport(a, "pair")
    t.send(b"$g#67")
    assert b.recv(10) == b"$g#67"
    with pytest.raises(TimeoutError):
        t.recv(0.01)
    b.sendall(b"+")
    assert t.recv(1.0) == b"+"
    b.close()
    assert t.recv(1.0) == b""
    with pytest.raises(RspConnectionError, match="cannot send"):
        for _ in range(100):  # the first write after the peer closed may still succeed
            t.send(b"x" * 65536)
    t.close()
    t.close()
    with pytest.raises(RspConnectionError, match="is closed"):
        t.send(b"+")
    with pytest.raises(RspConnectionError, match="is closed"):
        t.recv(0)


def test_socket_transport_wake_fd_ends_the_wait_but_data_comes_first() -> None:
    """The gdbstub loop sleeps on the socket and its control pipe: a readable pipe
    ends the wait as a timeout; bytes from the peer are never hidden behind it."""
    a, b = socket.socketpair()
    t = SocketTransport(a, "pair")
    r, w = os.pipe()
    try:
        with pytest.raises(TimeoutError):
            t.recv(0.01, wake=r)               # neither: the timeout
        os.write(w, b"x")
        with pytest.raises(TimeoutError, match="woken"):
            t.recv(None, wake=r)               # no timeout at all: the pipe ends it
        b.sendall(b"$S05#b8")
        assert t.recv(None, wake=r) == b"$S05#b8"  # both ready: the data
    finally:
        os.close(r), os.close(w)
        t.close()
        b.close()


def test_socket_transport_read_error() -> None:
    a, b = socket.socketpair()

    class Failing:
        def fileno(self) -> int:
            return a.fileno()

        def recv(self, n: int) -> bytes:
            raise ConnectionResetError(104, "Connection reset by peer")

        def close(self) -> None:
            a.close()

    t = SocketTransport(Failing(), "failing")  # type: ignore[arg-type]
    b.sendall(b"+")
    with pytest.raises(RspConnectionError, match="reset") as exc:
        t.recv(1.0)
    assert isinstance(exc.value.exc, ConnectionResetError)
    t.close()
    b.close()


def test_connect_unix_missing_socket(tmp_path: object) -> None:
    with pytest.raises(RspConnectionError, match="cannot connect") as exc:
        SocketTransport.connect_unix(f"{tmp_path}/nope.sock", timeout=0.5)
    assert isinstance(exc.value.exc, FileNotFoundError)


def test_connect_tcp_and_unix(tmp_path: object) -> None:
    srv = socket.socket(socket.AF_INET)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    t = SocketTransport.connect_tcp("127.0.0.1", srv.getsockname()[1], timeout=1.0)
    peer, _ = srv.accept()
    t.send(b"+")
    assert peer.recv(1) == b"+"
    t.close()
    peer.close()
    srv.close()
    path = f"{tmp_path}/gdb.sock"
    usrv = socket.socket(socket.AF_UNIX)
    usrv.bind(path)
    usrv.listen(1)
    u = SocketTransport.connect_unix(path, timeout=1.0)
    assert u.peer == f"unix:{path}"
    u.close()
    usrv.close()
