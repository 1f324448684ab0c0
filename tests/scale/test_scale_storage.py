"""Storage.*: persistent tables per instruction owner, with caps, writes as actions, no raw SQL access."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from quanta.scale import AgentContext, RunResult, ScaleError, compile_scale, run_program
from quanta.scale.methods import storage


def ctx_for(tmp_path: Path, name: str | None) -> AgentContext:
    return AgentContext(data_dir=tmp_path / "state", instruction_name=name)


def run(ctx: AgentContext, text: str, actions: bool = True, params: dict | None = None) -> RunResult:
    return run_program(compile_scale(text, params), context=ctx, allow_actions=actions)


def rows(r: RunResult) -> list[list]:
    assert r.status in ("success", "nocontent"), r.error
    return r.rows


def test_write_read_drop_and_file_mode(tmp_path) -> None:
    a = ctx_for(tmp_path, "Quanta-Inventory-Remember")
    assert rows(run(a, 'Storage.Create(Name: "Seen");')) == [["Seen", True]]
    assert rows(run(a, 'Storage.Create(Name: "Seen");')) == [["Seen", False]]
    run(a, '@p = SELECT "a" AS K, "1" AS V UNION ALL SELECT "b", "2"; Storage.Set(Name: "Seen", Key: @p.K, Value: @p.V);')
    run(a, 'Storage.Set(Name: "Seen", Key: "a", Value: "one");')
    # another instruction of the same pack reads it; a question may read
    b = ctx_for(tmp_path, "Quanta-Inventory-Recall")
    got = rows(run(b, 'Storage.Get(Name: "Seen");', actions=False))
    assert [r[:2] for r in got] == [["a", "one"], ["b", "2"]]
    assert [r[:2] for r in rows(run(b, 'Storage.Get(Name: "Seen", Key: "b");', actions=False))] == [["b", "2"]]
    assert rows(run(b, "Storage.List();", actions=False))[0][:2] == ["Seen", 2]
    # another owner sees nothing of it
    other = ctx_for(tmp_path, "Acme-Tool-Peek")
    assert run(other, 'Storage.Get(Name: "Seen");', actions=False).rows == []
    assert run(other, "Storage.List();", actions=False).rows == []
    assert rows(run(other, 'Storage.Drop(Name: "Seen");')) == [["Seen", False]]
    assert rows(run(a, 'Storage.Delete(Name: "Seen", Key: "a");')) == [["Seen", "a", True]]
    assert rows(run(a, 'Storage.Drop(Name: "Seen");')) == [["Seen", True]]
    assert run(b, 'Storage.Get(Name: "Seen");', actions=False).rows == []
    mode = stat.S_IMODE(os.stat(tmp_path / "state" / "storage.db").st_mode)
    assert mode == 0o600


def test_a_read_creates_nothing(tmp_path) -> None:
    a = ctx_for(tmp_path, "Quanta-Inventory-X")
    assert run(a, 'Storage.Get(Name: "T");', actions=False).rows == []
    assert run(a, "Storage.List();", actions=False).rows == []
    assert not (tmp_path / "state" / "storage.db").exists()


def test_writes_are_actions_reads_are_questions(tmp_path) -> None:
    for call in ('Storage.Create(Name: "T");', 'Storage.Set(Name: "T", Key: "k", Value: "v");',
                 'Storage.Delete(Name: "T", Key: "k");', 'Storage.Drop(Name: "T");'):
        assert compile_scale(call).is_action, call
        r = run(ctx_for(tmp_path, "X-Y"), call, actions=False)
        assert r.status == "error" and "not allowed" in str(r.error)
    assert not compile_scale('Storage.Get(Name: "T");').is_action
    assert not compile_scale("Storage.List();").is_action


def test_hostile_names(tmp_path) -> None:
    a = ctx_for(tmp_path, "Quanta-Inventory-X")
    for bad in ('T; DROP TABLE storage_rows', "storage_rows--", "1abc", "", "a" * 65, "t'", 'x" OR 1=1 --', "é"):
        r = run(a, "Storage.Set(Name: %n%, Key: \"k\", Value: \"v\");", params={"n": bad})
        assert r.status == "error" and "Name must be" in str(r.error), bad
    # keys and values are data, whatever they hold
    evil = "'); DROP TABLE storage_rows; --"
    rows(run(a, "Storage.Set(Name: \"T\", Key: %k%, Value: %k%);", params={"k": evil}))
    assert rows(run(a, "Storage.Get(Name: \"T\");"))[0][:2] == [evil, evil]
    r = run(a, 'Storage.Set(Name: "T", Key: "", Value: "v");')
    assert r.status == "error" and "Key must be" in str(r.error)
    r = run(a, f'Storage.Set(Name: "T", Key: "{"k" * 300}", Value: "v");')
    assert r.status == "error"
    with pytest.raises(ScaleError, match="expects string"):
        compile_scale('Storage.Set(Name: 5, Key: "k", Value: "v");')
    # an instruction name that is no owner
    r = run(ctx_for(tmp_path, "../../etc"), 'Storage.Create(Name: "T");')
    assert r.status == "error" and "cannot own" in str(r.error)


def test_select_cannot_read_the_storage_tables(tmp_path) -> None:
    a = ctx_for(tmp_path, "Quanta-Inventory-X")
    run(a, 'Storage.Set(Name: "T", Key: "k", Value: "secret");')
    for sql in ("SELECT * FROM storage_rows;", "SELECT * FROM $storage_rows;",
                f"ATTACH DATABASE '{tmp_path}/state/storage.db' AS s;"):
        try:
            r = run(a, sql, actions=False)
        except ScaleError:
            continue
        assert r.status == "error", sql
        assert "secret" not in str(r.rows)


def test_caps(tmp_path, monkeypatch) -> None:
    a = ctx_for(tmp_path, "Quanta-Inventory-X")
    monkeypatch.setattr(storage, "MAX_ROWS_PER_TABLE", 3)
    for k in "abc":
        rows(run(a, f'Storage.Set(Name: "T", Key: "{k}", Value: "v");'))
    r = run(a, 'Storage.Set(Name: "T", Key: "d", Value: "v");')
    assert r.status == "error" and "full" in str(r.error)
    rows(run(a, 'Storage.Set(Name: "T", Key: "a", Value: "replaced");'))  # replacing stays within the cap
    monkeypatch.setattr(storage, "MAX_BYTES_PER_TABLE", 100)
    r = run(a, f'Storage.Set(Name: "U", Key: "k", Value: "{"x" * 200}");')
    assert r.status == "error" and "full" in str(r.error)
    assert run(a, 'Storage.Get(Name: "U");', actions=False).rows == []  # nothing stored past the cap
    monkeypatch.setattr(storage, "MAX_BYTES_PER_TABLE", 10_000)
    monkeypatch.setattr(storage, "MAX_TOTAL_BYTES", 500)
    run(ctx_for(tmp_path, "Other-Pack-Y"), f'Storage.Set(Name: "Big", Key: "k", Value: "{"x" * 400}");')
    r = run(a, f'Storage.Set(Name: "V", Key: "k", Value: "{"x" * 200}");')
    assert r.status == "error" and "Storage is full" in str(r.error)
    monkeypatch.setattr(storage, "MAX_TABLES_PER_OWNER", 4)
    errors = [run(a, f'Storage.Create(Name: "Z{i}");').error for i in range(5)]
    assert "at most 4 tables" in str(errors[-1])
    assert len(run(a, "Storage.List();", actions=False).rows) == 4  # a failed Set created no table either
    r = run(a, f'Storage.Set(Name: "T", Key: "k", Value: "{"x" * (70 * 1024)}");')
    assert r.status == "error" and "exceeds" in str(r.error)


def test_storage_file_swapped_for_a_fifo_or_link(tmp_path) -> None:
    d = tmp_path / "state"
    d.mkdir()
    os.mkfifo(d / "storage.db")
    r = run(ctx_for(tmp_path, "A-B"), 'Storage.Get(Name: "T");', actions=False)
    assert r.status == "error" and "Storage unavailable" in str(r.error)
    os.unlink(d / "storage.db")
    (d / "storage.db").symlink_to(tmp_path / "elsewhere.db")
    r = run(ctx_for(tmp_path, "A-B"), 'Storage.Get(Name: "T");', actions=False)
    assert r.status == "error" and not (tmp_path / "elsewhere.db").exists()


def test_the_agent_runs_storage_as_the_instructions_owner(tmp_path) -> None:
    """run_instruction hands the signed instruction name to the payload: its pack owns the table."""
    import time as _time

    from quanta.agent.config import AgentConfig, SwitchAddress
    from quanta.agent.runtime import run_instruction
    from quanta.protocol import messages as p

    root = tmp_path / "agent"
    (root / "state").mkdir(parents=True)
    cfg = AgentConfig(root=root, device_name="d1", switches=[SwitchAddress("127.0.0.1", 4000)], background_url="",
                      retry_min=1, retry_max=60, interaction_port=7766)

    def body(i: int, name: str, kind: str, payload: str) -> p.InstructionBody:
        now = _time.time()
        return p.InstructionBody(id=i, name=name, kind=kind, payload=payload, parameters={}, issued_at=now,
                                 expires_at=now + 30)

    r = run_instruction(body(1, "Acme-Tools-Remember", "action", 'Storage.Set(Name: "T", Key: "k", Value: "v1");'), cfg)
    assert r.status == "success", r.error
    r = run_instruction(body(2, "Acme-Tools-Recall", "question", 'Storage.Get(Name: "T");'), cfg)
    assert [row[:2] for row in r.rows] == [["k", "v1"]]
    r = run_instruction(body(3, "Other-Pack-Peek", "question", 'Storage.Get(Name: "T");'), cfg)
    assert r.rows == []
    r = run_instruction(body(4, "Acme-Tools-Sneak", "question", 'Storage.Drop(Name: "T");'), cfg)
    assert r.status == "error"  # an action in a question is refused before it runs


def test_a_full_table_in_one_payload_then_the_row_cap(tmp_path) -> None:
    a = ctx_for(tmp_path, "Quanta-Inventory-X")
    fill = ("@q = WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 10000) "
            "SELECT CAST(i AS TEXT) AS K FROM n; Storage.Set(Name: \"T\", Key: @q.K, Value: \"x\");")
    from quanta.scale import Limits
    r = run_program(compile_scale(fill), context=a, allow_actions=True, limits=Limits(timeout_seconds=30))
    assert r.status == "success" and len(r.rows) == storage.MAX_ROWS_PER_TABLE, r.error
    r = run(a, 'Storage.Set(Name: "T", Key: "one more", Value: "x");')
    assert r.status == "error" and "10,000 rows" in str(r.error)
    assert rows(run(a, "Storage.List();", actions=False))[0][:2] == ["T", 10_000]
    # the file removed between runs: reads are empty, a write starts afresh
    os.unlink(tmp_path / "state" / "storage.db")
    for side in ("-wal", "-shm"):
        if (tmp_path / "state" / f"storage.db{side}").exists():
            os.unlink(tmp_path / "state" / f"storage.db{side}")
    assert run(a, 'Storage.Get(Name: "T");', actions=False).rows == []
    assert rows(run(a, 'Storage.Set(Name: "T", Key: "k", Value: "v");')) == [["T", "k", True]]
    assert [r[:2] for r in rows(run(a, 'Storage.Get(Name: "T");', actions=False))] == [["k", "v"]]
