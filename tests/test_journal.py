import time

from quanta import protocol as p
from quanta.agent.journal import Journal
from quanta.pki import Pki, Signer, Verifier


def _signed(pki: Pki, iid: int, ttl: float = 60) -> p.SignedInstruction:
    body = p.encode_body(p.InstructionBody(id=iid, name="q", kind="question", payload="SELECT 1;", parameters={},
                                           issued_at=time.time(), expires_at=time.time() + ttl))
    return p.SignedInstruction(body=body, signature=Signer.from_file(pki.signing_key).sign(body))


def test_run_once_then_resend(tmp_path):
    pki = Pki(tmp_path / "pki")
    pki.create("localhost")
    v = Verifier.from_file(pki.signing_pub)
    j = Journal(tmp_path / "j")
    s = _signed(pki, 7)
    assert j.judge(s, v).action == "run"
    assert j.judge(s, v).action == "ignore"  # still running: not run twice
    resp = p.Response(instruction_id=7, status="success", columns=["A"], rows=[[1]])
    j.record(resp)
    again = j.judge(s, v)
    assert again.action == "resend" and again.response == resp
    # the journal survives a restart of the agent
    j2 = Journal(tmp_path / "j")
    assert j2.judge(s, v).action == "resend"
    assert j2.due(all_unacked=True) == [resp]
    j2.ack([7])
    assert j2.due(all_unacked=True) == []


def test_tampered_and_foreign_signatures_are_refused(tmp_path):
    pki = Pki(tmp_path / "pki")
    pki.create("localhost")
    other = Pki(tmp_path / "other")
    other.create("localhost")
    v = Verifier.from_file(pki.signing_pub)
    j = Journal(None)
    s = _signed(pki, 8)
    tampered = p.SignedInstruction(body=s.body.replace(b"SELECT 1;", b"SELECT 2;"), signature=s.signature)
    verdict = j.judge(tampered, v)
    assert verdict.action == "refuse" and verdict.response.status == "error"
    assert "signature" in verdict.response.error
    assert j.judge(_signed(other, 9), v).action == "refuse"
    assert j.judge(p.SignedInstruction(body=s.body, signature=b""), v).action == "refuse"
    assert 8 not in j.entries and 9 not in j.entries


def test_expired_instruction_is_not_run(tmp_path):
    pki = Pki(tmp_path / "pki")
    pki.create("localhost")
    assert Journal(None).judge(_signed(pki, 1, ttl=-1), Verifier.from_file(pki.signing_pub)).action == "ignore"


def test_corrupt_journal_is_discarded(tmp_path):
    (tmp_path / "j").write_bytes(b"\x00garbage")
    assert Journal(tmp_path / "j").entries == {}


def test_log_appends_one_record_per_change_and_survives_a_torn_tail(tmp_path):
    pki = Pki(tmp_path / "pki")
    pki.create("localhost")
    v = Verifier.from_file(pki.signing_pub)
    path = tmp_path / "j"
    j = Journal(path)
    s = _signed(pki, 3)
    assert j.judge(s, v).action == "run"
    size = path.stat().st_size
    ino = path.stat().st_ino
    resp = p.Response(instruction_id=3, status="success", columns=["A"], rows=[[1]])
    j.record(resp)
    assert path.stat().st_size > size and path.stat().st_ino == ino  # appended in place, no rewrite
    j.ack([3])
    j.close()
    # a crash in the middle of a further record: that record is lost, nothing before it
    with open(path, "ab") as f:
        f.write(b"\x00\x00\x01\x00\x12\x34")
    j2 = Journal(path)
    assert j2.entries[3].response == resp and j2.entries[3].acked
    assert j2.judge(s, v).action == "resend"
    # reopening compacted the log to one record per entry (the torn tail is gone)
    j3 = Journal(path)
    assert j3.entries.keys() == {3} and j3._records == 1


def test_log_is_compacted_when_superseded_records_pile_up(tmp_path):
    from quanta.agent import journal

    j = Journal(tmp_path / "j")
    j.cancel([1, 2])
    for n in range(journal.COMPACT_SLACK + 10):  # every record supersedes the one before
        j.record(p.Response(instruction_id=1, status="success", columns=["N"], rows=[[n]]))
    assert j._records <= 2 * 2 + journal.COMPACT_SLACK
    assert (tmp_path / "j").stat().st_size < 100 * (2 * 2 + journal.COMPACT_SLACK)
    again = Journal(tmp_path / "j")
    assert again.entries.keys() == {1, 2} and again.entries[1].response.rows == [[journal.COMPACT_SLACK + 9]]


def test_former_snapshot_format_is_read_and_rewritten(tmp_path):
    import msgspec

    from quanta.agent.journal import Entry

    resp = p.Response(instruction_id=5, status="success", columns=["A"], rows=[[1]])
    (tmp_path / "j").write_bytes(msgspec.msgpack.encode({5: Entry(5, time.time() + 60, response=resp)}))
    j = Journal(tmp_path / "j")
    assert j.entries[5].response == resp and j.due(all_unacked=True) == [resp]
    assert Journal(tmp_path / "j").entries[5].response == resp
