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
                                  msgspec.msgpack.encode({"type": "response", "instruction_id": 1, "status": "great"})])
def test_malformed_messages_raise_protocol_error(data):
    with pytest.raises(p.ProtocolError, match="malformed"):
        p.decode_from_agent(data)


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
