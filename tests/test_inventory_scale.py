"""SCALE reads the Activity Record and can never change it: hostile statements reach SQLite
directly here (as a parser bug would let them), and each is refused while the store stays as it
was; through the language, the tables are known to ``quanta scale check`` and the reference."""

from __future__ import annotations

import hashlib
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from quanta.agent.inventory import Store, parse_settings
from quanta.scale import AgentContext, Limits, compile_scale, render_methods_markdown, run_program
from quanta.scale import ast as A
from quanta.scale.compiler import Program
from quanta.scale.evaluator import Evaluator
from quanta.scale.tables import SOURCES

T0 = 1_767_225_600


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("inv")
    s = Store(d / "inventory.db", parse_settings({"Module.Inventory.FlushIntervalSeconds": "0.05"}), lambda: T0)
    s.start()
    for i in range(10):
        s.put("Process_Live", {"TS": T0 + i, "ProcessId": 100 + i, "ExecutableName": "psexec" if i % 2 else "bash",
                               "CommandLine": f"cmd {i}", "UserName": "alice", "CaptureMethod": "netlink"})
    s.flush()
    s.maintain(now=T0 + 3 * 86400)
    s.stop()
    return d


def digest(d: Path) -> str:
    c = sqlite3.connect(f"file:{d / 'inventory.db'}?mode=ro", uri=True)
    try:
        dump = "\n".join(c.iterdump())
    finally:
        c.close()
    return hashlib.sha256(dump.encode()).hexdigest()


def run_sql(d: Path, *parts: A.SqlPart) -> tuple[str, str]:
    """Run raw SQL parts through the evaluator's SELECT path (authorizer, attach, limits)."""
    pos = A.Pos(1, 1)
    prog = Program(source="", script=A.Script([A.Select(list(parts), pos)]), is_action=False)  # type: ignore[call-arg]
    r = Evaluator(prog, AgentContext(data_dir=d), Limits(timeout_seconds=10), allow_actions=True).run()
    return r.status, str(r.error)


def B(name: str) -> A.SqlBuiltin:
    return A.SqlBuiltin(name, A.Pos(1, 1))


def C(text: str) -> A.SqlCode:
    return A.SqlCode(text)


HOSTILE = [
    (C("INSERT INTO "), B("Process_Live"), C(" (Ts) VALUES (1)")),
    (C("REPLACE INTO "), B("Process_Live"), C(" (Ts) VALUES (1)")),
    (C("UPDATE "), B("Process_Live"), C(" SET UserName = 'mallory'")),
    (C("DELETE FROM "), B("Process_Live")),
    (C("DROP TABLE "), B("Process_Live")),
    (C("DROP INDEX activity.Process_Live_Ts /* "), B("Process_Live"), C(" */")),
    (C("ALTER TABLE "), B("Process_Live"), C(" RENAME TO x")),
    (C("ALTER TABLE "), B("Process_Live"), C(" ADD COLUMN y")),
    (C("CREATE TABLE activity.x AS SELECT * FROM "), B("Process_Live")),
    (C("CREATE TEMP TRIGGER t AFTER INSERT ON "), B("Process_Live"), C(" BEGIN SELECT 1; END")),
    (C("CREATE VIEW v AS SELECT * FROM "), B("Process_Live")),
    (C("CREATE INDEX activity.i ON Process_Live(Ts) /* "), B("Process_Live"), C(" */")),
    (C("SELECT 1 FROM "), B("Process_Live"), C("; DELETE FROM activity.Process_Live")),
    (C("ATTACH DATABASE '/tmp/quanta-inventory-hostile.db' AS evil; SELECT * FROM "), B("Process_Live")),
    (C("SELECT * FROM "), B("Process_Live"), C("; ATTACH DATABASE ':memory:' AS evil")),
    (C("DETACH DATABASE activity /* "), B("Process_Live"), C(" */")),
    (C("PRAGMA activity.writable_schema = 1 /* "), B("Process_Live"), C(" */")),
    (C("PRAGMA activity.journal_mode = DELETE /* "), B("Process_Live"), C(" */")),
    (C("PRAGMA query_only = 0 /* "), B("Process_Live"), C(" */")),
    (C("VACUUM activity INTO '/tmp/quanta-inventory-hostile.db' /* "), B("Process_Live"), C(" */")),
    (C("VACUUM /* "), B("Process_Live"), C(" */")),
    (C("REINDEX activity.Process_Live /* "), B("Process_Live"), C(" */")),
    (C("ANALYZE activity /* "), B("Process_Live"), C(" */")),
    (C("BEGIN /* "), B("Process_Live"), C(" */")),
    (C("SAVEPOINT s /* "), B("Process_Live"), C(" */")),
    (C("WITH x AS (SELECT 1) DELETE FROM "), B("Process_Live")),
    (C("SELECT load_extension('/tmp/evil.so') FROM "), B("Process_Live")),
    (C("SELECT * FROM activity._Meta, "), B("Process_Live")),
    (C("SELECT * FROM activity.sqlite_master, "), B("Process_Live")),
    (C("SELECT * FROM activity.TCP_Live, "), B("Process_Live")),  # a table the payload did not name as $
    (C("SELECT * FROM pragma_table_info('Process_Live', 'activity'), "), B("Process_Live")),
    # the store's tables named as quoted, bracketed, back-ticked, spaced or re-cased identifiers
    (C('DELETE FROM "activity"."Process_Live" /* '), B("Process_Live"), C(" */")),
    (C("DELETE FROM [activity].[process_live] /* "), B("Process_Live"), C(" */")),
    (C("DELETE FROM `ACTIVITY`.`PROCESS_LIVE` /* "), B("Process_Live"), C(" */")),
    (C('INSERT INTO "activity" . "TCP_Live" (Ts) SELECT Ts FROM '), B("Process_Live")),
    (C("WITH x AS (SELECT * FROM "), B("Process_Live"), C(') UPDATE activity."Process_Live" SET Ts = 0')),
    # an alias named like the store's table, then a write through the name
    (C("SELECT * FROM "), B("Process_Live"), C(' AS "activity.Process_Live"; DELETE FROM "activity.Process_Live"')),
]


@pytest.mark.parametrize("parts", HOSTILE, ids=lambda p: "".join(getattr(x, "text", "$" + getattr(x, "name", ""))
                                                               for x in p)[:60])
def test_a_payload_can_never_change_detach_or_escape_the_store(data_dir: Path, parts: tuple[A.SqlPart, ...]) -> None:
    before = digest(data_dir)
    status, error = run_sql(data_dir, *parts)
    assert status == "error", error
    assert digest(data_dir) == before
    assert not Path("/tmp/quanta-inventory-hostile.db").exists()
    # the same evaluator path reads the store
    assert run_sql(data_dir, C("SELECT count(*) FROM "), B("Process_Live"))[0] == "success"


@pytest.mark.parametrize("column", ['"x""); DROP TABLE activity.Process_Live; --"',
                                    "[Ts]]; DELETE FROM activity.Process_Live; --]",
                                    '`Ts``; UPDATE activity.Process_Live SET Ts = 0; --`'])
def test_a_column_name_with_sql_in_it_is_one_name(data_dir: Path, column: str) -> None:
    """A quoted column name holding SQL is one identifier (or, double-quoted and unknown, one
    string, as SQLite reads it): it reads or fails, and never runs what it holds."""
    before = digest(data_dir)
    status, error = run_sql(data_dir, C(f"SELECT {column} AS C FROM "), B("Process_Live"))
    assert status == "success" and error == "None" or status == "error" and "SQL error" in error, (status, error)
    assert digest(data_dir) == before
    assert run_sql(data_dir, C("SELECT count(*) FROM "), B("Process_Live"))[0] == "success"


def test_the_attached_store_refuses_writes_even_without_the_authorizer(data_dir: Path) -> None:
    """Defence in depth: were the authorizer and query_only both gone, the read-only attach still
    refuses every write."""
    pos = A.Pos(1, 1)
    prog = Program(source="", script=A.Script([]), is_action=False)
    ev = Evaluator(prog, AgentContext(data_dir=data_dir), Limits(), allow_actions=False)
    name = ev.attach_activity("Process_Live", pos)
    conn = ev.connection(pos)
    before = digest(data_dir)
    for sql in (f"DELETE FROM {name}", f"INSERT INTO {name} (Ts) VALUES (1)", "DROP TABLE activity.Process_Live",
                "CREATE TABLE activity.x (a)"):
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            conn.execute(sql)
    with pytest.raises(sqlite3.OperationalError, match="too many attached"):
        conn.execute("ATTACH DATABASE ':memory:' AS other")
    conn.close()
    assert digest(data_dir) == before


def test_questions_read_the_tables_by_their_names(data_dir: Path) -> None:
    ctx = AgentContext(data_dir=data_dir)
    r = run_program(compile_scale(
        'SELECT ProcessId, CommandLine FROM $Process_Live WHERE ExecutableName = "psexec" AND UserName = "alice" '
        'ORDER BY Ts;'), context=ctx)
    assert r.status == "success" and r.rows == [[101 + 2 * i, f"cmd {1 + 2 * i}"] for i in range(5)]
    # names are case-insensitive, as in the model; @tables and $tables join
    r = run_program(compile_scale(
        '@d = SELECT ExecutableName, ExecutionCount FROM $process_daily; '
        'SELECT d.ExecutableName, d.ExecutionCount, count(*) AS N FROM @d d JOIN $PROCESS_LIVE l '
        'ON l.ExecutableName = d.ExecutableName GROUP BY 1 ORDER BY 1;'), context=ctx)
    assert r.status == "success" and r.rows == [["bash", 5, 5], ["psexec", 5, 5]]
    # a parameter in the WHERE stays a literal
    r = run_program(compile_scale("SELECT count(*) FROM $Process_Live WHERE ExecutableName = %n%;",
                                  {"n": "x' OR '1'='1"}), context=ctx)
    assert r.status == "success" and r.rows == [[0]]


def test_limits_hold_on_the_store(data_dir: Path) -> None:
    ctx = AgentContext(data_dir=data_dir)
    r = run_program(compile_scale("SELECT * FROM $Process_Live;"), context=ctx, limits=Limits(max_rows=3))
    assert r.status == "error" and "row limit" in str(r.error)
    r = run_program(compile_scale(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT count(*) FROM n, $Process_Live;"),
        context=ctx, limits=Limits(timeout_seconds=1))
    assert r.status == "error" and "time" in str(r.error).lower()


def test_unknown_tables_are_compile_errors_with_their_position() -> None:
    with pytest.raises(Exception, match=r"Unknown built-in table \$Process_Weekly at line 1, column 15"):
        compile_scale("SELECT * FROM $Process_Weekly;")


def test_scale_check_and_the_reference_know_the_tables_and_columns(tmp_path: Path) -> None:
    f = tmp_path / "q.scale"
    f.write_text("SELECT ExecutableName FROM $TCP_Hourly WHERE IpAddress = %ip%;")
    r = subprocess.run([sys.executable, "-m", "quanta", "scale", "check", str(f)], capture_output=True, text=True)
    assert r.returncode == 0 and "ok: question" in r.stdout, r.stdout + r.stderr
    f.write_text("SELECT * FROM $TCP_Yearly;")
    r = subprocess.run([sys.executable, "-m", "quanta", "scale", "check", str(f)], capture_output=True, text=True)
    assert r.returncode == 1 and "Unknown built-in table $TCP_Yearly" in r.stdout
    f.write_text('@x = SELECT ExecutableName, Bogus FROM $Process_Live;')
    r = subprocess.run([sys.executable, "-m", "quanta", "scale", "check", str(f)], capture_output=True, text=True)
    assert r.returncode == 1 and "no such column: Bogus" in r.stdout and "line 1, column 6" in r.stdout, r.stdout
    f.write_text('@a = Agent.GetSummary(); SELECT Bogus FROM @a, $Process_Live;')  # @a's columns: known at run
    r = subprocess.run([sys.executable, "-m", "quanta", "scale", "check", str(f)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout
    md = render_methods_markdown()
    for src in SOURCES:
        for g in ("Live", "Hourly", "Daily", "Monthly"):
            assert f"### ${src.table(g)}" in md
            for col in src.columns(g):
                assert f"| `{col.name}` |" in md
    assert (Path(__file__).parent.parent / "docs" / "scale.md").read_text() .count("$Process_Live") >= 1


def test_the_reference_example_finds_recent_rows(tmp_path: Path) -> None:
    import re
    import time

    md = render_methods_markdown()
    example = re.search(r"Example: `(SELECT .*?;)`", md, re.S).group(1).replace("\n", " ")  # type: ignore[union-attr]
    s = Store(tmp_path / "inventory.db", parse_settings({"Module.Inventory.FlushIntervalSeconds": "0.05"}))
    s.start()
    s.put("Process_Live", {"TS": int(time.time()) - 3600, "ExecutableName": "psexec", "CommandLine": "psexec \\\\h",
                           "UserName": "alice"})
    s.put("Process_Live", {"TS": int(time.time()) - 8 * 86400, "ExecutableName": "psexec", "UserName": "old"})
    s.flush()
    s.stop()
    r = run_program(compile_scale(example), context=AgentContext(data_dir=tmp_path))
    assert r.status == "success" and r.rows == [["psexec", "psexec \\\\h", "alice"]], (example, r)


def test_quanta_methods_lists_the_tables_from_the_same_declaration() -> None:
    import os

    r = subprocess.run([sys.executable, "-m", "quanta", "methods"], capture_output=True, text=True,
                       env={**os.environ, "COLUMNS": "1000"}, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = {line.split("│")[1].strip(): line for line in r.stdout.splitlines() if line.count("│") >= 3}
    for src in SOURCES:
        for g in ("Live", "Hourly", "Daily", "Monthly"):
            line = lines["$" + src.table(g)]
            for col in src.columns(g):
                assert col.name in line, (src.table(g), col.name)
    assert "not confirmed against the model's documentation" in lines["$Logon_Live"]
