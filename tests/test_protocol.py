import msgspec
import pytest

from quanta import protocol as p


def test_round_trip_agent_messages():
    hello = p.Hello(device_id="d1", fqdn="d1.example", os="Linux", agent_version="1", tags={"a": "b"})
    assert p.decode_from_agent(p.encode(hello)) == hello
    resp = p.Response(instruction_id=3, status="success", columns=["A"], rows=[[1], [None]])
    assert p.decode_from_agent(p.encode(resp)) == resp


@pytest.mark.parametrize("data", [b"", b"\xc1", b"garbage", msgspec.msgpack.encode({"type": "nope"}),
                                  msgspec.msgpack.encode({"type": "hello", "device_id": 5}),
                                  msgspec.msgpack.encode({"type": "response", "instruction_id": "x", "status": "success"}),
                                  msgspec.msgpack.encode({"type": "response", "instruction_id": 2**64 - 1,
                                                          "status": "success"}),
                                  msgspec.msgpack.encode({"type": "response", "instruction_id": -1, "status": "success"}),
                                  msgspec.msgpack.encode({"type": "hello", "device_id": "d", "fqdn": "x" * 256,
                                                          "os": "", "agent_version": ""}),
                                  msgspec.msgpack.encode({"type": "hello", "device_id": "d\x00e", "fqdn": "",
                                                          "os": "", "agent_version": ""}),
                                  msgspec.msgpack.encode({"type": "hello", "device_id": "", "fqdn": "",
                                                          "os": "", "agent_version": ""}),
                                  msgspec.msgpack.encode({"type": "hello", "device_id": "d", "fqdn": "", "os": "",
                                                          "agent_version": "", "tags": {str(i): "" for i in range(65)}}),
                                  msgspec.msgpack.encode({"type": "hello", "device_id": "d", "fqdn": "", "os": "",
                                                          "agent_version": "", "tags": {"k": "v\nX-Injected: 1"}})])
def test_malformed_messages_raise_protocol_error(data):
    with pytest.raises(p.ProtocolError, match="malformed"):
        p.decode_from_agent(data)


_ext = msgspec.msgpack.Ext(1, b"x")


@pytest.mark.parametrize("fields,where", [
    ({"status": "great"}, "$.status"),
    ({"rows": [[_ext]]}, "$.rows[0][0]"),                       # an extension value
    ({"rows": [[{None: 1}]]}, "$.rows[0][0]"),                  # a map with a nil key
    ({"rows": [[{True: 1}]]}, "$.rows[0][0]"),                  # ... a bool key
    ({"rows": [[{"k": 1}]]}, "$.rows[0][0]"),                   # any map: a cell is a scalar
    ({"rows": [[[1, 2]]]}, "$.rows[0][0]"),                     # a nested array
    ({"rows": [[2**63]]}, "$.rows[0][0]"),                      # past int64
    ({"rows": [[b"\x00\x01"]]}, "$.rows[0][0]"),                # binary: blobs travel as hex text
    ({"rows": [[1]] * (p.MAX_ROWS + 1)}, "$.rows"),
    ({"columns": ["a\x00b"]}, "$.columns[0]"),
    ({"error": "bad\x00text", "status": "error"}, "$.error"),  # PostgreSQL text refuses NUL
    ({"error": "x" * 9000, "status": "error"}, "$.error"),
    ({"error_line": 2**40}, "$.error_line"),
    ({"elapsed_ms": float("nan")}, "$.elapsed_ms"),
])
def test_out_of_bounds_answer_is_refused_as_one_message(fields, where):
    """A response with a valid instruction id but content out of bounds is refused as a message
    (ResponseRefused carries the error to record in its place), not as a connection."""
    data = msgspec.msgpack.encode({"type": "response", "instruction_id": 41, "status": "success", **fields})
    with pytest.raises(p.ResponseRefused) as info:
        p.decode_from_agent(data)
    assert where in info.value.reason
    substitute = info.value.response
    assert substitute.instruction_id == 41 and substitute.status == "error"
    assert substitute.error.startswith("response refused by the switch: ") and where in substitute.error
    # the substitute itself is inside the bounds: it round-trips through the same decoder
    assert p.decode_from_agent(p.encode(substitute)) == substitute


def test_cells_keep_every_scalar_and_any_unicode():
    resp = p.Response(instruction_id=p.MAX_ID, status="success", columns=["A", "B", "C", "D", "E"],
                      rows=[[None, True, -(2**63), 1.5, "nul \x00 and \u2603 inside a cell"]])
    assert p.decode_from_agent(p.encode(resp)) == resp


def test_core_side_decoder_bounds_what_the_switch_relays():
    bad = msgspec.msgpack.encode({"type": "online", "devices": [{"device_id": "d", "fqdn": "x" * 300, "os": "",
                                                                 "agent_version": ""}]})
    with pytest.raises(p.ProtocolError, match=r"\$\.devices\[0\]\.fqdn"):
        p.decode_from_switch(bad)
    ack = p.OnlineAck(seq=3, answered={"d1": [7]}, refused=["ghost"])
    assert p.decode_from_core(p.encode(ack)) == ack


def test_switch_cannot_send_agent_only_messages_to_core():
    with pytest.raises(p.ProtocolError):
        p.decode_from_switch(p.encode(p.Hello(device_id="d", fqdn="", os="", agent_version="")))


def test_poke_authentication():
    secret = b"s" * 32
    poke = p.make_poke(secret, now=1000.0)
    assert len(poke) == p.POKE_SIZE
    assert p.check_poke(secret, poke, now=1000.0)
    assert not p.check_poke(b"x" * 32, poke, now=1000.0), "wrong secret"
    assert not p.check_poke(secret, poke, now=1000.0 + 3600), "stale"
    assert not p.check_poke(secret, poke[:-1] + bytes([poke[-1] ^ 1]), now=1000.0), "tampered"
    assert not p.check_poke(secret, b"POKE", now=1000.0), "short"


def test_a_close_reason_is_cut_to_120_bytes_of_valid_utf8() -> None:
    assert p.close_reason("short") == b"short"
    cut = p.close_reason("é" * 100)  # 200 bytes: cut at 120, a whole number of characters
    assert len(cut) == 120 and cut.decode("utf-8") == "é" * 60
    odd = p.close_reason("x" + "é" * 100)  # byte 120 falls inside a character: it is dropped
    assert len(odd) == 119 and odd.decode("utf-8") == "x" + "é" * 59
