"""Every method against real system data and a fixture the test creates."""

from __future__ import annotations

import getpass
import grp
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from quanta.scale import AgentContext, Limits, RunResult, compile_scale, method_reference, read_tags, run_program
from quanta.scale.methods import operatingsystem, software


@pytest.fixture
def ctx(tmp_path: Path) -> AgentContext:
    return AgentContext(data_dir=tmp_path / "agent", config_path=tmp_path / "agent.toml", log_path=tmp_path / "agent.log",
                        executable="/opt/quanta/bin/quanta-agent", agent_version="9.8.7")


def run(ctx: AgentContext, text: str, params: dict | None = None, **kw) -> RunResult:
    r = run_program(compile_scale(text, params), context=ctx, **kw)
    return r


def rows_as_dicts(r: RunResult) -> list[dict]:
    return [dict(zip(r.columns, row)) for row in r.rows]


def test_every_method_declares_columns_and_types() -> None:
    specs = method_reference()
    names = {s.full_name for s in specs}
    required = {
        "Agent.GetSummary", "Agent.GetKeyFiles", "Device.GetSummary", "Device.GetDisks", "OperatingSystem.GetProcesses",
        "OperatingSystem.GetServices", "OperatingSystem.KillProcess", "Software.GetInstallations", "Network.GetConnections",
        "Network.GetInterfaces", "Users.GetLoggedOnUsers", "Users.GetLocalUsers", "Users.GetLocalGroupMembers",
        "FileSystem.GetFileByLine", "FileSystem.GetFile", "FileSystem.GetFileDetails", "FileSystem.GetFiles",
        "Utilities.SplitLines", "Tagging.Set", "Tagging.Get", "Tagging.GetAll", "Tagging.Clear",
        "NativeServices.RunCommand", "Scripting.RunText", "Interaction.ShowQuestion",
    }
    assert required <= names
    for s in specs:
        assert s.columns and s.platforms and s.description
    actions = {s.full_name for s in specs if s.is_action}
    assert {"OperatingSystem.KillProcess", "Tagging.Set", "Tagging.Clear", "NativeServices.RunCommand", "Scripting.RunText"} <= actions
    assert not actions & {"OperatingSystem.GetProcesses", "Tagging.Get", "FileSystem.GetFile"}


def test_declared_columns_match_output(ctx, tmp_path) -> None:
    f = tmp_path / "f.txt"
    f.write_text("x\n")
    for call in ["Agent.GetSummary()", "Device.GetSummary()", "OperatingSystem.GetProcesses()", f'FileSystem.GetFileDetails(FileName: "{f}")']:
        r = run(ctx, call + ";")
        spec = next(s for s in method_reference() if s.full_name == call.split("(")[0])
        assert r.columns == spec.column_names and r.rows and all(len(row) == len(r.columns) for row in r.rows)


def test_agent_methods_report_context(ctx) -> None:
    r = rows_as_dicts(run(ctx, "Agent.GetSummary();"))[0]
    assert r["AgentVersion"] == "9.8.7" and r["ProcessId"] == os.getpid() and r["DeviceName"] == socket.gethostname()
    k = rows_as_dicts(run(ctx, "Agent.GetKeyFiles();"))[0]
    assert k["Configuration"] == str(ctx.config_path) and k["Log"] == str(ctx.log_path)
    assert k["Executable"] == "/opt/quanta/bin/quanta-agent" and k["DataRootDirectory"] == str(ctx.data_dir)
    assert k["TemporaryDirectory"]


def test_device_summary_and_disks(ctx) -> None:
    d = rows_as_dicts(run(ctx, "Device.GetSummary();"))[0]
    assert d["OperatingSystemType"] == {"linux": "Linux", "darwin": "MacOS", "win32": "Windows"}[sys.platform]
    assert d["DeviceName"] == socket.gethostname()
    assert d["TotalMemoryBytes"] == psutil.virtual_memory().total and d["CpuLogicalProcessors"] == psutil.cpu_count()
    disks = rows_as_dicts(run(ctx, "Device.GetDisks();"))
    root = os.path.abspath(os.sep)
    mounted = {p.mountpoint for p in psutil.disk_partitions(all=False)}
    assert {x["MountPoint"] for x in disks} == mounted
    if root in mounted:
        row = next(x for x in disks if x["MountPoint"] == root)
        assert row["TotalBytes"] == psutil.disk_usage(root).total


def test_os_type_if_example(ctx) -> None:
    src = """@dev = Device.GetSummary();
@lin = SELECT 1 FROM @dev WHERE OperatingSystemType = "Linux";
IF (NOT @lin) NOTIMPLEMENTED "Linux only"; ENDIF;
SELECT OperatingSystemType FROM @dev;"""
    r = run(ctx, src)
    if sys.platform.startswith("linux"):
        assert r.rows == [["Linux"]]
    else:
        assert r.status == "notimplemented"


def test_get_processes_sees_a_started_process(ctx) -> None:
    marker = f"quanta-scale-marker-{os.getpid()}"
    child = subprocess.Popen([sys.executable, "-c", "import time,sys; time.sleep(60)", marker])
    try:
        r = run(ctx, """@p = OperatingSystem.GetProcesses();
SELECT ProcessId, ParentProcessId, Executable, CommandLine, UserName, StartTime FROM @p WHERE CommandLine LIKE %pat%;""",
                {"pat": f"%{marker}%"})
        rows = rows_as_dicts(r)
        assert len(rows) == 1
        row = rows[0]
        assert row["ProcessId"] == child.pid and row["ParentProcessId"] == os.getpid()
        assert os.path.realpath(row["Executable"]) == os.path.realpath(psutil.Process(child.pid).exe())
        assert marker in row["CommandLine"] and row["UserName"] == psutil.Process().username()
        assert row["StartTime"].endswith("Z") and row["StartTime"][:4].isdigit()
    finally:
        child.kill()
        child.wait()


def test_kill_process_foreach_documented_example(ctx) -> None:
    marker = f"quanta-kill-me-{os.getpid()}"
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", marker])
    try:
        src = """@procs = OperatingSystem.GetProcesses();
@targets = SELECT CAST(ProcessId AS TEXT) AS Pid FROM @procs WHERE CommandLine LIKE %pat%;
FOREACH @t IN @targets DO
  OperatingSystem.KillProcess(ProcessId: @t.Pid);
DONE;"""
        assert run(ctx, src, {"pat": f"%{marker}%"}).status == "error"  # action refused by default
        assert child.poll() is None
        r = run(ctx, src, {"pat": f"%{marker}%"}, allow_actions=True)
        assert (r.status, r.columns, r.rows) == ("success", ["ProcessId", "Killed"], [[child.pid, True]])
        child.wait(timeout=5)
        assert not psutil.pid_exists(child.pid)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_services_from_unit_files_fixture(ctx, tmp_path, monkeypatch) -> None:
    units = tmp_path / "units"
    (units / "multi-user.target.wants").mkdir(parents=True)
    (units / "quanta-test.service").write_text("[Unit]\nDescription=Quanta test unit\n[Service]\nExecStart=/bin/true\n")
    (units / "other.service").write_text("[Unit]\nDescription=Other\n")
    (units / "multi-user.target.wants" / "quanta-test.service").symlink_to(units / "quanta-test.service")
    monkeypatch.setattr(operatingsystem, "SYSTEMD_UNIT_DIRS", [units])
    monkeypatch.setattr(operatingsystem, "_services_systemctl", lambda env: None)
    rows = rows_as_dicts(run(ctx, "OperatingSystem.GetServices();"))
    by = {r["Name"]: r for r in rows}
    assert set(by) == {"quanta-test", "other"}
    assert by["quanta-test"]["DisplayName"] == "Quanta test unit" and by["quanta-test"]["StartMode"] == "enabled"
    assert by["other"]["StartMode"] == "disabled"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux service sources")
def test_services_real(ctx) -> None:
    r = run(ctx, "OperatingSystem.GetServices();")
    assert r.status in ("success", "nocontent")
    if Path("/lib/systemd/system").is_dir() and any(Path("/lib/systemd/system").glob("*.service")):
        assert r.rows


def test_software_from_dpkg_fixture(ctx, tmp_path, monkeypatch) -> None:
    status = tmp_path / "status"
    status.write_text(
        "Package: quanta-fixture\nStatus: install ok installed\nArchitecture: amd64\nMaintainer: Q Team <q@example.org>\n"
        "Version: 1.2.3-1\nDescription: test\n multi-line description\n\n"
        "Package: removed-pkg\nStatus: deinstall ok config-files\nVersion: 0.1\n\n"
    )
    monkeypatch.setattr(software, "DPKG_STATUS", status)
    monkeypatch.setattr(software, "APK_INSTALLED", tmp_path / "absent")
    monkeypatch.setattr(software, "_rpm", lambda env: [])
    r = run(ctx, 'SELECT Product, Version, Publisher, Architecture, Source FROM @s WHERE Product LIKE "quanta%";'.join(
        ["@s = Software.GetInstallations();\n", ""]))
    assert r.rows == [["quanta-fixture", "1.2.3-1", "Q Team <q@example.org>", "amd64", "dpkg"]]
    assert run(ctx, '@s = Software.GetInstallations(); SELECT * FROM @s WHERE Product = "removed-pkg";').status == "nocontent"


@pytest.mark.skipif(not Path("/var/lib/dpkg/status").exists(), reason="no dpkg database")
def test_software_real_dpkg(ctx) -> None:
    r = rows_as_dicts(run(ctx, "Software.GetInstallations();"))
    out = subprocess.run(["dpkg-query", "-W", "-f", "${Package}\\n"], capture_output=True, text=True).stdout.split()
    assert "dpkg" in {x["Product"] for x in r}
    assert len({x["Product"] for x in r if x["Source"] == "dpkg"}) >= len(set(out)) * 0.9


def test_network_connections_sees_listener(ctx) -> None:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    cli = socket.create_connection(("127.0.0.1", port))
    conn, _ = srv.accept()
    try:
        rows = rows_as_dicts(run(ctx, "@c = Network.GetConnections(); SELECT * FROM @c WHERE LocalPort = %p% OR RemotePort = %p%;", {"p": port}))
        # established connections only (both ends of this one); the listener is a listening endpoint
        assert len(rows) == 2 and all(r["RemoteAddress"] is not None for r in rows)
        listen = rows_as_dicts(run(ctx, "@c = Network.GetListeningEndpoints(); SELECT * FROM @c WHERE LocalPort = %p%;", {"p": port}))
        assert listen and listen[0]["LocalAddress"] == "127.0.0.1" and listen[0]["Protocol"] == "tcp"
        outgoing = [r for r in rows if r["RemotePort"] == port]
        assert outgoing and outgoing[0]["RemoteAddress"] == "127.0.0.1" and outgoing[0]["ProcessId"] in (os.getpid(), None)
    finally:
        for s in (conn, cli, srv):
            s.close()


def test_network_interfaces_has_loopback(ctx) -> None:
    rows = rows_as_dicts(run(ctx, "Network.GetInterfaces();"))
    assert {r["Name"] for r in rows} == set(psutil.net_if_addrs())
    assert any(r["IpAddress"] == "127.0.0.1" and r["Family"] == "IPv4" for r in rows)


def test_logged_on_users_match_utmp(ctx) -> None:
    r = run(ctx, "Users.GetLoggedOnUsers();")
    assert sorted(x[0] for x in r.rows) == sorted(u.name for u in psutil.users())
    assert r.columns[:2] == ["UserName", "Terminal"]


@pytest.mark.skipif(sys.platform.startswith("win"), reason="POSIX accounts")
def test_local_users_and_group_members(ctx) -> None:
    me = getpass.getuser()
    users = rows_as_dicts(run(ctx, "Users.GetLocalUsers();"))
    mine = [u for u in users if u["UserName"] == me]
    assert mine and mine[0]["UserId"] == os.getuid() and mine[0]["GroupId"] == os.getgid()
    group = grp.getgrgid(os.getgid()).gr_name
    members = rows_as_dicts(run(ctx, "Users.GetLocalGroupMembers(GroupName: %g%);", {"g": group}))
    assert any(m["UserName"] == me and m["IsPrimaryGroup"] for m in members)
    assert run(ctx, 'Users.GetLocalGroupMembers(GroupName: "no-such-group-quanta");').status == "nocontent"


def test_file_by_line_fixture(ctx, tmp_path) -> None:
    f = tmp_path / "lines.txt"
    f.write_bytes(b"first\r\nsecond\n\nfourth")
    r = run(ctx, "FileSystem.GetFileByLine(FileName: %f%);", {"f": str(f)})
    assert r.rows == [[1, "first"], [2, "second"], [3, ""], [4, "fourth"]]
    r2 = run(ctx, "FileSystem.GetFileByLine(FilePath: %f%);", {"f": str(f)})
    assert r2.rows == r.rows
    assert run(ctx, "FileSystem.GetFileByLine(FileName: %f%);", {"f": str(tmp_path / "missing")}).status == "nocontent"


def test_file_by_line_limit(ctx, tmp_path) -> None:
    f = tmp_path / "big.txt"
    f.write_text("".join(f"{i}\n" for i in range(50_010)))
    r = run(ctx, "@l = FileSystem.GetFileByLine(FileName: %f%); SELECT COUNT(*), MAX(LineNumber) FROM @l;", {"f": str(f)})
    assert r.rows == [[50_000, 50_000]]


def test_get_file_and_limit(ctx, tmp_path) -> None:
    f = tmp_path / "c.txt"
    f.write_text("héllo\nworld\n", encoding="utf-8")
    r = rows_as_dicts(run(ctx, "FileSystem.GetFile(FileName: %f%);", {"f": str(f)}))
    assert r == [{"FileName": str(f), "Size": len("héllo\nworld\n".encode()), "Content": "héllo\nworld\n"}]
    big = tmp_path / "big.bin"
    with open(big, "wb") as fh:
        fh.truncate(10 * 1024 * 1024 + 1)
    e = run(ctx, "FileSystem.GetFile(FileName: %f%);", {"f": str(big)})
    assert e.status == "error" and "exceeds the 10 MB limit" in e.error.message


def test_get_file_details_fixture(ctx, tmp_path) -> None:
    f = tmp_path / "d.bin"
    data = os.urandom(3000)
    f.write_bytes(data)
    os.utime(f, (1_600_000_000, 1_700_000_000))
    d = rows_as_dicts(run(ctx, "FileSystem.GetFileDetails(FileName: %f%);", {"f": str(f)}))[0]
    assert d["Sha256"] == hashlib.sha256(data).hexdigest() and d["Size"] == 3000
    assert d["LastModified"] == "2023-11-14T22:13:20Z" and d["LastAccessed"] == "2020-09-13T12:26:40Z"
    assert d["Owner"] == getpass.getuser() and d["IsDirectory"] is False and d["Name"] == "d.bin"


def test_get_files_depth_count_pattern(ctx, tmp_path) -> None:
    root = tmp_path / "tree"
    (root / "a" / "b").mkdir(parents=True)
    (root / "top.txt").write_text("1")
    (root / "a" / "mid.txt").write_text("22")
    (root / "a" / "b" / "deep.log").write_text("333")
    names = lambda r: sorted(x[0] for x in r.rows)  # noqa: E731
    assert names(run(ctx, "FileSystem.GetFiles(Folder: %d%);", {"d": str(root)})) == ["a", "top.txt"]
    assert names(run(ctx, "FileSystem.GetFiles(Folder: %d%, Depth: 2);", {"d": str(root)})) == ["a", "b", "deep.log", "mid.txt", "top.txt"]
    assert names(run(ctx, 'FileSystem.GetFiles(Folder: %d%, Depth: 5, Pattern: "*.txt");', {"d": str(root)})) == ["mid.txt", "top.txt"]
    assert len(run(ctx, "FileSystem.GetFiles(Folder: %d%, Depth: 5, MaxCount: 2);", {"d": str(root)}).rows) == 2
    r = run(ctx, "FileSystem.GetFiles(Folder: %d%, MaxCount: 0);", {"d": str(root)})
    assert r.status == "error" and "MaxCount must be between" in r.error.message
    r = rows_as_dicts(run(ctx, 'FileSystem.GetFiles(Folder: %d%, Depth: 1, Pattern: "mid.txt");', {"d": str(root)}))
    assert r[0]["Size"] == 2 and r[0]["Depth"] == 1 and r[0]["Directory"] == str(root / "a")


def test_split_lines(ctx) -> None:
    r = run(ctx, 'Utilities.SplitLines(Text: "a;;b;", Delimiter: ";", RemoveEmptyEntries: TRUE);')
    assert [x[1] for x in r.rows] == ["a", "b"]
    r = run(ctx, 'Utilities.SplitLines(Text: "a;;b", Delimiter: ";", RemoveEmptyEntries: false);')
    assert [x[1] for x in r.rows] == ["a", "", "b"]
    r = run(ctx, '@t = SELECT "x" || char(13) || char(10) || "y" AS t; Utilities.SplitLines(Text: @t.t);')
    assert [x[1] for x in r.rows] == ["x", "y"]


def test_tagging_roundtrip_and_hello(ctx) -> None:
    src = """Tagging.Set(Name: "Env", Value: "prod");
Tagging.Set(Name: "Site", Value: "Paris", Scopable: true);
Tagging.GetAll();"""
    r = run(ctx, src, allow_actions=True)
    assert r.rows == [["Env", "prod", False], ["Site", "Paris", True]]
    assert read_tags(ctx.data_dir) == {"Env": "prod", "Site": "Paris"}
    assert json.loads((ctx.data_dir / "tags.json").read_text())["Site"]["scopable"] is True
    assert run(ctx, 'Tagging.Get(Name: "Env");').rows == [["Env", "prod", False]]
    assert run(ctx, 'Tagging.Get(Name: "env");').status == "nocontent"
    assert run(ctx, "Tagging.GetAll(Scopable: true);").rows == [["Site", "Paris", True]]
    assert run(ctx, 'Tagging.Clear(Name: "Env");', allow_actions=True).rows == [["Env", True]]
    assert read_tags(ctx.data_dir) == {"Site": "Paris"}
    r = run(ctx, 'Tagging.Set(Name: "%n%", Value: "v");', {"n": "x" * 33}, allow_actions=True)
    assert r.status == "error" and "1 to 32 characters" in r.error.message
    r = run(ctx, 'Tagging.Set(Name: "Big", Value: %v%, Scopable: true);', {"v": "y" * 600}, allow_actions=True)
    assert r.status == "error" and "510" in r.error.message
    assert read_tags(ctx.data_dir / "nowhere") == {}


def test_run_command(ctx, tmp_path) -> None:
    r = run(ctx, 'NativeServices.RunCommand(CommandLine: "printf \'a\\\\nb  \\\\n\'", SplitLines: true);', allow_actions=True)
    assert (r.columns, r.rows) == (["ExitCode", "Output"], [[0, "a"], [0, "b"]])
    r = run(ctx, 'NativeServices.RunCommand(CommandLine: "pwd", WorkingDirectory: %d%);', {"d": str(tmp_path)}, allow_actions=True)
    assert r.rows == [[0, str(tmp_path)]]
    r = run(ctx, 'NativeServices.RunCommand(CommandLine: "false");', allow_actions=True)
    assert r.status == "error" and "Command exited with code 1" in r.error.message
    r = run(ctx, 'NativeServices.RunCommand(CommandLine: "false", IgnoreExitCode: true);', allow_actions=True)
    assert r.rows == [[1, ""]]
    r = run(ctx, 'NativeServices.RunCommand(CommandLine: %c%, InterpretAsJson: true);',
            {"c": sys.executable + ' -c "import json; print(json.dumps([{\'a\': 1, \'b\': \'x\'}, {\'a\': 2}]))"'}, allow_actions=True)
    assert (r.columns, r.rows) == (["a", "b"], [[1, "x"], [2, None]])
    t0 = time.monotonic()
    r = run(ctx, 'NativeServices.RunCommand(CommandLine: "sleep 20", TimeoutSecs: 1, TimeoutKill: true);', allow_actions=True)
    assert r.status == "error" and "timed out after 1 seconds and was killed" in r.error.message
    assert time.monotonic() - t0 < 10
    r = run(ctx, 'NativeServices.RunCommand(CommandLine: "true", TimeoutSecs: -1);', allow_actions=True)
    assert r.status == "error" and "negative" in r.error.message
    r = run(ctx, 'NativeServices.RunCommand(CommandLine: "/no/such/binary");', allow_actions=True)
    assert r.status == "error" and "Command not found" in r.error.message


def test_run_text_bash(ctx, tmp_path) -> None:
    out = tmp_path / "made-by-script"
    r = run(ctx, 'Scripting.RunText(Language: "Bash", Text: %t%);', {"t": f"echo hi\ntouch '{out}'\necho err >&2\nexit 0\n"}, allow_actions=True)
    assert r.rows == [[0, "hi\nerr"]] and out.exists()
    r = run(ctx, 'Scripting.RunText(Language: "bash", Text: "exit 3");', allow_actions=True)
    assert r.status == "error" and "code 3" in r.error.message
    r = run(ctx, 'Scripting.RunText(Language: "cobol", Text: "x");', allow_actions=True)
    assert r.status == "error" and "Unsupported Language" in r.error.message


def test_interaction_needs_interactive_session(ctx) -> None:
    r = run(ctx, 'Interaction.ShowQuestion(Description: "Reboot?");', allow_actions=True)
    assert r.status == "error"
    assert r.error.message == "not supported: no interactive user session (in call to Interaction.ShowQuestion)"


def test_builtin_table(ctx) -> None:
    r = run(ctx, "SELECT Product, CAST(ProcessorTimePercent AS REAL) AS Cpu FROM $SoftwarePerformance_Live WHERE ProcessCount > 0;")
    names = {x[0] for x in r.rows}
    assert psutil.Process().name() in names
