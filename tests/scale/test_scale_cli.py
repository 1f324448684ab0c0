"""Local authoring CLI (`quanta scale run|check`, `quanta methods`) and the generated docs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from quanta.scale import render_methods_markdown
from quanta.scale.cli import app, methods_command, parse_param

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


def invoke(*args: str, input: str | None = None):
    return runner.invoke(app, list(args), input=input)


def test_run_json_success(tmp_path) -> None:
    f = tmp_path / "q.scale"
    f.write_text("@p = OperatingSystem.GetProcesses();\nSELECT COUNT(*) AS n FROM @p WHERE ProcessId > %min%;\n")
    r = invoke("run", str(f), "--param", "min=0", "--json", "--data-dir", str(tmp_path))
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["status"] == "success" and out["columns"] == ["n"] and out["rows"][0][0] >= 1 and "error" not in out


def test_run_json_error_from_stdin(tmp_path) -> None:
    r = invoke("run", "-", "--json", "--data-dir", str(tmp_path), input="@d = Device.GetSummary();\nSELECT * FROM @D;\n")
    assert r.exit_code == 1
    out = json.loads(r.output)
    assert out == {"status": "error", "columns": [], "rows": [],
                   "error": {"message": "Unknown variable @D", "line": 2, "column": 15}}


def test_run_nocontent_exit_code(tmp_path) -> None:
    r = invoke("run", "-", "--json", "--data-dir", str(tmp_path), input="SELECT 1 AS a WHERE 0;")
    assert r.exit_code == 1 and json.loads(r.output)["status"] == "nocontent"


def test_run_actions_need_flag(tmp_path) -> None:
    src = 'Tagging.Set(Name: "Role", Value: %v%);'
    r = invoke("run", "-", "--json", "--param", "v=web", "--data-dir", str(tmp_path), input=src)
    assert r.exit_code == 1 and "not allowed" in json.loads(r.output)["error"]["message"]
    assert not (tmp_path / "tags.json").exists()
    r = invoke("run", "-", "--json", "--allow-actions", "--param", "v=web", "--data-dir", str(tmp_path), input=src)
    assert r.exit_code == 0 and json.loads(r.output)["rows"] == [["Role", "web", False]]
    assert json.loads((tmp_path / "tags.json").read_text())["Role"]["value"] == "web"


def test_run_table_output(tmp_path) -> None:
    r = invoke("run", "-", "--data-dir", str(tmp_path), input='SELECT "hello" AS greeting;')
    assert r.exit_code == 0 and "greeting" in r.output and "hello" in r.output


def test_check(tmp_path) -> None:
    r = invoke("check", "-", input="@p = OperatingSystem.GetProcesses();\nSELECT * FROM @p WHERE Name = %n%;")
    assert r.exit_code == 0 and "ok: question" in r.output
    r = invoke("check", "-", input='OperatingSystem.KillProcess(ProcessId: %pid%);')
    assert r.exit_code == 0 and "action" in r.output
    r = invoke("check", "-", input="@d = Device.getdisks();")
    assert r.exit_code == 1
    assert "Not implemented - Unsupported method 'getdisks' (in call to Device.getdisks) at line 1, column 13" in r.output.replace("\n", "")


@pytest.mark.parametrize("text, expected", [("a=1", ("a", 1)), ("a=-2.5", ("a", -2.5)), ("a=TRUE", ("a", True)),
                                            ("a=false", ("a", False)), ("a=x=y", ("a", "x=y")), ("a=", ("a", "")),
                                            ("a=nan", ("a", "nan")), ("a=01x", ("a", "01x"))])
def test_parse_param(text, expected) -> None:
    assert parse_param(text) == expected


def test_methods_command(capsys) -> None:
    methods_command(json_output=True)
    data = json.loads(capsys.readouterr().out)
    kp = next(m for m in data if m["module"] == "OperatingSystem" and m["name"] == "KillProcess")
    assert kp["is_action"] is True and kp["params"][0] == {"name": "ProcessId", "type": "string", "required": True, "default": None, "aliases": [],
                                                           "description": "the process id, as a string"}
    methods_command()
    assert "Tagging.GetAll" in capsys.readouterr().out


def test_docs_scale_md_is_up_to_date() -> None:
    committed = (REPO / "docs" / "scale.md").read_text(encoding="utf-8")
    assert committed == render_methods_markdown(), (
        "docs/scale.md is stale: regenerate with "
        "python -c 'from quanta.scale import render_methods_markdown as r; open(\"docs/scale.md\",\"w\").write(r())'"
    )
