"""SCALE evaluation: SELECT on SQLite, control flow, instruction parameters, safety and limits."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from quanta.scale import AgentContext, Limits, RunResult, ScaleError, compile_scale, run_program


@pytest.fixture
def ctx(tmp_path: Path) -> AgentContext:
    return AgentContext(data_dir=tmp_path / "agent")


def run(ctx: AgentContext, text: str, params: dict | None = None, **kw) -> RunResult:
    return run_program(compile_scale(text, params), context=ctx, **kw)


def test_scalar_shorthand_is_one_row_value_table(ctx) -> None:
    r = run(ctx, "@x = 42;")
    assert (r.status, r.columns, r.rows) == ("success", ["Value"], [[42]])
    r = run(ctx, '@x = "hi"; SELECT Value || "!" AS v FROM @x;')
    assert r.rows == [["hi!"]]


def test_last_dataset_is_result(ctx) -> None:
    r = run(ctx, "@a = 1; @b = 2; SELECT Value * 10 AS v FROM @a;")
    assert r.rows == [[10]]
    r = run(ctx, "SELECT 1 AS a; @b = 7;")
    assert (r.columns, r.rows) == (["Value"], [[7]])


def test_empty_result_is_nocontent(ctx) -> None:
    r = run(ctx, "SELECT 1 AS a WHERE 0;")
    assert (r.status, r.columns, r.rows) == ("nocontent", ["a"], [])


def test_double_quoted_strings_are_strings_even_with_matching_column(ctx) -> None:
    r = run(ctx, '@t = SELECT "x" AS Name; SELECT "Name" AS s, Name, [Name] AS b FROM @t;')
    assert r.rows == [["Name", "x", "x"]]


def test_single_quoted_sql_strings_and_comments(ctx) -> None:
    r = run(ctx, "SELECT 'it''s' AS a, -- it's a comment\n /* isn't */ 2 AS b // and this'\n;")
    assert (r.columns, r.rows) == (["a", "b"], [["it's", 2]])


def test_regexp_and_regexpreplace(ctx) -> None:
    r = run(ctx, r'@t = SELECT "C:\\Program Files\\App\\app.exe" AS p; SELECT REGEXPREPLACE("^(.*)\\\\([^\\\\]+)$", p, "$2 in $1") AS r FROM @t;')
    assert r.rows == [["app.exe in C:\\Program Files\\App"]]
    r = run(ctx, '@t = SELECT "abc123" AS s UNION ALL SELECT "xyz"; SELECT s FROM @t WHERE s REGEXP "[0-9]+$";')
    assert r.rows == [["abc123"]]
    r = run(ctx, 'SELECT REGEXPREPLACE("a", "banana", "$$-$&") AS r;')
    assert r.rows == [["b$-an$-an$-a"]]


def test_group_by_and_case_sensitive_tables(ctx) -> None:
    r = run(ctx, """@t = SELECT 1 AS a UNION ALL SELECT 1 UNION ALL SELECT 2;
@T = SELECT 100 AS a;
SELECT a, COUNT(*) AS n FROM @t GROUP BY a ORDER BY a;""")
    assert r.rows == [[1, 2], [2, 1]]
    r = run(ctx, "@t = SELECT 1 AS a; @T = SELECT 100 AS a; SELECT (SELECT a FROM @T) - (SELECT a FROM @t) AS d;")
    assert r.rows == [[99]]


def test_foreach_concatenates_last_statement_of_each_iteration(ctx) -> None:
    r = run(ctx, """@t = SELECT 1 AS n UNION ALL SELECT 2 UNION ALL SELECT 3;
@out = FOREACH @row IN @t DO
  @ignored = SELECT 0 AS zero;
  SELECT n * n AS sq FROM @row;
DONE;
SELECT SUM(sq) AS total FROM @out;""")
    assert r.rows == [[14]]


def test_foreach_method_call_with_column_reference(ctx) -> None:
    r = run(ctx, """@t = SELECT "a,b" AS s UNION ALL SELECT "c";
FOREACH @row IN @t DO Utilities.SplitLines(Text: @row.s, Delimiter: ","); DONE;""")
    assert [row[1] for row in r.rows] == ["a", "b", "c"]


def test_column_reference_calls_once_per_row(ctx) -> None:
    r = run(ctx, '@t = SELECT "x y" AS s UNION ALL SELECT "z"; Utilities.SplitLines(Text: @t.s, Delimiter: " ");')
    assert [row[1] for row in r.rows] == ["x", "y", "z"]
    r = run(ctx, '@t = SELECT "x" AS s WHERE 0; Utilities.SplitLines(Text: @t.s);')
    assert (r.status, r.columns) == ("nocontent", ["Index", "Output"])


def test_if_else_and_not(ctx) -> None:
    src = """@full = SELECT 1 AS a; @empty = SELECT 1 AS a WHERE 0;
@r1 = IF (@full) SELECT "then" AS b; ELSE SELECT "else" AS b; ENDIF;
@r2 = IF (@empty) SELECT "then" AS b; ELSE SELECT "else" AS b; ENDIF;
@r3 = IF (NOT @empty) SELECT "not" AS b; ENDIF;
SELECT (SELECT b FROM @r1) || (SELECT b FROM @r2) || (SELECT b FROM @r3) AS v;"""
    assert run(ctx, src).rows == [["thenelsenot"]]


def test_evaluate(ctx) -> None:
    r = run(ctx, "@e = SELECT 1 AS a WHERE 0; EVALUATE; SELECT 2 AS never;")
    assert (r.status, r.rows) == ("nocontent", [])
    r = run(ctx, "@e = SELECT 1 AS a; EVALUATE; SELECT 2 AS b;")
    assert (r.status, r.rows) == ("success", [[2]])


def test_exit_statements(ctx) -> None:
    r = run(ctx, "SELECT 1 AS a; NOCONTENT; SELECT 2;")
    assert (r.status, r.rows) == ("nocontent", [])
    r = run(ctx, 'SELECT 1 AS a;\n  ERROR "it broke"; SELECT 2;')
    assert r.status == "error" and str(r.error) == "it broke at line 2, column 3"
    r = run(ctx, '@d = SELECT "Windows" AS OperatingSystemType; IF (@d) NOTIMPLEMENTED "Not on Windows"; ENDIF;')
    assert r.status == "notimplemented" and r.error.message == "Not on Windows"
    r = run(ctx, "@a = SELECT 1 AS a; SELECT 2 AS b; RETURN @a; SELECT 3 AS c;")
    assert (r.status, r.rows) == ("success", [[1]])
    r = run(ctx, "SELECT 2 AS b; RETURN; SELECT 3 AS c;")
    assert r.rows == [[2]]
    j = run(ctx, 'ERROR "x";').to_json()
    assert j == {"status": "error", "columns": [], "rows": [], "error": {"message": "x", "line": 1, "column": 1}}


def test_sql_error_has_position_and_never_raises(ctx) -> None:
    r = run(ctx, "@a = SELECT 1 AS x;\n\n   SELECT nosuchcol FROM @a;")
    assert r.status == "error" and r.error.line == 3 and r.error.column == 4
    assert "no such column: nosuchcol" in r.error.message


def test_runtime_type_check_for_column_values(ctx) -> None:
    r = run(ctx, "@p = SELECT 99999999 AS ProcessId; OperatingSystem.KillProcess(ProcessId: @p.ProcessId);", allow_actions=True)
    assert r.status == "error"
    assert r.error.message == "Parameter 'ProcessId' expects string, got integer (in call to OperatingSystem.KillProcess)"


def test_unknown_column_reference_at_run_time(ctx) -> None:
    r = run(ctx, "@p = SELECT 1 AS a; Utilities.SplitLines(Text: @p.b);")
    assert r.status == "error" and r.error.message == "Unknown column 'b' in @p (in call to Utilities.SplitLines)"


def test_duplicate_output_columns_are_renamed(ctx) -> None:
    r = run(ctx, "@a = SELECT 1 AS x; SELECT a.x, b.x FROM @a a, @a b;")
    assert r.columns == ["x", "x_1"]


# -- instruction parameters ---------------------------------------------------------------------

HOSTILE = [
    "'; DROP TABLE x; --",
    '"); Device.GetSummary(); //',
    "a' OR '1'='1",
    "%other% 100% ",
    "/* open comment",
    "-- comment\nSELECT 1;",
    "line1\nline2\r\n;",
    "\\\"'\\'`[]@x $SoftwarePerformance_Live",
    "日本語 ✓",
]


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_parameter_in_select_stays_a_value(ctx, value: str) -> None:
    r = run(ctx, "SELECT %v% AS v, 'fixed' AS w;", {"v": value, "other": "x"})
    assert (r.status, r.columns, r.rows) == ("success", ["v", "w"], [[value, "fixed"]])
    r = run(ctx, 'SELECT "%v%" AS v;', {"v": value})
    assert r.rows == [[value]]


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_parameter_in_method_argument_stays_a_value(ctx, value: str) -> None:
    prog = compile_scale("Utilities.SplitLines(Text: %v%, Delimiter: \"\\u0000never\");", {"v": value})
    assert prog.is_action is False and prog.methods == ["Utilities.SplitLines"]
    r = run_program(prog, context=ctx)
    assert r.rows == [[0, value]]
    r = run(ctx, '@x = %v%; SELECT Value FROM @x;', {"v": value})
    assert r.rows == [[value]]


def test_parameter_cannot_turn_a_question_into_an_action(ctx) -> None:
    prog = compile_scale("Utilities.SplitLines(Text: %v%);", {"v": '"); OperatingSystem.KillProcess(ProcessId: "1'})
    assert prog.is_action is False


def test_typed_parameters(ctx) -> None:
    r = run(ctx, "SELECT %i% + 1 AS i, %f% * 2 AS f, %b% AS b, typeof(%s%) AS t;", {"i": 41, "f": 1.25, "b": True, "s": "7"})
    assert r.rows == [[42, 2.5, 1, "text"]]
    r = run(ctx, "FileSystem.GetFiles(Folder: %d%, Depth: %n%, MaxCount: 1);", {"d": str(ctx.data_dir.parent), "n": 0})
    assert r.status in ("success", "nocontent")
    with pytest.raises(ScaleError) as ei:
        compile_scale("FileSystem.GetFiles(Folder: \"/tmp\", Depth: %n%);", {"n": "1"})
    assert ei.value.message.startswith("Parameter 'Depth' expects integer, got string")


def test_missing_parameter_value_names_it() -> None:
    with pytest.raises(ScaleError) as ei:
        compile_scale("@a = 1;\nSELECT * FROM @a WHERE Value = %wanted%;", {"other": 1})
    assert str(ei.value) == "Missing value for instruction parameter %wanted% at line 2, column 32"
    with pytest.raises(ScaleError) as ei:
        compile_scale("Utilities.SplitLines(Text: %t%);")
    assert ei.value.message == "Missing value for instruction parameter %t%"


def test_like_pattern_is_not_a_parameter(ctx) -> None:
    r = run(ctx, '@t = SELECT "google chrome" AS n; SELECT n FROM @t WHERE n LIKE "%chrome%";')
    assert r.rows == [["google chrome"]]
    assert run(ctx, "SELECT 7 % 3 AS m;").rows == [[1]]


def test_bad_parameter_values_rejected() -> None:
    for bad in [None, [1], float("nan"), "nul\x00byte"]:
        with pytest.raises(ScaleError):
            compile_scale("SELECT %v%;", {"v": bad})


# -- safety -------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "sql, word",
    [
        ("SELECT * FROM sqlite_master;", "reading sqlite_master"),
        ("SELECT * FROM pragma_table_info('t1');", "not authorized"),
        ("SELECT * FROM temp.sqlite_temp_master;", "not authorized"),
        ("WITH x AS (SELECT * FROM @a) INSERT INTO t1 SELECT * FROM x;", "INSERT is not allowed"),
        ("WITH x AS (SELECT * FROM @a) UPDATE t1 SET x = 2;", "not authorized"),
        ("WITH x AS (SELECT * FROM @a) DELETE FROM t1;", "DELETE is not allowed"),
        ("SELECT load_extension('/tmp/x.so');", "load_extension"),
    ],
)
def test_authorizer_blocks_everything_but_reads(ctx, sql: str, word: str) -> None:
    r = run(ctx, "@a = SELECT 1 AS x; " + sql)
    assert r.status == "error" and word in r.error.message


def test_other_statements_tables_not_readable(ctx) -> None:
    # @a is loaded as an SQLite table when the first SELECT reads it; the second SELECT only
    # references @b, so even guessing @a's internal name must be denied.
    r = run(ctx, '@a = SELECT "secret" AS s; @x = SELECT s FROM @a; @b = SELECT 1 AS y; SELECT * FROM t1;')
    assert r.status == "error" and "not authorized" in r.error.message


def test_attach_and_pragma_statements_are_not_selects(ctx) -> None:
    with pytest.raises(ScaleError):
        compile_scale("ATTACH DATABASE '/tmp/x.db' AS x;")
    with pytest.raises(ScaleError):
        compile_scale("PRAGMA writable_schema = 1;")


def test_multiple_statements_cannot_be_smuggled(ctx) -> None:
    with pytest.raises(ScaleError):
        compile_scale("SELECT 1; DROP TABLE t1;")


def test_actions_refused_unless_allowed(ctx) -> None:
    prog = compile_scale('@t = SELECT 1 AS a;\nTagging.Set(Name: "k", Value: "v");')
    r = run_program(prog, context=ctx)
    assert r.status == "error"
    assert str(r.error) == "Action method Tagging.Set is not allowed: actions are not enabled at line 2, column 1"
    assert not (ctx.data_dir / "tags.json").exists()
    r = run_program(prog, context=ctx, allow_actions=True)
    assert r.status == "success" and (ctx.data_dir / "tags.json").exists()


# -- limits -------------------------------------------------------------------------------------

def test_infinite_select_stopped_by_time_limit(ctx) -> None:
    t0 = time.monotonic()
    r = run(ctx, "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT COUNT(*) FROM c;",
            limits=Limits(timeout_seconds=0.5))
    elapsed = time.monotonic() - t0
    assert r.status == "error" and r.error.message == "Time limit of 0.5 seconds exceeded"
    assert (r.error.line, r.error.column) == (1, 1)
    assert elapsed < 5


def test_time_limit_applies_to_methods(ctx) -> None:
    t0 = time.monotonic()
    r = run(ctx, 'Scripting.RunText(Language: "bash", Text: "sleep 30", TimeoutKill: true);', limits=Limits(timeout_seconds=0.5), allow_actions=True)
    assert r.status == "error" and "Time limit of 0.5 seconds exceeded" == r.error.message
    assert time.monotonic() - t0 < 5


def test_row_limit(ctx) -> None:
    src = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 50) SELECT x FROM c;"
    r = run(ctx, src, limits=Limits(max_rows=49))
    assert r.status == "error" and r.error.message == "Result exceeds the row limit of 49 rows"
    assert run(ctx, src, limits=Limits(max_rows=50)).status == "success"
    r = run(ctx, '@t = SELECT 1 AS n UNION ALL SELECT 2; FOREACH @r IN @t DO Utilities.SplitLines(Text: "a b c", Delimiter: " "); DONE;',
            limits=Limits(max_rows=5))
    assert r.status == "error" and "row limit of 5" in r.error.message


def test_memory_limit(ctx) -> None:
    r = run(ctx, "SELECT zeroblob(5000000) AS b;", limits=Limits(max_memory_bytes=2_000_000))
    assert r.status == "error" and "Memory limit" in r.error.message
    r = run(ctx, "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 20000) SELECT x, printf('%.200c', 'x') AS pad FROM c;",
            limits=Limits(max_memory_bytes=1_000_000))
    assert r.status == "error" and r.error.message == "Memory limit of 1000000 bytes exceeded"


def test_run_program_never_raises_on_internal_failures(ctx, monkeypatch) -> None:
    from quanta.scale.methods import device

    monkeypatch.setattr(device.psutil, "disk_partitions", lambda all=False: 1 / 0)
    r = run(ctx, "Device.GetDisks();")
    assert r.status == "error" and r.error.message.startswith("Device.GetDisks failed: ZeroDivisionError")
