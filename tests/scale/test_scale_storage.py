"""Storage.*: the model's persistent storage tables, per instruction owner, capped, writes as actions,
and no way in from SELECT."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from quanta.scale import AgentContext, Limits, RunResult, ScaleError, compile_scale, run_program
from quanta.scale.methods import storage

ROWS3 = '@t = SELECT "a" AS K, 1 AS N UNION ALL SELECT "b", 2 UNION ALL SELECT "c", 3;'


QI = "pack:Quanta-Inventory@" + "1" * 32  # owners as the server signs them (quanta.instructions.storage_owner)
ACME = "pack:Acme-Tool@" + "2" * 32


def ctx_for(tmp_path: Path, owner: str | None) -> AgentContext:
    return AgentContext(data_dir=tmp_path / "state", storage_owner=owner)


def run(ctx: AgentContext, text: str, actions: bool = True, params: dict | None = None, **kw) -> RunResult:
    return run_program(compile_scale(text, params), context=ctx, allow_actions=actions, **kw)


def ok(r: RunResult) -> RunResult:
    assert r.status in ("success", "nocontent"), r.error
    return r


def test_set_get_check_delete_as_the_model_documents(tmp_path) -> None:
    a = ctx_for(tmp_path, QI)
    assert ok(run(a, ROWS3 + 'Storage.Set(Name: "Seen.Oct2026", Value: @t);')).rows == [["Seen.Oct2026"]]
    # another instruction of the same owner (pack) reads it, case-insensitively; a question may read
    b = ctx_for(tmp_path, QI)
    r = ok(run(b, 'Storage.Get(Name: "seen.oct2026");', actions=False))
    assert r.columns == ["K", "N"] and r.rows == [["a", 1], ["b", 2], ["c", 3]]
    r = ok(run(b, '@f = Storage.Check(Name: "SEEN.OCT2026"); IF (@f) @g = Storage.Get(Name: "Seen.Oct2026"); '
                  'SELECT SUM(N) AS Total FROM @g; ENDIF;', actions=False))
    assert r.rows == [[6]]
    assert run(b, 'Storage.Check(Name: "Other");', actions=False).rows == []
    assert run(b, 'Storage.Get(Name: "Other");', actions=False).rows == []
    assert ok(run(b, "Storage.List();", actions=False)).rows[0][:2] == ["Seen.Oct2026", 3]
    # another owner sees nothing of it and cannot delete it
    other = ctx_for(tmp_path, ACME)
    assert run(other, 'Storage.Get(Name: "Seen.Oct2026");', actions=False).rows == []
    assert ok(run(other, 'Storage.Delete(Name: "Seen.Oct2026");')).rows == [["Seen.Oct2026", False]]
    # replacing, then deleting
    ok(run(a, '@t = SELECT "z" AS Other; Storage.Set(Name: "Seen.Oct2026", Value: @t);'))
    assert run(b, 'Storage.Get(Name: "Seen.Oct2026");', actions=False).rows == [["z"]]
    assert ok(run(a, 'Storage.Delete(Name: "seen.oct2026");')).rows == [["seen.oct2026", True]]
    assert run(b, 'Storage.Check(Name: "Seen.Oct2026");', actions=False).rows == []
    assert stat.S_IMODE(os.stat(tmp_path / "state" / "storage.db").st_mode) == 0o600


def test_append_keeps_the_newest_max_row_count_rows(tmp_path) -> None:
    a = ctx_for(tmp_path, "A-B-C")
    for i in range(1, 6):
        ok(run(a, f'@t = SELECT {i} AS N; Storage.Set(Name: "Log", Value: @t, Append: true, MaxRowCount: 3);'))
    assert run(a, 'Storage.Get(Name: "Log");', actions=False).rows == [[3], [4], [5]]
    # appended columns the table lacks are added; missing cells are NULL
    ok(run(a, '@t = SELECT 6 AS N, "x" AS Extra; Storage.Set(Name: "Log", Value: @t, Append: true);'))
    r = run(a, 'Storage.Get(Name: "Log");', actions=False)
    assert r.columns == ["N", "Extra"] and r.rows[-2:] == [[5, None], [6, "x"]]
    r = run(a, '@t = SELECT 1 AS N; Storage.Set(Name: "Log", Value: @t, MaxRowCount: 3);')
    assert r.status == "error" and "only with Append" in str(r.error)
    r = run(a, '@t = SELECT 1 AS N; Storage.Set(Name: "Log", Value: @t, Append: true, MaxRowCount: 0);')
    assert r.status == "error" and "MaxRowCount" in str(r.error)


def test_writes_are_actions_reads_are_questions(tmp_path) -> None:
    for call in (ROWS3 + 'Storage.Set(Name: "T", Value: @t);', 'Storage.Delete(Name: "T");'):
        assert compile_scale(call).is_action, call
        r = run(ctx_for(tmp_path, "X-Y"), call, actions=False)
        assert r.status == "error" and "not allowed" in str(r.error)
    for call in ('Storage.Get(Name: "T");', 'Storage.Check(Name: "T");', "Storage.List();"):
        assert not compile_scale(call).is_action, call


def test_a_read_creates_nothing(tmp_path) -> None:
    a = ctx_for(tmp_path, "Quanta-Inventory-X")
    assert run(a, 'Storage.Get(Name: "T");', actions=False).rows == []
    assert run(a, "Storage.List();", actions=False).rows == []
    assert not (tmp_path / "state" / "storage.db").exists()


def test_table_parameters_are_checked_by_the_compiler() -> None:
    with pytest.raises(ScaleError, match="expects a table"):
        compile_scale('Storage.Set(Name: "T", Value: "rows");')
    with pytest.raises(ScaleError, match="expects a table"):
        compile_scale('@t = SELECT 1 AS A; Storage.Set(Name: "T", Value: @t.A);')
    with pytest.raises(ScaleError, match="not a whole table"):
        compile_scale('@t = SELECT 1 AS A; Storage.Get(Name: @t);')
    with pytest.raises(ScaleError, match="Unknown variable @nope"):
        compile_scale('Storage.Set(Name: "T", Value: @nope);')
    with pytest.raises(ScaleError, match="not a whole table"):
        compile_scale('@t = SELECT "/etc" AS F; FileSystem.GetFile(FileName: @t);')


def test_hostile_names(tmp_path) -> None:
    a = ctx_for(tmp_path, "Quanta-Inventory-X")
    for bad in ('T; DROP TABLE storage_tables', "", "a" * 129, "t'", 'x" OR 1=1 --', "é", ".hidden",
                "../../etc/passwd", "a b"):
        r = run(a, ROWS3 + "Storage.Set(Name: %n%, Value: @t);", params={"n": bad})
        assert r.status == "error" and "Name must be" in str(r.error), bad
    # cell values are data, whatever they hold
    evil = "'); DROP TABLE storage_tables; --"
    ok(run(a, "@t = SELECT %k% AS V, x'00ff' AS B; Storage.Set(Name: \"T\", Value: @t);", params={"k": evil}))
    assert run(a, 'Storage.Get(Name: "T");', actions=False).rows == [[evil, "00ff"]]
    with pytest.raises(ScaleError, match="expects string"):
        compile_scale('@t = SELECT 1 AS A; Storage.Set(Name: 5, Value: @t);')
    r = run(ctx_for(tmp_path, "../../etc"), ROWS3 + 'Storage.Set(Name: "T", Value: @t);')
    assert r.status == "error" and "cannot own" in str(r.error)


def test_select_cannot_read_the_storage_file(tmp_path) -> None:
    a = ctx_for(tmp_path, "Quanta-Inventory-X")
    ok(run(a, '@t = SELECT "secret" AS S; Storage.Set(Name: "T", Value: @t);'))
    for sql in ("SELECT * FROM storage_tables;", "SELECT * FROM $storage_tables;", "SELECT * FROM $T;",
                f"ATTACH DATABASE '{tmp_path}/state/storage.db' AS s;"):
        try:
            r = run(a, sql, actions=False)
        except ScaleError:
            continue
        assert r.status == "error" and "secret" not in str(r.rows), sql


def test_caps(tmp_path, monkeypatch) -> None:
    a = ctx_for(tmp_path, "Quanta-Inventory-X")
    many = ("@t = WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000) "
            "SELECT i AS N, 'xxxxxxxxxx' AS V FROM n;")
    monkeypatch.setattr(storage, "MAX_ROWS_PER_TABLE", 1000)
    r = run(a, many + 'Storage.Set(Name: "T", Value: @t);')
    assert r.status == "error" and "1,000 rows" in str(r.error)
    ok(run(a, many + 'Storage.Set(Name: "T", Value: @t, Append: true, MaxRowCount: 1000);'))  # truncated, newest kept
    assert run(a, 'Storage.Get(Name: "T");', actions=False).rows[0] == [1001, "xxxxxxxxxx"]
    monkeypatch.setattr(storage, "MAX_BYTES_PER_TABLE", 1000)
    r = run(a, many + 'Storage.Set(Name: "U", Value: @t, Append: true, MaxRowCount: 500);')
    assert r.status == "error" and "MB" in str(r.error)
    assert run(a, 'Storage.Check(Name: "U");', actions=False).rows == []  # nothing stored past a cap
    monkeypatch.setattr(storage, "MAX_BYTES_PER_TABLE", 10_000_000)
    monkeypatch.setattr(storage, "MAX_TOTAL_BYTES", 40_000)
    r = run(ctx_for(tmp_path, "Other-Pack-Y"), many + 'Storage.Set(Name: "Big", Value: @t, Append: true, MaxRowCount: 1000);')
    assert r.status == "error" and "Storage is full" in str(r.error)
    monkeypatch.setattr(storage, "MAX_TOTAL_BYTES", 10_000_000)
    monkeypatch.setattr(storage, "MAX_TABLES_PER_OWNER", 3)
    errors = [run(a, f'@t = SELECT 1 AS A; Storage.Set(Name: "Z{i}", Value: @t);').error for i in range(4)]
    assert errors[:2] == [None, None] and "at most 3 tables" in str(errors[2])
    assert len(run(a, "Storage.List();", actions=False).rows) == 3


def test_a_large_table_round_trips_within_the_limits(tmp_path) -> None:
    a = ctx_for(tmp_path, "Quanta-Inventory-X")
    fill = ("@t = WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 50000) "
            "SELECT i AS N, 'row ' || i AS Text FROM n; Storage.Set(Name: \"Big\", Value: @t);")
    ok(run(a, fill, limits=Limits(timeout_seconds=30)))
    r = ok(run(a, '@g = Storage.Get(Name: "Big"); SELECT COUNT(*) AS C, MAX(N) AS M FROM @g;', actions=False))
    assert r.rows == [[50_000, 50_000]]
    # a reader's row limit holds for what Get returns
    r = run(a, 'Storage.Get(Name: "Big");', actions=False, limits=Limits(max_rows=100))
    assert r.status == "error" and "row limit" in str(r.error)


def test_storage_file_swapped_for_a_fifo_or_link(tmp_path) -> None:
    d = tmp_path / "state"
    d.mkdir()
    os.mkfifo(d / "storage.db")
    r = run(ctx_for(tmp_path, "A-B"), 'Storage.Get(Name: "T");', actions=False)
    assert r.status == "error" and "Storage unavailable" in str(r.error)
    os.unlink(d / "storage.db")
    (d / "storage.db").symlink_to(tmp_path / "elsewhere.db")
    r = run(ctx_for(tmp_path, "A-B"), '@t = SELECT 1 AS A; Storage.Set(Name: "T", Value: @t);')
    assert r.status == "error" and not (tmp_path / "elsewhere.db").exists()


def test_the_agent_runs_storage_as_the_signed_owner(tmp_path) -> None:
    """run_instruction hands the signed body's owner to the payload, never its name: a name like
    another pack's gets nothing; a body without an owner (an older server) is "adhoc"."""
    import time as _time

    from quanta.agent.config import AgentConfig, SwitchAddress
    from quanta.agent.runtime import run_instruction
    from quanta.protocol import messages as p

    root = tmp_path / "agent"
    (root / "state").mkdir(parents=True)
    cfg = AgentConfig(root=root, device_name="d1", switches=[SwitchAddress("127.0.0.1", 4000)], background_url="",
                      retry_min=1, retry_max=60, interaction_port=7766)

    def body(i: int, name: str, kind: str, payload: str, owner: str = "") -> p.InstructionBody:
        now = _time.time()
        return p.InstructionBody(id=i, name=name, kind=kind, payload=payload, parameters={}, issued_at=now,
                                 expires_at=now + 30, owner=owner)

    r = run_instruction(body(1, "Acme-Tool-Remember", "action", '@t = SELECT "v1" AS V; Storage.Set(Name: "T", Value: @t);',
                             ACME), cfg)
    assert r.status == "success", r.error
    r = run_instruction(body(2, "Acme-Tool-Recall", "question", 'Storage.Get(Name: "T");', ACME), cfg)
    assert r.rows == [["v1"]]
    r = run_instruction(body(3, "Acme-Tool-Peek", "question", 'Storage.Get(Name: "T");', "pack:Acme-Tool@" + "3" * 32), cfg)
    assert r.rows == []  # the same pack name from another publisher's key
    r = run_instruction(body(4, "Acme-Tool-Peek", "question", 'Storage.Get(Name: "T");'), cfg)
    assert r.rows == []  # no owner signed: adhoc, not the name's pack
    r = run_instruction(body(5, "Acme-Tool-Sneak", "question", 'Storage.Delete(Name: "T");', ACME), cfg)
    assert r.status == "error"  # an action in a question is refused before it runs
