"""Issue 12, the CLI for operators: one-line errors, exit codes, login profiles, results, history,
export, and a host export that leaves the Master alone unless asked."""

from __future__ import annotations

import csv
import io
import json
import os
import stat
import time
import tomllib
from pathlib import Path

import pytest

from conftest import Server, quanta
from quanta.roles import FULL_ADMIN

SUMMARY = "@s = Device.GetSummary(); SELECT * FROM @s;"


def _env(tmp_path: Path) -> dict[str, str]:
    cfg = tmp_path / "workstation-config"
    return {**os.environ, "XDG_CONFIG_HOME": str(cfg), "QUANTA_PASSWORD": ""}


def _one_line_error(r, code: int | None = None) -> str:  # type: ignore[no-untyped-def]
    assert r.returncode != 0, r
    if code is not None:
        assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_missing_or_wrong_data_directory_and_no_profile_are_one_line(tmp_path: Path) -> None:
    env = _env(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    for args in (("devices", "/nonexistent"), ("results", "/nonexistent", "1"), ("history", "/nonexistent"),
                 ("export", "/nonexistent", "1"), ("approve", "/nonexistent", "1"), ("devices", str(empty)),
                 ("user", "list", "/nonexistent"), ("audit", str(empty)), ("enroll", str(empty), "--device", "d",
                                                                           "--out", str(tmp_path / "a")),
                 ("server", "/nonexistent"), ("systemd", "/nonexistent")):
        line = _one_line_error(quanta(*args, check=False, env=env))
        assert "/nonexistent" in line or str(empty) in line, line
    r = quanta("ask", "/nonexistent", SUMMARY, "--json", check=False, env=env)
    assert "/nonexistent" in _one_line_error(r, 2)
    # no directory and no profile: says how to log in
    assert "quanta login" in _one_line_error(quanta("devices", check=False, env=env))
    assert "quanta login" in _one_line_error(quanta("ask", SUMMARY, check=False, env=env), 2)
    assert "no login profile 'nope'" in _one_line_error(quanta("history", "--profile", "nope", check=False, env=env))
    # an unreachable server
    r = quanta("login", "https://127.0.0.1:1", "--user", "u", "--password-file", str(_pw(tmp_path)), check=False, env=env)
    assert "cannot reach" in _one_line_error(r, 2)
    # hostile profile names and URLs
    for bad in (("login", "http://127.0.0.1:1", "--user", "u"), ("login", "https://h:1/x?y", "--user", "u"),
                ("login", "https://h:1", "--user", "u", "--profile", "../../etc/x")):
        _one_line_error(quanta(*bad, check=False, env=env), 2)
    assert not (tmp_path / "workstation-config" / "quanta" / "profiles.toml").exists()


def _pw(tmp_path: Path, text: str = "a long enough password 1") -> Path:
    f = tmp_path / f"pw-{abs(hash(text))}"
    f.write_text(text + "\n")
    f.chmod(0o600)
    return f


def test_help_names_exit_codes_and_ports_and_version() -> None:
    h = quanta("ask", "--help").stdout
    for code in range(6):
        assert f"  {code}  " in h
    assert "--wait-approval" in h and "--profile" in h
    from quanta.settings import SETTABLE_PORTS

    text = " ".join(quanta("init", "--help", env={**os.environ, "COLUMNS": "300"}).stdout.split())
    for name in SETTABLE_PORTS:
        assert name in text
    assert quanta("--version").stdout.startswith("quanta ")
    r = quanta("ask", "/x", SUMMARY, "--wait", "nan", check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr


def _toml(path: Path) -> dict:
    return tomllib.loads(path.read_text())


def _switch_rows(root: Path) -> list[dict]:
    from quanta.db import make_engine, store
    from quanta.settings import DataDir, load_settings

    return store.switch_rows(make_engine(DataDir(root).master_url(load_settings(root))))


def test_host_export_leaves_a_single_server_alone_unless_asked(tmp_path: Path) -> None:
    m = tmp_path / "master"
    quanta("init", str(m), "--server-name", "localhost")
    before_toml = (m / "quanta.toml").read_text()
    before_rows = _switch_rows(m)
    assert [r["Host"] for r in before_rows] == ["localhost"]
    args = ("host", "export", str(m), "--role", "dmz", "--server-name", "dmz.example", "--response-url",
            "https://resp.example:8443")
    # dry run: says what would change, writes nothing
    r = quanta(*args, "--out", str(tmp_path / "dry"), "--dry-run")
    assert "would master: set role = 'master'" in r.stderr and "would master: remove its own Switch" in r.stderr
    assert not (tmp_path / "dry").exists()
    # without --update-master: the host's directory, and the Master exactly as it was
    r = quanta(*args, "--out", str(tmp_path / "dmz"))
    assert "was NOT changed" in r.stdout and (tmp_path / "dmz" / "quanta.toml").exists()
    assert (m / "quanta.toml").read_text() == before_toml
    assert _toml(m / "quanta.toml").get("role", "single") == "single"
    assert _switch_rows(m) == before_rows  # its Core and Switch stay
    # a careless operator: the Master's own name, a non-empty directory of something else
    bad = quanta("host", "export", str(m), "--role", "dmz", "--server-name", "localhost", "--response-url",
                 "https://r:1", "--out", str(tmp_path / "x"), check=False)
    assert "own name" in _one_line_error(bad, 2)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "f").write_text("x")
    assert "not empty" in _one_line_error(quanta(*args, "--out", str(tmp_path / "junk"), check=False), 2)
    # asked: the same directory is kept, and the Master changes as listed
    r = quanta(*args, "--out", str(tmp_path / "dmz"), "--update-master")
    assert _toml(m / "quanta.toml")["role"] == "master"
    assert _toml(m / "quanta.toml")["replicate_to"] == ["https://dmz.example:443"]
    assert [r["Host"] for r in _switch_rows(m)] == ["dmz.example"]


def test_operator_from_a_workstation(server: Server, tmp_path: Path) -> None:
    env = _env(tmp_path)
    server.enroll("dev1")
    server.start_agent("dev1")
    server.wait_online({"dev1"})
    pw = _pw(tmp_path)
    quanta("user", "add", str(server.root), "--username", "quinn", "--role", FULL_ADMIN, "--password-file", str(pw))
    url = f"https://localhost:{server.https}"
    ca = tmp_path / "ca.crt"
    ca.write_bytes((server.root / "pki" / "ca.crt").read_bytes())
    # a refused login stores nothing
    r = quanta("login", url, "--user", "quinn", "--password-file", str(_pw(tmp_path, "wrong password 12345")),
               "--ca", str(ca), check=False, env=env)
    assert "login refused" in _one_line_error(r, 2)
    # without the CA the server's certificate is not trusted
    r = quanta("login", url, "--user", "quinn", "--password-file", str(pw), check=False, env=env)
    assert "certificate" in _one_line_error(r, 2).lower()
    # a profile without a password file: no password anywhere in it
    env_pw = {**env, "QUANTA_PASSWORD": pw.read_text().strip()}
    r = quanta("login", url, "--user", "quinn", "--ca", str(ca), "--profile", "work", env=env_pw)
    cfg = tmp_path / "workstation-config" / "quanta"
    prof = cfg / "profiles.toml"
    assert stat.S_IMODE(prof.stat().st_mode) == 0o600 and stat.S_IMODE(cfg.stat().st_mode) == 0o700
    token_file = cfg / "tokens" / "work.json"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert pw.read_text().strip() not in prof.read_text() + token_file.read_text()
    assert _toml(prof)["default"] == "work"

    # ask with the profile, and with the default profile
    r = quanta("ask", "--profile", "work", SUMMARY, "--json", "--wait", "20", env=env)
    out = json.loads(r.stdout)
    assert out["states"] == {"success": 1} and out["responses"][0]["device"] == "dev1"
    iid = out["instruction_id"]
    r = quanta("ask", SUMMARY, "--format", "csv", "--wait", "20", env=env)
    assert r.stdout.splitlines()[0].startswith("Device,Status,")
    # a mistyped device: named, nothing asked, non-zero
    r = quanta("ask", SUMMARY, "--device", "nosuch", "--device", "dev1", "--json", check=False, env=env)
    assert r.returncode == 4 and "'nosuch'" in r.stderr and "dev1" not in r.stderr.replace("nosuch", "")
    # results, history, export
    res = json.loads(quanta("results", str(iid), "--json", env=env).stdout)
    assert res["responses"][0]["rows"][0]["OperatingSystemType"] == "Linux"
    rows = list(csv.DictReader(io.StringIO(quanta("results", str(iid), "--format", "csv", env=env).stdout)))
    assert rows[0]["Device"] == "dev1" and rows[0]["Status"] == "success"
    hist = json.loads(quanta("history", "--user", "quinn", "--limit", "5", "--json", env=env).stdout)
    assert iid in [h["id"] for h in hist] and {h["created_by"] for h in hist} == {"quinn"}
    assert json.loads(quanta("history", "--user", "nobody", "--json", env=env).stdout) == []
    exported = tmp_path / "out.csv"
    quanta("export", str(iid), "--format", "csv", "-o", str(exported), env=env)
    erows = list(csv.DictReader(io.StringIO(exported.read_text())))
    assert erows[0]["device"] == "dev1" and erows[0]["status"] == "success" and erows[0]["OperatingSystemType"] == "Linux"
    nd = [json.loads(x) for x in quanta("export", str(iid), "--format", "ndjson", env=env).stdout.splitlines()]
    assert nd[0]["device"] == "dev1"
    assert json.loads(quanta("export", str(iid), "--format", "json", env=env).stdout)[0]["device"] == "dev1"
    # the same export from the server's data directory (the administrator) is the same CSV
    assert quanta("export", str(server.root), str(iid), "--format", "csv").stdout == exported.read_text()
    # an instruction the user may not see / does not exist: one line, no file
    r = quanta("export", "999999", "-o", str(tmp_path / "none.csv"), check=False, env=env)
    _one_line_error(r, 2)
    assert not (tmp_path / "none.csv").exists()
    assert _one_line_error(quanta("results", "abc", check=False, env=env), 2)
    # the session ends (here: a token the server does not know): say so, do not prompt
    token_file.write_text(json.dumps(json.loads(token_file.read_text()) | {"token": "forged"}))
    r = quanta("devices", "--profile", "work", check=False, env=env)
    assert "session expired" in _one_line_error(r, 2) and "quanta login" in r.stderr
    # with a password file in the profile, the client logs in again by itself
    quanta("login", url, "--user", "quinn", "--ca", str(ca), "--password-file", str(pw), "--profile", "auto", env=env)
    tf = cfg / "tokens" / "auto.json"
    tf.write_text(json.dumps(json.loads(tf.read_text()) | {"token": "forged"}))
    devs = json.loads(quanta("devices", "--profile", "auto", "--json", env=env).stdout)
    assert [d["device_id"] for d in devs] == ["dev1"]
    # an action returns at once with its approval state (exit 5), and can be cancelled
    t0 = time.monotonic()
    r = quanta("ask", str(server.root), 'NativeServices.RunCommand(CommandLine: "true");', "--wait", "60", "--json",
               check=False)
    assert r.returncode == 5 and "awaiting approval by" in r.stderr, (r.returncode, r.stderr)
    assert time.monotonic() - t0 < 30
    pending = json.loads(r.stdout)
    assert pending["status"] == "pending_approval"
    quanta("cancel", str(server.root), str(pending["instruction_id"]))
    # tables: NULL prints empty, never "None"
    assert "None" not in quanta("devices", "--profile", "auto", env=env).stdout


def test_middle_cut_keeps_both_ends() -> None:
    from quanta.ask import middle_cut

    p = "/usr/lib/x86_64-linux-gnu/some/very/long/path/to/the/executable-name"
    cut = middle_cut(p, 30)
    assert len(cut) == 30 and cut.startswith("/usr/lib") and cut.endswith("executable-name"[-10:]) and "…" in cut
    assert middle_cut("short", 30) == "short"


def test_exit_code_of_each_outcome() -> None:
    from quanta.ask import (EXIT_AWAITING_APPROVAL, EXIT_DEVICE_ERRORS, EXIT_ERROR, EXIT_NOT_FINISHED,
                            EXIT_NOTHING_TARGETED, EXIT_OK, outcome)

    def st(status: str, targeted: int, **states: int) -> dict:
        return {"status": status, "targeted": targeted, "states": states}

    assert outcome(st("finished", 2, success=1, nocontent=1)) == EXIT_OK
    assert outcome(st("finished", 3, success=2, offline=1)) == EXIT_OK
    assert outcome(st("finished", 2, success=1, error=1)) == EXIT_DEVICE_ERRORS
    assert outcome(st("finished", 1, error=1)) == EXIT_DEVICE_ERRORS
    assert outcome(st("finished", 0)) == EXIT_NOTHING_TARGETED
    assert outcome(st("active", 2, success=1)) == EXIT_NOT_FINISHED
    assert outcome(st("pending_approval", 0)) == EXIT_AWAITING_APPROVAL
    assert len({EXIT_OK, EXIT_DEVICE_ERRORS, EXIT_NOTHING_TARGETED, EXIT_NOT_FINISHED, EXIT_AWAITING_APPROVAL}) == 5
    assert EXIT_NOT_FINISHED == 1 and EXIT_ERROR == 2  # the codes scripts knew before
    assert EXIT_ERROR not in {EXIT_OK, EXIT_DEVICE_ERRORS, EXIT_NOTHING_TARGETED, EXIT_NOT_FINISHED,
                              EXIT_AWAITING_APPROVAL}


@pytest.mark.parametrize("width", [40, 80, 200])
def test_tables_fit_the_terminal_and_keep_both_ends_of_long_cells(width: int) -> None:
    from rich.console import Console

    from quanta.ask import rich_table

    path = "/opt/vendor/" + "deep/" * 200 + "the-executable-name"
    cols = ["Device", "Status", "Agent.GetKeyFingerprint", "ExecutablePath", "Nothing", "Error"]
    buf = io.StringIO()
    Console(file=buf, width=width, force_terminal=False).print(
        rich_table(cols, [["dev1", "success", "ab" * 40, path, None, None]], width))
    text = buf.getvalue()
    assert max(len(x) for x in text.splitlines()) <= width
    body = [x.split("│") for x in text.splitlines() if x.startswith("│")]
    shown = "".join(parts[4].strip() for parts in body)  # the ExecutablePath column, wrapped over lines
    assert shown.startswith("/opt/vendor/") and shown.endswith("the-executable-name") and "…" in shown
    assert len(shown) < len(path)
    assert "None" not in text
