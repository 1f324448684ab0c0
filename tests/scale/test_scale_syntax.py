"""SCALE syntax: lexer, parser and checker, with the documented error shapes."""

from __future__ import annotations

import pytest

from quanta.scale import ScaleError, compile_scale
from quanta.scale import ast as A


def err(text: str, params: dict | None = None) -> ScaleError:
    with pytest.raises(ScaleError) as ei:
        compile_scale(text, params)
    return ei.value


# -- documented error shapes ------------------------------------------------------------------

def test_unknown_variable_shape() -> None:
    e = err("@procs = OperatingSystem.GetProcesses();\nSELECT * FROM @x;")
    assert str(e) == "Unknown variable @x at line 2, column 15"
    assert (e.message, e.line, e.column) == ("Unknown variable @x", 2, 15)


def test_unsupported_module_shape() -> None:
    e = err("@a = agent.GetSummary();")
    assert str(e) == "Not implemented - Unsupported module 'agent' at line 1, column 6"


def test_unsupported_method_shape() -> None:
    e = err("\n  @d = Device.getdisks();")
    assert str(e) == "Not implemented - Unsupported method 'getdisks' (in call to Device.getdisks) at line 2, column 15"


def test_missing_parameter_shape() -> None:
    e = err('Interaction.ShowQuestion(Title: "t", Async: false);')
    assert str(e) == "Missing parameter 'Description' (in call to Interaction.ShowQuestion) at line 1, column 1"


def test_missing_parameter_reported_before_unknown_lowercase_ones() -> None:
    # the documented case-sensitivity example: lower-case parameter names
    e = err('Interaction.ShowQuestion(async: false, description: "d", title: "t");')
    assert e.message == "Missing parameter 'Description' (in call to Interaction.ShowQuestion)"


# -- known bad payloads (issue acceptance list) ------------------------------------------------

def test_bad_table_wrong_case() -> None:
    e = err("@Procs = OperatingSystem.GetProcesses();\nSELECT Executable FROM @procs;")
    assert (e.message, e.line, e.column) == ("Unknown variable @procs", 2, 24)


def test_bad_module_wrong_case() -> None:
    e = err("@x = device.GetSummary();")
    assert (e.message, e.line, e.column) == ("Not implemented - Unsupported module 'device'", 1, 6)


def test_bad_method_wrong_case() -> None:
    e = err("Device.getsummary();")
    assert (e.message, e.line, e.column) == ("Not implemented - Unsupported method 'getsummary' (in call to Device.getsummary)", 1, 8)


def test_bad_missing_required_parameter() -> None:
    e = err("@u = Users.GetLocalGroupMembers();")
    assert (e.message, e.line, e.column) == ("Missing parameter 'GroupName' (in call to Users.GetLocalGroupMembers)", 1, 6)


def test_bad_foreach_closed_with_endif() -> None:
    src = "@p = OperatingSystem.GetProcesses();\nFOREACH @r IN @p DO\n  SELECT 1;\nENDIF;"
    e = err(src)
    assert e.line == 4 and e.column == 1
    assert "FOREACH opened at line 2, column 1 must be closed with DONE, found ENDIF" == e.message


def test_if_closed_with_done() -> None:
    e = err("@p = Device.GetSummary();\nIF (@p) SELECT 1; DONE;")
    assert (e.line, e.column) == (2, 19)
    assert "must be closed with ENDIF" in e.message


def test_single_quote_in_sql_comment_is_fine() -> None:
    src = """@p = OperatingSystem.GetProcesses();
SELECT Executable -- don't break
  /* it's fine, isn't it */
FROM @p // the agent's processes
WHERE ProcessId > 0;"""
    prog = compile_scale(src)
    sel = prog.script.statements[1]
    assert isinstance(sel, A.Select)
    code = "".join(p.text for p in sel.parts if isinstance(p, A.SqlCode))
    assert "'" not in code and "don" not in code and "break" not in code


# -- syntax rules -----------------------------------------------------------------------------

def _strip_pos(node):
    if isinstance(node, list):
        return [_strip_pos(n) for n in node]
    if hasattr(node, "__dataclass_fields__"):
        return (type(node).__name__, {k: _strip_pos(getattr(node, k)) for k in node.__dataclass_fields__ if not k.endswith("pos")})
    return node


def test_one_line_equals_many_lines() -> None:
    many = """@p = OperatingSystem.GetProcesses();
    @q = SELECT   Name
           FROM @p
          WHERE ProcessId > 1;
    FOREACH @r IN @q DO
        SELECT Name FROM @r;
    DONE;
    IF (@q)
      EVALUATE;
    ELSE
      NOCONTENT;
    ENDIF;"""
    one = " ".join(line.strip() for line in many.splitlines())
    a, b = compile_scale(many), compile_scale(one)
    sa = _strip_pos(a.script.statements)
    sb = _strip_pos(b.script.statements)
    # SQL code differs only in whitespace
    norm = lambda s: " ".join(repr(s).replace("\\n", " ").split())  # noqa: E731
    assert norm(sa) == norm(sb)


def test_statements_need_semicolons() -> None:
    e = err("@p = Device.GetSummary()\n@q = Device.GetDisks();")
    assert e.message.startswith("Expected ';' after method call") and (e.line, e.column) == (2, 1)
    e = err("SELECT 1")
    assert e.message == "Missing ';' at the end of the SELECT statement" and (e.line, e.column) == (1, 1)


def test_comments_everywhere_and_non_ascii() -> None:
    src = """// début — コメント
/* multi
   line ✓ */ @p /* between */ = /* tokens */ Device.GetSummary( /* in args */ ); // trailing
"""
    prog = compile_scale(src)
    assert isinstance(prog.script.statements[0], A.Assign)


def test_unterminated_comment_and_string() -> None:
    e = err("@p = Device.GetSummary();\n/* never closed")
    assert (e.message, e.line, e.column) == ("Unterminated comment", 2, 1)
    e = err('Utilities.SplitLines(Text: "abc);')
    assert (e.message, e.line, e.column) == ("Unterminated string literal", 1, 28)
    e = err("SELECT 'abc;")
    assert (e.message, e.line, e.column) == ("Unterminated SQL string literal", 1, 8)


def test_string_escapes() -> None:
    prog = compile_scale(r'@x = "a\"b\\c\d";')
    assign = prog.script.statements[0]
    assert assign.value.value == 'a"b\\c\\d'


def test_scalar_shorthand_values() -> None:
    for src, expected in [("@x = 1;", 1), ("@x = -2.5;", -2.5), ('@x = "s";', "s"), ("@x = TRUE;", True), ("@x = False;", False)]:
        assign = compile_scale(src).script.statements[0]
        assert isinstance(assign.value, A.Literal) and assign.value.value == expected and type(assign.value.value) is type(expected)


@pytest.mark.parametrize("word", ["true", "TRUE", "True"])
def test_boolean_spellings(word: str) -> None:
    prog = compile_scale(f'Utilities.SplitLines(Text: "a", RemoveEmptyEntries: {word});')
    assert prog.script.statements[0].args[1].value.value is True


def test_parameter_type_checking() -> None:
    e = err("OperatingSystem.KillProcess(ProcessId: 1234);")
    assert e.message == "Parameter 'ProcessId' expects string, got integer (in call to OperatingSystem.KillProcess)"
    assert (e.line, e.column) == (1, 40)
    e = err('Utilities.SplitLines(Text: "a", RemoveEmptyEntries: "yes");')
    assert e.message.startswith("Parameter 'RemoveEmptyEntries' expects boolean, got string")
    e = err('FileSystem.GetFiles(Folder: "/tmp", Depth: 1.5);')
    assert e.message.startswith("Parameter 'Depth' expects integer, got number")


def test_unknown_and_duplicate_parameters() -> None:
    e = err('Utilities.SplitLines(Text: "a", Bogus: 1);')
    assert (e.message, e.column) == ("Unknown parameter 'Bogus' (in call to Utilities.SplitLines)", 33)
    e = err('Utilities.SplitLines(Text: "a", Text: "b");')
    assert e.message == "Duplicate parameter 'Text' (in call to Utilities.SplitLines)"
    # parameter names are case-sensitive
    e = err('Utilities.SplitLines(text: "a");')
    assert e.message == "Missing parameter 'Text' (in call to Utilities.SplitLines)"


def test_filepath_alias_for_filename() -> None:
    compile_scale('FileSystem.GetFileByLine(FilePath: "/etc/hostname");')
    compile_scale('FileSystem.GetFileByLine(FileName: "/etc/hostname");')
    e = err('FileSystem.GetFileByLine(FileName: "/a", FilePath: "/b");')
    assert e.message.startswith("Duplicate parameter 'FilePath'")


def test_column_reference_argument() -> None:
    prog = compile_scale("@p = OperatingSystem.GetProcesses();\n@k = SELECT CAST(ProcessId AS TEXT) AS Id FROM @p WHERE 0;\nOperatingSystem.KillProcess(ProcessId: @k.Id);")
    arg = prog.script.statements[2].args[0]
    assert isinstance(arg.value, A.ColumnRef) and (arg.value.var, arg.value.column) == ("k", "Id")
    e = err("OperatingSystem.KillProcess(ProcessId: @nope.Id);")
    assert (e.message, e.column) == ("Unknown variable @nope", 40)


def test_foreach_if_and_exits_parse() -> None:
    prog = compile_scale("""@p = Device.GetSummary();
@o = FOREACH @r IN @p DO SELECT DeviceName FROM @r; DONE;
@i = IF (NOT @p) SELECT 1 AS a; ELSE SELECT 2 AS a; ENDIF;
IF NOT (@p) RETURN; ENDIF;
EVALUATE;
NOCONTENT;
ERROR "bad";
NOTIMPLEMENTED "later";
RETURN @p;""")
    kinds = [type(s).__name__ for s in prog.script.statements]
    assert kinds == ["Assign", "Assign", "Assign", "If", "Evaluate", "Exit", "Exit", "Exit", "Exit"]
    assert isinstance(prog.script.statements[1].value, A.Foreach)
    assert prog.script.statements[2].value.negate is True
    assert prog.script.statements[3].negate is True
    assert [s.kind for s in prog.script.statements[5:]] == ["NOCONTENT", "ERROR", "NOTIMPLEMENTED", "RETURN"]


def test_if_condition_must_be_a_table() -> None:
    e = err("IF (1) SELECT 1; ENDIF;")
    assert e.message.startswith("Expected a @table as the IF condition") and (e.line, e.column) == (1, 5)


def test_foreach_row_variable_scoped_and_known() -> None:
    e = err("@p = Device.GetSummary();\nFOREACH @r IN @p DO SELECT * FROM @R; DONE;")
    assert (e.message, e.line, e.column) == ("Unknown variable @R", 2, 35)
    e = err("FOREACH @r IN @p DO SELECT 1; DONE;")
    assert (e.message, e.column) == ("Unknown variable @p", 15)


def test_unclosed_blocks() -> None:
    e = err("@p = Device.GetSummary();\nFOREACH @r IN @p DO SELECT 1;")
    assert (e.message, e.line, e.column) == ("FOREACH is not closed with DONE", 2, 1)
    e = err("@p = Device.GetSummary();\nIF (@p) SELECT 1;")
    assert (e.message, e.line, e.column) == ("IF is not closed with ENDIF", 2, 1)
    e = err("DONE;")
    assert (e.message, e.line, e.column) == ("Unexpected DONE", 1, 1)


def test_keywords_case_insensitive_names_case_sensitive() -> None:
    prog = compile_scale("@p = Device.GetSummary(); foreach @r in @p do select 1 as x; done; if (@p) evaluate; endif;")
    assert len(prog.script.statements) == 3


def test_unknown_builtin_table_and_characters() -> None:
    e = err("SELECT * FROM $Nope;")
    assert (e.message, e.column) == ("Unknown built-in table $Nope", 15)
    compile_scale("SELECT * FROM $SoftwarePerformance_Live;")
    e = err("@x = 1 # 2;")
    assert (e.message, e.column) == ("Expected ';' after value, found '#'", 8) or e.message == "Unexpected character '#'"


def test_sql_double_quotes_and_brackets() -> None:
    prog = compile_scale('@p = Device.GetSummary();\nSELECT [DeviceName] AS [Device Name] FROM @p WHERE OperatingSystemType = "Linux" OR 1;')
    parts = prog.script.statements[1].parts
    assert any(isinstance(p, A.SqlString) and p.value == "Linux" for p in parts)
    code = "".join(p.text for p in parts if isinstance(p, A.SqlCode))
    assert '"DeviceName"' in code and '"Device Name"' in code


def test_action_detection_anywhere() -> None:
    assert compile_scale("Device.GetSummary();").is_action is False
    nested = compile_scale("""@p = Device.GetSummary();
FOREACH @r IN @p DO
  IF (@r) ELSE OperatingSystem.KillProcess(ProcessId: "999999"); ENDIF;
DONE;""")
    assert nested.is_action is True
    assert [(a.method, a.line, a.column) for a in nested.actions] == [("OperatingSystem.KillProcess", 3, 16)]
    assert compile_scale('@t = Tagging.Set(Name: "a", Value: "b");').is_action is True
    assert compile_scale('Tagging.GetAll();').is_action is False


def test_program_keeps_source() -> None:
    src = "Device.GetSummary();"
    assert compile_scale(src).source == src
