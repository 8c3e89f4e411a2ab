"""Byte fixtures for RSP framing (GDB manual "Overview", "Packet Acknowledgment")."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kairos_libvirt.errors import KairosError
from kairos_libvirt.introspect.rsp.errors import RspError, RspProtocolError
from kairos_libvirt.introspect.rsp.framing import (
    ACK, INTERRUPT, NAK, BadPacket, Decoder, Junk, Packet, checksum, encode_packet, escape,
    expand, from_hex, hex_int, to_hex, unescape)

# Recorded from QEMU 7.2's gdbstub (Debian 1:7.2+dfsg-7+deb12u18): the T02 it
# owes for pausing the VM at attach comes in front of the '+' for our packet.
QEMU_ATTACH = (b"$T02thread:01;#04+$PacketSize=1000;qXfer:features:read+;"
               b"vContSupported+;multiprocess+#92")


def events(data: bytes) -> list:
    return Decoder().feed(data)


# -- checksums and encoding -------------------------------------------------

@pytest.mark.parametrize("frame", [b"$OK#9a", b"$g#67", b"$?#3f", b"$E14#aa", b"$#00",
                                   b"$T05thread:01;#07", b"$vCont;c;C;s;S#62"])
def test_checksum_of_recorded_frames(frame: bytes) -> None:
    body, cs = frame[1:].split(b"#")
    assert checksum(body) == int(cs, 16)
    assert encode_packet(body) == frame


def test_encode_escapes_the_four_special_bytes() -> None:
    frame = encode_packet(b"a#b$c}d*e")
    body = b"a}\x03b}\x04c}]d}\x0ae"
    assert frame == b"$" + body + b"#%02x" % checksum(body)
    # the checksum covers the bytes as sent, not the payload
    assert checksum(body) != checksum(b"a#b$c}d*e")


def test_escape_roundtrip_and_passthrough() -> None:
    assert escape(b"plain") == b"plain"
    assert unescape(escape(bytes(range(256)))) == bytes(range(256))


def test_unescape_trailing_escape_keeps_raw() -> None:
    with pytest.raises(RspProtocolError) as exc:
        unescape(b"ab}")
    assert exc.value.raw == b"ab}"


# -- run-length decoding ------------------------------------------------------

@pytest.mark.parametrize("body,payload", [
    (b"0* ", b"0000"),                  # the manual's example: ' ' is 3 more
    (b"0*\"", b"0" * 6),                # six repeats must use '"' (5 more)
    (b"x*~", b"x" * 98),               # '~' (126) is the largest count
    (b"}]*!", b"}" * 5),                # a repeat copies the decoded byte
    (b"a*}b", b"a" * 97 + b"b"),        # the count byte is literal, even '}'
    (b"ab*+", b"a" + b"b" * 15),
])
def test_rle_expansion(body: bytes, payload: bytes) -> None:
    assert expand(body) == payload
    assert events(b"$" + body + b"#%02x" % checksum(body)) == [
        Packet(payload, b"$" + body + b"#%02x" % checksum(body))]


@pytest.mark.parametrize("body,why", [
    (b"*a", "nothing to repeat"),
    (b"a*", "without a count"),
    (b"a*\x1f", "count byte 0x1f"),
    (b"a*\x7f", "count byte 0x7f"),
    (b"a*$", "count byte 0x24"),
    (b"a*#", "count byte 0x23"),
    (b"ab}", "at the end"),
])
def test_rle_and_escape_errors(body: bytes, why: str) -> None:
    with pytest.raises(RspProtocolError, match=why) as exc:
        expand(body)
    assert exc.value.raw == body


def test_bad_rle_in_a_frame_is_a_bad_packet_not_an_exception() -> None:
    raw = b"$*a#%02x" % checksum(b"*a")
    (ev,) = events(raw)
    assert isinstance(ev, BadPacket) and ev.raw == raw and "nothing to repeat" in ev.why
    err = ev.error()
    assert isinstance(err, RspProtocolError) and err.raw == raw


# -- hex helpers --------------------------------------------------------------

def test_hex_helpers() -> None:
    assert to_hex(b"\x00\xffA") == b"00ff41"
    assert from_hex(b"00FF41") == b"\x00\xffA"
    assert hex_int(b"ffffffff81000000") == 0xFFFFFFFF81000000
    for bad in (b"0", b"zz", b"0g"):
        with pytest.raises(RspProtocolError):
            from_hex(bad)
    for bad in (b"", b"-1", b"x1"):
        with pytest.raises(RspProtocolError) as exc:
            hex_int(bad)
        assert exc.value.raw == bad


# -- the decoder ----------------------------------------------------------------

def test_recorded_qemu_attach_stream() -> None:
    assert events(QEMU_ATTACH) == [
        Packet(b"T02thread:01;", b"$T02thread:01;#04"),
        ACK,
        Packet(b"PacketSize=1000;qXfer:features:read+;vContSupported+;multiprocess+",
               QEMU_ATTACH[18:]),
    ]


def test_acks_naks_interrupt_and_junk() -> None:
    assert events(b"+-\x03") == [ACK, NAK, INTERRUPT]
    assert events(b"\r\n+") == [Junk(b"\r\n"), ACK]
    assert events(b"xx") == [Junk(b"xx")]


def test_notification_packet() -> None:
    (ev,) = events(b"%Stop:T05#" + b"%02x" % checksum(b"Stop:T05"))
    assert isinstance(ev, Packet) and ev.notification and ev.payload == b"Stop:T05"


def test_checksum_mismatch_is_reported_with_raw_bytes() -> None:
    (ev,) = events(b"$OK#00")
    assert ev == BadPacket(b"$OK#00", "checksum mismatch: frame says 00, data sums to 9a")


def test_non_hex_checksum() -> None:
    (ev,) = events(b"$OK#zz")
    assert isinstance(ev, BadPacket) and "not two hex digits" in ev.why


def test_dollar_inside_a_frame_restarts() -> None:
    evs = events(b"$garb$OK#9a")
    assert evs == [BadPacket(b"$garb", "new packet started before '#'"), Packet(b"OK", b"$OK#9a")]


def test_overlong_packet_is_reported_once_then_skipped() -> None:
    dec = Decoder(max_packet=8)
    evs = dec.feed(b"$0123456789")
    assert len(evs) == 1 and isinstance(evs[0], BadPacket) and "longer than 8" in evs[0].why
    assert dec.feed(b"abcdef#00") == []          # still discarding up to the checksum
    assert dec.feed(b"+$OK#9a") == [ACK, Packet(b"OK", b"$OK#9a")]


def test_overlong_then_restart_resynchronises() -> None:
    dec = Decoder(max_packet=4)
    evs = dec.feed(b"$0123456$OK#9a")
    assert [type(e) for e in evs] == [BadPacket, Packet]


def test_partial_frame_is_visible() -> None:
    dec = Decoder()
    assert dec.partial == b""
    dec.feed(b"no")
    assert dec.partial == b""                    # junk is flushed at the end of a feed
    dec.feed(b"$OK")
    assert dec.partial == b"$OK"
    dec.feed(b"#9")
    assert dec.partial == b"$OK#9"
    assert dec.feed(b"a") == [Packet(b"OK", b"$OK#9a")]
    assert dec.partial == b""


def test_binary_payload_roundtrip() -> None:
    data = bytes(range(256)) * 2
    frame = encode_packet(b"X1000,200:" + data)
    (ev,) = events(frame)
    assert ev.payload == b"X1000,200:" + data


STREAM = (b"+" + encode_packet(b"T05thread:p01.02;swbreak:;") + b"-\x03"
          + b"$OK#00" + encode_packet(b"a#b$c}d*e") + b"$0* #" + b"%02x" % checksum(b"0* ")
          + b"%Stop:T05#" + b"%02x" % checksum(b"Stop:T05") + b"+")


def test_split_feeds_at_every_boundary() -> None:
    whole = events(STREAM)
    assert len(whole) == 9
    for cut in range(len(STREAM) + 1):
        dec = Decoder()
        assert dec.feed(STREAM[:cut]) + dec.feed(STREAM[cut:]) == whole, cut


def test_byte_by_byte_feed() -> None:
    dec = Decoder()
    got = []
    for b in STREAM:
        got += dec.feed(bytes((b,)))
    assert got == events(STREAM)


# -- properties ----------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_encode_decode_roundtrip(payload: bytes) -> None:
    frame = encode_packet(payload)
    assert events(frame) == [Packet(payload, frame)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=6), st.data())
def test_roundtrip_with_arbitrary_chunking(payloads: list, data: st.DataObject) -> None:
    stream = b"".join(encode_packet(p) + b"+" for p in payloads)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=5)))
    dec = Decoder()
    got = []
    prev = 0
    for cut in cuts + [len(stream)]:
        got += dec.feed(stream[prev:cut])
        prev = cut
    assert [e.payload for e in got if isinstance(e, Packet)] == payloads


@settings(max_examples=500, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=30),
                          st.sampled_from([b"$", b"#", b"}", b"*", b"+", b"-", b"%", b"\x03",
                                           b"#00", b"$OK#9a"])), max_size=20))
def test_decoder_never_raises(chunks: list) -> None:
    dec = Decoder(max_packet=64)
    for chunk in chunks:
        for ev in dec.feed(chunk):
            assert isinstance(ev, (Packet, BadPacket, Junk)) or ev in (ACK, NAK, INTERRUPT)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=60))
def test_expand_raises_only_our_error(body: bytes) -> None:
    try:
        expand(body)
    except RspProtocolError as exc:
        assert isinstance(exc, RspError) and isinstance(exc, KairosError)
        assert exc.raw == body
