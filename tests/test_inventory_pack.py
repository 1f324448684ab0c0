"""The product pack "Quanta Inventory": it builds, is signed, imports, and every definition compiles and
answers from an agent's Activity Record holding fixture rows (through the SCALE evaluator)."""

from __future__ import annotations

import time
import zipfile
from pathlib import Path

import pytest

from quanta.agent.inventory import Store, parse_settings
from quanta.db import make_engine, migrate
from quanta.definitions import DefinitionError, PackError, bind_parameters, build, import_pack, keygen, load_definition, trust
from quanta.definitions.builtin import pack_source
from quanta.scale import AgentContext, Limits, compile_scale, run_program

NOW = int(time.time())
HASH = "ab" * 32
NAMES = ["Quanta-Inventory-ConnectionsTo", "Quanta-Inventory-GetSettings", "Quanta-Inventory-ProcessHistory",
         "Quanta-Inventory-SetSetting", "Quanta-Inventory-SoftwareChanges", "Quanta-Inventory-TopCpuConsumers",
         "Quanta-Inventory-UserLogons"]


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("pack")
    key, pub = keygen(tmp / "keys", "Quanta")
    zpath = build(pack_source(), key, tmp / "quanta-inventory.zip")
    url = f"sqlite:///{tmp / 'm.db'}"
    migrate(url, "master")
    engine = make_engine(url)
    trust(engine, "Quanta", pub.read_bytes())
    pack = import_pack(engine, zpath.read_bytes())
    return engine, pack, zpath


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> AgentContext:
    """An agent directory whose store holds rows of every source the pack asks about."""
    root = tmp_path_factory.mktemp("agent")
    state = root / "state"
    state.mkdir()
    conf = root / "agent.conf"
    conf.write_text("DeviceName=d1\nSwitch=127.0.0.1:4000\nModule.Inventory.Enabled=true\n")
    s = Store(state / "inventory.db", parse_settings({"Module.Inventory.FlushIntervalSeconds": "0.05"}), time.time)
    s.start()
    for i, (name, h) in enumerate([("psexec", HASH), ("bash", "cd" * 32), ("psexec", HASH)]):
        s.put("Process_Live", {"TS": NOW - 3600 * (i + 1), "ProcessId": 100 + i, "ExecutableName": name,
                               "ExecutablePath": f"/usr/bin/{name}", "CommandLine": f"{name} -x", "UserName": "alice",
                               "ExecutableHash": h, "CaptureMethod": "netlink"})
    s.put("Process_Live", {"TS": NOW - 10 * 86400, "ProcessId": 9, "ExecutableName": "psexec", "ExecutableHash": HASH,
                           "UserName": "old", "CaptureMethod": "poll"})  # outside every period asked
    for ts, prod, op, ver, prev in [(NOW - 86400, "curl", "Upgrade", "8.1", "8.0"), (NOW - 2 * 86400, "telnet", "Install", "1.0", None),
                                    (NOW - 3 * 86400, "telnet", "Uninstall", "1.0", None), (NOW - 30 * 86400, "vim", "Install", "9", None),
                                    (NOW - 86400, "zlib", "Present", "1.3", None)]:
        s.put("Software_Live", {"TS": ts, "Product": prod, "Operation": op, "Version": ver, "PreviousVersion": prev,
                                "PackageManager": "dpkg", "Publisher": "Debian"})
    for ts, ip, port, exe in [(NOW - 600, "203.0.113.7", 443, "curl"), (NOW - 700, "203.0.113.7", 22, "ssh"),
                              (NOW - 800, "198.51.100.1", 443, "curl")]:
        s.put("TCP_Live", {"TS": ts, "LastSeenTs": ts + 30, "ProcessId": 5, "ExecutableName": exe, "IpAddress": ip,
                           "Port": port, "LocalAddress": "10.0.0.2", "LocalPort": 50000, "Direction": "Outbound",
                           "CaptureMethod": "poll"})
    for ts, user, op in [(NOW - 7200, "alice", "Logon"), (NOW - 3600, "alice", "Logoff"), (NOW - 1800, "bob", "Logon")]:
        s.put("Logon_Live", {"TS": ts, "UserName": user, "Operation": op, "Terminal": "pts/0", "RemoteHost": "192.0.2.9",
                             "ProcessId": 77})
    hour = NOW - NOW % 3600
    for ts, exe, cpu in [(hour - 3 * 3600 + 5, "make", 100.0), (hour - 3 * 3600 + 65, "make", 50.0),
                         (hour - 2 * 3600 + 5, "python", 80.0), (hour - 3 * 3600 + 5, "sshd", 1.0),
                         (NOW - 1, "rustc", 500.0)]:  # this hour: not aggregated yet, read from the live table
        s.put("ProcessUsage_Live", {"TS": ts, "ExecutableName": exe, "UserName": "alice", "ProcessorTimeSeconds": cpu,
                                    "PeakMemoryBytes": 1000, "ProcessCount": 1})
    s.flush()
    s.maintain(now=NOW)
    s.stop()
    return AgentContext(data_dir=state, config_path=conf, instruction_name="Quanta-Inventory-Test")


def ask(engine, agent: AgentContext, name: str, params: dict, actions: bool = False) -> list[dict]:
    d = load_definition(engine, name)
    values = bind_parameters(d, params)
    prog = compile_scale(d.payload, values)
    assert prog.is_action == (d.type == "action")
    r = run_program(prog, context=agent, limits=Limits(timeout_seconds=20), allow_actions=actions)
    assert r.status in ("success", "nocontent"), (name, r.error)
    declared = [c.name for c in d.schema_]
    if r.rows:
        assert list(r.columns) == declared, name
        assert d.aggregation is not None and set(d.aggregation.group_by) <= set(declared)
    return [dict(zip(r.columns, row)) for row in r.rows]


def test_pack_builds_signed_and_imports(imported) -> None:
    engine, pack, zpath = imported
    assert pack.info.name == "Quanta-Inventory" and pack.info.publisher == "Quanta"
    assert sorted(d.name for d in pack.definitions) == NAMES
    with zipfile.ZipFile(zpath) as z:
        assert {"MANIFEST.json", "MANIFEST.sig", "pack.toml"} <= set(z.namelist())
    for d in pack.definitions:
        assert d.instruction_set == "Inventory" and d.aggregation is not None
        assert 60 <= d.ttl.instruction_default <= 3600
        assert load_definition(engine, d.name).checksum() == d.checksum()
    kinds = {d.name: d.type for d in pack.definitions}
    assert kinds["Quanta-Inventory-SetSetting"] == "action"
    assert all(k == "question" for n, k in kinds.items() if n != "Quanta-Inventory-SetSetting")


def test_an_altered_or_untrusted_pack_is_refused(imported, tmp_path) -> None:
    engine, _, zpath = imported
    other_key, _ = keygen(tmp_path / "k", "Mallory")
    forged = build(pack_source(), other_key, tmp_path / "forged.zip")  # signed, but not by the trusted key
    with pytest.raises(PackError, match="signature does not verify"):
        import_pack(engine, forged.read_bytes())


def test_process_history_by_name_and_by_hash(imported, agent) -> None:
    engine = imported[0]
    rows = ask(engine, agent, "Quanta-Inventory-ProcessHistory", {"Name": "psexec"})
    assert [(r["ExecutableName"], r["Executions"], r["UserName"]) for r in rows] == [("psexec", 2, "alice")]
    rows = ask(engine, agent, "Quanta-Inventory-ProcessHistory", {"Hash": HASH.upper()})
    assert [r["ExecutableHash"] for r in rows] == [HASH]
    assert {r["ExecutableName"] for r in ask(engine, agent, "Quanta-Inventory-ProcessHistory", {})} == {"psexec", "bash"}
    assert ask(engine, agent, "Quanta-Inventory-ProcessHistory", {"Name": "psexec", "Days": 1})[0]["Executions"] == 2
    with pytest.raises(DefinitionError):
        bind_parameters(load_definition(engine, "Quanta-Inventory-ProcessHistory"), {"Hash": "xyz"})
    with pytest.raises(DefinitionError):
        bind_parameters(load_definition(engine, "Quanta-Inventory-ProcessHistory"), {"Days": 30})
    # a hostile name is a value, never SQL
    assert ask(engine, agent, "Quanta-Inventory-ProcessHistory", {"Name": "x' OR 1=1 --"}) == []


def test_software_changes_in_a_period(imported, agent) -> None:
    rows = ask(imported[0], agent, "Quanta-Inventory-SoftwareChanges", {"Days": 7})
    assert [(r["Product"], r["Operation"]) for r in rows] == [("curl", "Upgrade"), ("telnet", "Install"), ("telnet", "Uninstall")]
    assert rows[0]["PreviousVersion"] == "8.0"
    assert len(ask(imported[0], agent, "Quanta-Inventory-SoftwareChanges", {"Days": 60})) == 4
    assert [r["Product"] for r in ask(imported[0], agent, "Quanta-Inventory-SoftwareChanges", {"Product": "tel%"})] == ["telnet"] * 2


def test_connections_to_an_address(imported, agent) -> None:
    rows = ask(imported[0], agent, "Quanta-Inventory-ConnectionsTo", {"IpAddress": "203.0.113.7"})
    assert sorted((r["ExecutableName"], r["Port"]) for r in rows) == [("curl", 443), ("ssh", 22)]
    rows = ask(imported[0], agent, "Quanta-Inventory-ConnectionsTo", {"IpAddress": "203.0.113.7", "Port": 22})
    assert [r["ExecutableName"] for r in rows] == ["ssh"]
    with pytest.raises(DefinitionError):
        bind_parameters(load_definition(imported[0], "Quanta-Inventory-ConnectionsTo"), {"IpAddress": "1.2.3.4' --"})


def test_logons_of_a_user(imported, agent) -> None:
    rows = ask(imported[0], agent, "Quanta-Inventory-UserLogons", {"UserName": "alice"})
    assert [r["Operation"] for r in rows] == ["Logoff", "Logon"]
    assert ask(imported[0], agent, "Quanta-Inventory-UserLogons", {"UserName": "carol"}) == []


def test_top_cpu_consumers_from_hourly_and_this_hour(imported, agent) -> None:
    rows = ask(imported[0], agent, "Quanta-Inventory-TopCpuConsumers", {"Hours": 6, "Top": 3})
    assert [(r["ExecutableName"], r["ProcessorTimeSeconds"]) for r in rows] == [("rustc", 500.0), ("make", 150.0), ("python", 80.0)]


def test_settings_question_and_action(imported, agent) -> None:
    engine = imported[0]
    rows = {r["Name"]: r for r in ask(engine, agent, "Quanta-Inventory-GetSettings", {})}
    assert rows["Module.Inventory.Enabled"]["Value"] == "true"
    out = ask(engine, agent, "Quanta-Inventory-SetSetting",
              {"Name": "Module.Inventory.TCP.PollIntervalSeconds", "Value": "10"}, actions=True)
    assert out == [{"Name": "Module.Inventory.TCP.PollIntervalSeconds", "OldValue": "5", "NewValue": "10",
                    "Applied": False}]  # no agent runs this agent.conf here
    rows = {r["Name"]: r for r in ask(engine, agent, "Quanta-Inventory-GetSettings", {})}
    assert rows["Module.Inventory.TCP.PollIntervalSeconds"]["Value"] == "10"
    d = load_definition(engine, "Quanta-Inventory-SetSetting")
    for bad in ({"Name": "Switch", "Value": "x"}, {"Name": "Module.Inventory.Enabled", "Value": "true\nSwitch=evil"}):
        with pytest.raises(DefinitionError):
            bind_parameters(d, bad)


SAMPLE = {"Quanta-Inventory-ConnectionsTo": {"IpAddress": "203.0.113.7"},
          "Quanta-Inventory-UserLogons": {"UserName": "alice"},
          "Quanta-Inventory-SetSetting": {"Name": "Module.Inventory.TCP.PollIntervalSeconds", "Value": "10"}}


def test_every_definition_reads_only_declared_tables_and_columns(imported) -> None:
    """One declaration (quanta.scale.tables): each definition's SELECTs over the Activity Record,
    with its parameters bound, prepare against the declared tables, as `quanta scale check` checks
    them; a column renamed away from the declaration is caught."""
    from quanta.scale.errors import ScaleError
    from quanta.scale.tablecheck import check_activity_columns

    engine, pack, _ = imported
    checked = 0
    for d in pack.definitions:
        prog = compile_scale(d.payload, bind_parameters(load_definition(engine, d.name), SAMPLE.get(d.name, {})))
        check_activity_columns(prog)
        checked += "$" in d.payload
    assert checked == 5
    d = next(d for d in pack.definitions if d.name == "Quanta-Inventory-ProcessHistory")
    renamed = d.payload.replace("ExecutableHash", "FileHash")
    with pytest.raises(ScaleError, match="no such column: FileHash"):
        check_activity_columns(compile_scale(renamed, bind_parameters(load_definition(engine, d.name), {})))


def test_scale_check_checks_the_definitions_columns_with_parameters_unbound(tmp_path: Path) -> None:
    import subprocess
    import sys

    src = pack_source() / "definitions" / "process_history.toml"
    import tomllib

    payload = tomllib.loads(src.read_text())["payload"]
    for text, rc in ((payload, 0), (payload.replace("ExecutableHash", "FileHash"), 1)):
        f = tmp_path / "q.scale"
        f.write_text(text)
        r = subprocess.run([sys.executable, "-m", "quanta", "scale", "check", str(f)], capture_output=True, text=True)
        assert r.returncode == rc, r.stdout + r.stderr
    assert "no such column: FileHash" in r.stdout
