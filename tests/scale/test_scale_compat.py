"""The model's documented methods and shapes (issue 13, "SCALE compatibility"), against fixtures made here."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from quanta.scale import AgentContext, RunResult, ScaleError, compile_scale, run_program
from quanta.scale.methods import operatingsystem

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux fixtures")


@pytest.fixture
def ctx(tmp_path: Path) -> AgentContext:
    return AgentContext(data_dir=tmp_path / "agent")


def run(ctx: AgentContext, text: str, actions: bool = False) -> RunResult:
    return run_program(compile_scale(text), context=ctx, allow_actions=actions)


def dicts(r: RunResult) -> list[dict]:
    assert r.status in ("success", "nocontent"), r.error
    return [dict(zip(r.columns, row)) for row in r.rows]


# -- "Not implemented - ..." ---------------------------------------------------------------------
def test_unknown_module_and_method_say_not_implemented_at_their_position() -> None:
    with pytest.raises(ScaleError) as e:
        compile_scale("@x = Nope.GetThing();")
    assert (e.value.message, e.value.line, e.value.column) == ("Not implemented - Unsupported module 'Nope'", 1, 6)
    with pytest.raises(ScaleError) as e:
        compile_scale("\n  Device.GetFrobs();")
    assert e.value.message.startswith("Not implemented - Unsupported method 'GetFrobs'")
    assert (e.value.line, e.value.column) == (2, 10)


# -- Tagging ---------------------------------------------------------------------------------------
def test_tagging_check_count_delete_clear(ctx) -> None:
    assert dicts(run(ctx, 'Tagging.Check(Name: "Role");')) == [{"Name": "Role", "Value": "", "Exists": False}]
    assert dicts(run(ctx, "Tagging.Count();")) == [{"Count": 0}]
    for name, value, scop in (("Role", "Web", "false"), ("Site", "Lon", "true"), ("Env", "Prod", "false"), ("Rack", "7", "true")):
        run(ctx, f'Tagging.Set(Name: "{name}", Value: "{value}", Scopable: {scop});', actions=True)
    assert dicts(run(ctx, 'Tagging.Check(Name: "Role");'))[0]["Exists"] is True
    assert dicts(run(ctx, 'Tagging.Check(Name: "Role", Value: "web");'))[0]["Exists"] is True
    assert dicts(run(ctx, 'Tagging.Check(Name: "Role", Value: "db");')) == [{"Name": "Role", "Value": "Web", "Exists": False}]
    assert dicts(run(ctx, "Tagging.Count();")) == [{"Count": 4}]
    assert dicts(run(ctx, "Tagging.Count(Scopable: true);")) == [{"Count": 2}]
    # Delete is an action, like Clear
    assert compile_scale('Tagging.Delete(Name: "Env");').is_action
    assert run(ctx, 'Tagging.Delete(Name: "Env");').status == "error"
    assert dicts(run(ctx, 'Tagging.Delete(Name: "Env");', True)) == [{"Name": "Env", "Deleted": True}]
    assert dicts(run(ctx, 'Tagging.Delete(Name: "Env");', True)) == [{"Name": "Env", "Deleted": False}]
    # Clear without a Name: every tag of one kind, and only that kind
    assert dicts(run(ctx, "Tagging.Clear(Scopable: true);", True)) == [{"Name": "Rack", "Cleared": True}, {"Name": "Site", "Cleared": True}]
    assert [t["Name"] for t in dicts(run(ctx, "Tagging.GetAll();"))] == ["Role"]
    assert dicts(run(ctx, "Tagging.Clear();", True)) == [{"Name": "Role", "Cleared": True}]
    assert dicts(run(ctx, "Tagging.Count();")) == [{"Count": 0}]
    assert compile_scale("Tagging.Clear();").is_action


def test_tagging_hostile_names_and_types(ctx) -> None:
    with pytest.raises(ScaleError, match="expects string"):
        compile_scale("Tagging.Delete(Name: 5);")
    with pytest.raises(ScaleError, match="expects boolean"):
        compile_scale('Tagging.Count(Scopable: "x");')
    r = run(ctx, 'Tagging.Delete(Name: "a=b");', True)
    assert r.status == "error" and "must not contain" in str(r.error)
    r = run(ctx, f'Tagging.Delete(Name: "{"x" * 40}");', True)
    assert r.status == "error"


# -- Agent -----------------------------------------------------------------------------------------
def test_key_files_are_empty_strings_not_null(tmp_path) -> None:
    r = run(AgentContext(data_dir=tmp_path), "Agent.GetKeyFiles();")
    row = dicts(r)[0]
    assert row["Configuration"] == "" and row["Log"] == ""
    assert all(v is not None for v in row.values())


def test_connection_information_finds_the_agents_connection_to_its_switch(tmp_path) -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    conf = tmp_path / "agent.conf"
    conf.write_text(f"DeviceName=d1\nSwitch=127.0.0.1:{port},sw2.example:4000\n")
    ctx = AgentContext(data_dir=tmp_path, config_path=conf)
    row = dicts(run(ctx, "Agent.GetConnectionInformation();"))[0]
    assert row["Connected"] is False and row["ConfiguredSwitches"] == f"127.0.0.1:{port},sw2.example:4000"
    assert row["ClientCertThumbprint"] is None  # no device.crt yet
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    import datetime as dt

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "d1")])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(1).not_valid_before(dt.datetime(2026, 1, 1)).not_valid_after(dt.datetime(2027, 1, 1))
            .sign(key, hashes.SHA256()))
    (tmp_path / "device.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    cli = socket.create_connection(("127.0.0.1", port))
    peer, _ = srv.accept()
    try:
        r = run(ctx, "Agent.GetConnectionInformation();")
        assert r.columns[:15] == ["Slot", "SwitchConnectionTime", "SwitchId", "SwitchName", "Worker", "BGCCertThumbprint",
                                  "BGCConnected", "BGCConnectionTime", "ClientCertThumbprint", "LocalIpAddress", "LocalPort",
                                  "RemoteIpAddress", "RemotePort", "SwitchCertThumbprint", "SwitchClockSkewSeconds"]
        row = dicts(r)[0]
        assert row["Connected"] is True and row["SwitchName"] == f"127.0.0.1:{port}"
        assert row["LocalPort"] == str(cli.getsockname()[1]) and row["RemotePort"] == str(port)
        assert row["ClientCertThumbprint"] == cert.fingerprint(hashes.SHA1()).hex().upper()
    finally:
        cli.close(); peer.close(); srv.close()
    # a broken or hostile agent.conf: no switches, no error
    conf.write_text("Switch=::::\n")
    assert dicts(run(ctx, "Agent.GetConnectionInformation();"))[0]["ConfiguredSwitches"] == ""
    conf.unlink()
    os.mkfifo(conf)
    assert dicts(run(ctx, "Agent.GetConnectionInformation();"))[0]["ConfiguredSwitches"] == ""


# -- Device ----------------------------------------------------------------------------------------
def test_processors_add_up_to_the_logical_count(ctx) -> None:
    rows = dicts(run(ctx, "Device.GetProcessors();"))
    assert rows and rows[0]["DeviceId"] == "CPU0"
    assert sum(r["NumberOfLogicalProcessors"] for r in rows) == psutil.cpu_count(logical=True)
    assert all(r["NumberOfCores"] >= 1 and r["Name"] is not None for r in rows)


# -- Network ---------------------------------------------------------------------------------------
def test_connections_are_established_tcp_with_the_documented_columns(ctx) -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    cli = socket.create_connection(("127.0.0.1", port))
    peer, _ = srv.accept()
    try:
        r = run(ctx, "Network.GetConnections();")
        assert r.columns == ["Class", "LatencyMs", "LocalAddress", "LocalPort", "PacketLossPercent", "ProcessId",
                             "ProcessName", "RemoteAddress", "RemotePort"]
        rows = dicts(r)
        mine = [x for x in rows if x["RemotePort"] == port and x["LocalPort"] == cli.getsockname()[1]]
        assert mine and mine[0]["ProcessId"] == os.getpid() and mine[0]["RemoteAddress"] == "127.0.0.1"
        assert mine[0]["Class"] == "IPv4" and mine[0]["ProcessName"] == psutil.Process().name()
        assert all(x["RemoteAddress"] and x["RemotePort"] for x in rows)  # established only: no listener, no UDP
        assert not [x for x in rows if x["LocalPort"] == udp.getsockname()[1] and x["ProcessId"] == os.getpid()]
        # the listener and the UDP socket are endpoints, the established connection is not
        eps = dicts(run(ctx, "Network.GetListeningEndpoints();"))
        got = {(e["Protocol"], e["LocalPort"]) for e in eps if e["ProcessId"] == os.getpid()}
        assert ("tcp", port) in got and ("udp", udp.getsockname()[1]) in got
        assert ("tcp", cli.getsockname()[1]) not in got
    finally:
        cli.close(); peer.close(); srv.close(); udp.close()


# -- OperatingSystem -------------------------------------------------------------------------------
def test_processes_have_account_name(ctx) -> None:
    rows = dicts(run(ctx, "OperatingSystem.GetProcesses();"))
    me = [r for r in rows if r["ProcessId"] == os.getpid()][0]
    assert me["AccountName"] == psutil.Process().username()


@linux
def test_service_info_from_unit_files_with_hostile_entries(ctx, tmp_path, monkeypatch) -> None:
    d = tmp_path / "system"
    (d / "multi-user.target.wants").mkdir(parents=True)
    (d / "web.service").write_text("[Unit]\nDescription=Web server\n[Service]\nExecStart=/usr/bin/web --port 80\nUser=www\n")
    (d / "multi-user.target.wants" / "web.service").symlink_to(d / "web.service")
    (d / "gone.service").symlink_to("/dev/null")
    os.mkfifo(d / "fifo.service")  # never opened for reading (would block)
    (d / "loop.service").symlink_to(d / "loop.service")
    (d / "huge.service").write_bytes(b"[Service]\nExecStart=/bin/huge\n" + b"#" * (5 * 1024 * 1024))
    monkeypatch.setattr(operatingsystem, "SYSTEMD_UNIT_DIRS", [d])
    monkeypatch.setattr(operatingsystem, "_service_info_systemctl", lambda env, name: None)  # no systemd in the test
    rows = {r["Name"]: r for r in dicts(run(ctx, "OperatingSystem.GetServiceInfo();"))}
    assert rows["web"]["DisplayName"] == "Web server" and rows["web"]["StartMode"] == "enabled"
    assert rows["web"]["ExecutablePath"] == "/usr/bin/web" and rows["web"]["UserName"] == "www"
    assert rows["gone"]["StartMode"] == "masked" and rows["gone"]["ExecutablePath"] == ""
    assert rows["fifo"]["ExecutablePath"] == "" and rows["loop"]["ExecutablePath"] == ""
    assert rows["huge"]["ExecutablePath"] == ""  # over the 256 KB unit-file cap: not read
    one = dicts(run(ctx, 'OperatingSystem.GetServiceInfo(Name: "web.service");'))
    assert [r["Name"] for r in one] == ["web"]
    assert dicts(run(ctx, 'OperatingSystem.GetServiceInfo(Name: "nothere");')) == []
    for bad in ("--all", "a b", "x;rm -rf /", "a" * 300, "../../etc/passwd", "a/b"):
        r = run(ctx, f'OperatingSystem.GetServiceInfo(Name: "{bad}");')
        assert r.status == "error" and "service name" in str(r.error), bad


def test_service_info_output_cap_and_exec_parsing(ctx) -> None:
    from quanta.scale.spec import MethodEnv
    from quanta.scale import Limits
    import time

    env = MethodEnv(ctx, Limits(), time.monotonic() + 10)
    assert operatingsystem._run_bounded([sys.executable, "-c", "print('x' * 5000)"], env, max_bytes=1000) is None
    assert operatingsystem._run_bounded([sys.executable, "-c", "print('ok')"], env) == "ok\n"
    assert operatingsystem._run_bounded([sys.executable, "-c", "import sys; sys.exit(3)"], env) is None
    assert operatingsystem._exec_path("{ path=/usr/sbin/sshd ; argv[]=/usr/sbin/sshd -D ; }") == "/usr/sbin/sshd"
    assert operatingsystem._exec_path("-/usr/bin/x --y") == "/usr/bin/x"


# -- FileSystem.GetFilesInDirectory ----------------------------------------------------------------
def names(r: RunResult) -> list[str]:
    return [row["FileName"] for row in dicts(r)]


def test_files_in_directory_lists_regular_files_only(ctx, tmp_path) -> None:
    d = tmp_path / "d"
    (d / "sub" / "deeper").mkdir(parents=True)
    (d / "skip").mkdir()
    (d / "a.txt").write_text("aa")
    (d / "b.log").write_text("b")
    (d / "sub" / "c.txt").write_text("ccc")
    (d / "sub" / "deeper" / "e.txt").write_text("e")
    (d / "skip" / "s.txt").write_text("s")
    os.mkfifo(d / "pipe.txt")
    (d / "link.txt").symlink_to(d / "a.txt")
    (d / "sub" / "loop").symlink_to(d)  # a loop, never followed
    r = run(ctx, f'FileSystem.GetFilesInDirectory(Directory: "{d}", Recursive: false);')
    assert r.columns == ["FileName", "FileSize", "DateCreated", "DateModified"]
    assert [(x["FileName"], x["FileSize"]) for x in dicts(r)] == [(str(d / "a.txt"), 2), (str(d / "b.log"), 1)]
    # recursive by default, as the model
    assert names(run(ctx, f'FileSystem.GetFilesInDirectory(Directory: "{d}", Pattern: "*.txt");')) == [
        str(d / "a.txt"), str(d / "skip" / "s.txt"), str(d / "sub" / "c.txt"), str(d / "sub" / "deeper" / "e.txt")]
    # Exclude: a table of directories relative to Directory
    r = run(ctx, f'@x = SELECT "skip" AS Path UNION ALL SELECT "sub/deeper"; '
                 f'FileSystem.GetFilesInDirectory(Directory: "{d}", Pattern: "*.txt", Exclude: @x);')
    assert names(r) == [str(d / "a.txt"), str(d / "sub" / "c.txt")]
    # ".." is normalised
    assert names(run(ctx, f'FileSystem.GetFilesInDirectory(Directory: "{d}/sub/../sub", Recursive: false);')) == [
        str(d / "sub" / "c.txt")]
    # a file or a missing directory is an error, as the model; the old name Folder still works
    for bad, msg in ((d / "a.txt", "not a directory"), (d / "nope", "does not exist")):
        r = run(ctx, f'FileSystem.GetFilesInDirectory(Directory: "{bad}");')
        assert r.status == "error" and msg in str(r.error)
    assert len(run(ctx, f'FileSystem.GetFilesInDirectory(Folder: "{d}", Recursive: false);').rows) == 2


def test_files_in_directory_hostile_arguments(ctx, tmp_path) -> None:
    big = tmp_path / "big"
    big.mkdir()
    for i in range(9000):
        (big / f"f{i:05}").touch()
    assert len(run(ctx, f'FileSystem.GetFilesInDirectory(Directory: "{big}");').rows) == 8192  # the default Limit
    r = run(ctx, f'FileSystem.GetFilesInDirectory(Directory: "{big}", Limit: 50);')
    assert len(r.rows) == 50 and r.rows[0][0] == str(big / "f00000")
    assert len(run(ctx, f'FileSystem.GetFilesInDirectory(Directory: "{big}", Limit: 0);').rows) == 9000
    from quanta.scale import Limits
    r = run_program(compile_scale(f'FileSystem.GetFilesInDirectory(Directory: "{big}", Limit: 0);'), context=ctx,
                    limits=Limits(max_rows=100))
    assert r.status == "error" and "row limit" in str(r.error)
    for call, msg in (
        ('Directory: "relative/dir"', "absolute"),
        (f'Directory: "{big}", Limit: -1', "Limit"),
        (f'Directory: "{big}", Pattern: "{"*" * 300}"', "Pattern"),
    ):
        r = run(ctx, f"FileSystem.GetFilesInDirectory({call});")
        assert r.status == "error" and msg in str(r.error), call
    # a glob built to backtrack stays fast
    (big / ("a" * 200)).touch()
    r = run_program(compile_scale(f'FileSystem.GetFilesInDirectory(Directory: "{big}", Pattern: "{"*a" * 60}*b");'),
                    context=ctx, limits=Limits(timeout_seconds=5))
    assert r.status == "nocontent", r.error
    # hostile Exclude rows (not text, NUL, outside the directory) are ignored
    r = run(ctx, f"@x = SELECT 5 AS P UNION ALL SELECT '../..' UNION ALL SELECT NULL; "
                 f'FileSystem.GetFilesInDirectory(Directory: "{big}", Exclude: @x, Limit: 3);')
    assert len(r.rows) == 3
    with pytest.raises(ScaleError, match="expects boolean"):
        compile_scale(f'FileSystem.GetFilesInDirectory(Directory: "{big}", Recursive: "yes please");')
    with pytest.raises(ScaleError, match="expects string"):
        compile_scale("FileSystem.GetFilesInDirectory(Directory: 42);")
    with pytest.raises(ScaleError, match="expects a table"):
        compile_scale(f'FileSystem.GetFilesInDirectory(Directory: "{big}", Exclude: "sub");')
    with pytest.raises(ScaleError, match="Missing parameter"):
        compile_scale("FileSystem.GetFilesInDirectory();")


def test_files_in_directory_nul_in_directory(ctx, tmp_path) -> None:
    # the compiler refuses a NUL in an instruction parameter; one can still come from a table's column
    with pytest.raises(ScaleError, match="NUL"):
        compile_scale("FileSystem.GetFilesInDirectory(Directory: %dir%);", {"dir": f"{tmp_path}\x00/etc"})
    r = run(ctx, f"@t = SELECT '{tmp_path}' || char(0) || '/etc' AS P; FileSystem.GetFilesInDirectory(Directory: @t.P);")
    assert r.status == "error" and "NUL" in str(r.error)


SHOW = """Id=ssh.service
LoadState=loaded
Description=OpenBSD Secure Shell server
ActiveState=active
SubState=running
UnitFileState=enabled
MainPID=812
ExecStart={ path=/usr/sbin/sshd ; argv[]=/usr/sbin/sshd -D $SSHD_OPTS ; ignore_errors=no ; start_time=[n/a] ; }
User=
FragmentPath=/lib/systemd/system/ssh.service

Id=gone.service
LoadState=not-found
ActiveState=inactive
SubState=dead
MainPID=0

Id=sockets.target
Description=Sockets

Id=weird.service
MainPID=99999999999999999999
Description=x=y
ActiveState=failed
SubState=failed
"""


def test_systemctl_show_output_parsed(ctx) -> None:
    import time

    from quanta.scale import Limits
    from quanta.scale.spec import MethodEnv

    env = MethodEnv(ctx, Limits(), time.monotonic() + 10)
    rows = operatingsystem.parse_systemctl_show(SHOW, env)
    by = {r[0]: r for r in rows}
    assert set(by) == {"ssh", "gone", "weird"}
    assert by["ssh"][:8] == ["ssh", "OpenBSD Secure Shell server", "running", "running", "enabled", 812, "/usr/sbin/sshd", ""]
    assert by["weird"][1] == "x=y" and by["weird"][2] == "failed" and by["weird"][5] is None
    assert "gone" not in {r[0] for r in operatingsystem.parse_systemctl_show(SHOW, env, only_loaded=True)}
