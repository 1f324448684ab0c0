"""The agent journal: the decisions (AgentSession) over the append-only file log (FileStore)."""

import time

from quanta import protocol as p
from quanta.agent.journal import KEEP_AFTER_EXPIRY, FileStore, MemoryStore
from quanta.pki import Pki, Signer, Verifier
from quanta.protocol.agent_session import AgentSession, Backoff, Judged, Run, Send

HELLO = p.Hello(device_id="d", fqdn="d", os="x", agent_version="x")


def _signed(pki: Pki, iid: int, ttl: float = 60) -> p.SignedInstruction:
    body = p.encode_body(p.InstructionBody(id=iid, name="q", kind="question", payload="SELECT 1;", parameters={},
                                           issued_at=time.time(), expires_at=time.time() + ttl))
    return p.SignedInstruction(body=body, signature=Signer.from_file(pki.signing_key).sign(body))


def _ready(store, verifier) -> AgentSession:  # type: ignore[no-untyped-def]
    s = AgentSession(store, verifier, Backoff(1, 60))
    s.connected(HELLO, time.time())
    s.handle(p.Welcome(switch="sw", heartbeat_seconds=60), time.time())
    return s


def _action(effects: list) -> str:  # type: ignore[type-arg]
    (j,) = [e for e in effects if isinstance(e, Judged)]
    return j.action


def _pki(tmp_path) -> tuple[Pki, Verifier]:  # type: ignore[no-untyped-def]
    pki = Pki(tmp_path / "pki")
    pki.create("localhost")
    return pki, Verifier.from_file(pki.signing_pub)


def test_run_once_then_resend(tmp_path):
    pki, v = _pki(tmp_path)
    s = _ready(FileStore(tmp_path / "j"), v)
    d = _signed(pki, 7)
    first = s.deliver(d, time.time())
    assert _action(first) == "run" and [e.body.id for e in first if isinstance(e, Run)] == [7]
    assert s.deliver(d, time.time()) == [Judged("ignore", 7, "already running")]  # not run twice
    resp = p.Response(instruction_id=7, status="success", columns=["A"], rows=[[1]])
    assert s.completed(resp, time.time()) == [Send(resp)]
    again = s.deliver(d, time.time())
    assert _action(again) == "resend" and Send(resp, True) in again
    # the journal survives a restart of the agent: the new session resends on its welcome, runs nothing
    s.store.close()
    s2 = AgentSession(FileStore(tmp_path / "j"), v, Backoff(1, 60))
    s2.connected(HELLO, time.time())
    assert s2.handle(p.Welcome(switch="sw", heartbeat_seconds=60), time.time()) == [Send(resp, True)]
    assert _action(s2.deliver(d, time.time())) == "resend"
    s2.ack([7])
    assert s2.tick(time.time() + 3600) == []  # acked: never resent


def test_tampered_and_foreign_signatures_are_refused(tmp_path):
    pki, v = _pki(tmp_path)
    other = Pki(tmp_path / "other")
    other.create("localhost")
    store = MemoryStore()
    s = _ready(store, v)
    d = _signed(pki, 8)
    tampered = p.SignedInstruction(body=d.body.replace(b"SELECT 1;", b"SELECT 2;"), signature=d.signature)
    out = s.deliver(tampered, time.time())
    assert _action(out) == "refuse" and not any(isinstance(e, Run) for e in out)
    (sent,) = [e.message for e in out if isinstance(e, Send)]
    assert sent.status == "error" and "signature" in (sent.error or "") and sent.instruction_id == 8
    assert _action(s.deliver(_signed(other, 9), time.time())) == "refuse"
    assert _action(s.deliver(p.SignedInstruction(body=d.body, signature=b""), time.time())) == "refuse"
    assert _action(s.deliver(p.SignedInstruction(body=b"\xc1junk", signature=b""), time.time())) == "refuse"
    assert not any(isinstance(e, Run) for e in s.deliver(tampered, time.time()))


def test_expired_instruction_is_not_run(tmp_path):
    pki, v = _pki(tmp_path)
    assert _ready(MemoryStore(), v).deliver(_signed(pki, 1, ttl=-1), time.time()) == [
        Judged("ignore", 1, "gather window already closed")]


def test_corrupt_journal_is_discarded(tmp_path):
    (tmp_path / "j").write_bytes(b"\x00garbage")
    assert FileStore(tmp_path / "j").entries == {}


def test_log_appends_one_record_per_change_and_survives_a_torn_tail(tmp_path):
    pki, v = _pki(tmp_path)
    path = tmp_path / "j"
    s = _ready(FileStore(path), v)
    d = _signed(pki, 3)
    assert _action(s.deliver(d, time.time())) == "run"
    size = path.stat().st_size
    ino = path.stat().st_ino
    resp = p.Response(instruction_id=3, status="success", columns=["A"], rows=[[1]])
    s.completed(resp, time.time())
    assert path.stat().st_size > size and path.stat().st_ino == ino  # appended in place, no rewrite
    s.ack([3])
    s.store.close()
    # a crash in the middle of a further record: that record is lost, nothing before it
    with open(path, "ab") as f:
        f.write(b"\x00\x00\x01\x00\x12\x34")
    j2 = FileStore(path)
    assert j2.entries[3].response == resp and j2.entries[3].acked
    # acknowledged: delivered again, it is neither run nor sent again
    assert _ready(j2, v).deliver(d, time.time()) == [Judged("ignore", 3, "already answered")]
    # reopening compacted the log to one record per entry (the torn tail is gone)
    j3 = FileStore(path)
    assert j3.entries.keys() == {3} and j3._records == 1


def test_log_is_compacted_when_superseded_records_pile_up(tmp_path):
    from quanta.agent import journal

    s = _ready(FileStore(tmp_path / "j"), None)
    s.cancel([1, 2], time.time())
    for n in range(journal.COMPACT_SLACK + 10):  # every record supersedes the one before
        s.completed(p.Response(instruction_id=1, status="success", columns=["N"], rows=[[n]]), time.time())
    assert s.store._records <= 2 * 2 + journal.COMPACT_SLACK
    assert (tmp_path / "j").stat().st_size < 100 * (2 * 2 + journal.COMPACT_SLACK)
    again = FileStore(tmp_path / "j")
    assert again.entries.keys() == {1, 2} and again.entries[1].response.rows == [[journal.COMPACT_SLACK + 9]]


def test_pruning_forgets_old_entries_and_compacts(tmp_path):
    pki, v = _pki(tmp_path)
    s = _ready(FileStore(tmp_path / "j"), v)
    s.deliver(_signed(pki, 4, ttl=10), time.time())
    s.tick(time.time() + 10 + KEEP_AFTER_EXPIRY + 1)
    assert s.store.entries == {} and FileStore(tmp_path / "j").entries == {}


def test_former_snapshot_format_is_read_and_rewritten(tmp_path):
    import msgspec

    from quanta.agent.journal import Entry

    resp = p.Response(instruction_id=5, status="success", columns=["A"], rows=[[1]])
    (tmp_path / "j").write_bytes(msgspec.msgpack.encode({5: Entry(5, time.time() + 60, response=resp)}))
    s = AgentSession(FileStore(tmp_path / "j"), None, Backoff(1, 60))  # type: ignore[arg-type]
    s.connected(HELLO, time.time())
    assert s.handle(p.Welcome(switch="sw", heartbeat_seconds=60), time.time()) == [Send(resp, True)]
    assert FileStore(tmp_path / "j").entries[5].response == resp
