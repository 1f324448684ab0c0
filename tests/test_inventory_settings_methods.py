"""Inventory.GetSettings / Inventory.SetSetting: the Activity Record's settings read and changed by instructions."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from quanta.agent.config import read_conf
from quanta.agent.inventory import parse_settings
from quanta.scale import AgentContext, RunResult, compile_scale, run_program

BASE = "DeviceName=d1\nSwitch=127.0.0.1:4000\n# a comment that stays\nModule.Inventory.Enabled=true\n"


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    p = tmp_path / "agent.conf"
    p.write_text(BASE)
    p.chmod(0o644)
    return p


def run(conf: Path, text: str, actions: bool = False, params: dict | None = None) -> RunResult:
    ctx = AgentContext(data_dir=conf.parent / "state", config_path=conf)
    return run_program(compile_scale(text, params), context=ctx, allow_actions=actions)


def settings(conf: Path) -> dict[str, list]:
    r = run(conf, "Inventory.GetSettings();")
    assert r.status == "success", r.error
    return {row[0]: row[1:] for row in r.rows}


def test_get_settings_matches_the_agents_parser(conf) -> None:
    s = settings(conf)
    assert s["Module.Inventory.Enabled"][:3] == ["true", "false", True]
    assert s["Module.Inventory.Process.PollIntervalSeconds"][:3] == ["5", "5", False]
    assert "Module.Inventory.Process.Live.MaxAgeDays" in s
    assert not compile_scale("Inventory.GetSettings();").is_action


def test_set_setting_is_an_action_validated_atomic_and_0600(conf) -> None:
    call = 'Inventory.SetSetting(Name: "module.inventory.process.pollintervalseconds", Value: "2.5");'
    assert compile_scale(call).is_action
    r = run(conf, call)
    assert r.status == "error" and "not allowed" in str(r.error)
    r = run(conf, call, actions=True)
    # no agent runs here (no switch for this agent.conf): nothing applies it
    assert r.rows == [["Module.Inventory.Process.PollIntervalSeconds", "5", "2.5", False]], r.error
    assert stat.S_IMODE(os.stat(conf).st_mode) == 0o600
    text = conf.read_text()
    assert "# a comment that stays" in text and "Switch=127.0.0.1:4000" in text
    # the agent's own reader and parser see the change
    assert parse_settings(read_conf(conf)).source("Process").interval == 2.5
    assert settings(conf)["Module.Inventory.Process.PollIntervalSeconds"][0] == "2.5"
    # setting it again replaces the line
    r = run(conf, call, actions=True)
    assert r.rows == [["Module.Inventory.Process.PollIntervalSeconds", "2.5", "2.5", False]]
    assert conf.read_text().lower().count("pollintervalseconds") == 1
    assert not list(conf.parent.glob(".agent-conf-*"))


SOURCES_OFF = "".join(f"Module.Inventory.{n}.Enabled=false\n" for n in
                      ("Process", "TCP", "Software", "DevicePerformance", "ProcessUsage", "Logon", "Boot"))


def test_a_running_switch_applies_each_change_before_the_action_returns(conf) -> None:
    """The agent's switch (quanta.agent.activity, as runtime.Agent runs it) with real capture
    threads and store: every SetSetting is in force when the action returns, without a restart."""
    from quanta.agent.activity import ActivityRecord

    conf.write_text(BASE + SOURCES_OFF)
    switch = ActivityRecord(conf, conf.parent / "state", check_seconds=3600)  # only the action applies
    switch.start()
    try:
        inv = switch.inventory
        assert inv is not None and inv.captures == {}

        def set_(name: str, value: str) -> list:
            r = run(conf, "Inventory.SetSetting(Name: %n%, Value: %v%);", actions=True, params={"n": name, "v": value})
            assert r.status == "success", r.error
            return r.rows[0]

        assert set_("Module.Inventory.Software.Enabled", "true")[3] is True
        assert "Software" in inv.captures and inv.captures["Software"].polls.acquire(timeout=10)
        software = inv.captures["Software"]
        assert set_("Module.Inventory.Software.PollIntervalSeconds", "0.2")[3] is True
        assert inv.captures["Software"] is software  # the same capture, with its new interval
        assert software.settings.source("Software").interval == 0.2
        assert all(software.polls.acquire(timeout=5) for _ in range(3))  # polling at the new interval
        assert set_("Module.Inventory.Software.Live.MaxRows", "123")[3] is True
        assert inv.store.settings.source("Software").retention["Live"][1] == 123
        assert set_("Module.Inventory.MaxSizeMB", "7")[3] is True
        assert inv.store.settings.max_size_bytes == 7 * 1024 * 1024
        assert set_("Module.Inventory.Software.Enabled", "false")[3] is True
        assert "Software" not in inv.captures and not any(t.is_alive() for t in software._threads)
        rows = {r[0]: r for r in settings_rows_of(conf)}
        assert rows["Module.Inventory.Software.Enabled"][1] == "false" and rows["Module.Inventory.Software.Enabled"][4]
        assert all(r[4] for r in rows.values()), "every value of agent.conf is the one in force"
        # a hand edit the parser refuses changes nothing in force
        with open(conf, "a") as f:
            f.write("Module.Inventory.BatchRows=-5\n")
        switch.check()
        assert switch.inventory is inv and inv.settings.max_size_bytes == 7 * 1024 * 1024
        conf.write_text(BASE + SOURCES_OFF)
        # capture off entirely, then on again
        assert set_("Module.Inventory.Enabled", "false")[3] is True
        assert switch.inventory is None
        assert set_("Module.Inventory.Enabled", "true")[3] is True
        assert switch.inventory is not None and switch.inventory is not inv
    finally:
        switch.stop()


def settings_rows_of(conf: Path) -> list[list]:
    r = run(conf, "Inventory.GetSettings();")
    assert r.status == "success", r.error
    return r.rows


@pytest.mark.parametrize("name,value,msg", [
    ("Switch", "evil:1", "not a Module.Inventory setting"),
    ("Module.Inventory.Nope", "1", "not a Module.Inventory setting"),
    ("Module.Inventory.TCP.PollIntervalSeconds", "abc", "not a number"),
    ("Module.Inventory.TCP.PollIntervalSeconds", "1e9", "between"),
    ("Module.Inventory.TCP.PollIntervalSeconds", "nan", "between"),
    ("Module.Inventory.Enabled", "maybe", "true or false"),
    ("Module.Inventory.Process.Method", "ebpf", "one of"),
    ("Module.Inventory.Enabled", "true\nSwitch=evil:1", "printable"),
    ("Module.Inventory.Enabled", "a=b", "printable"),
    ("Module.Inventory.Enabled", "x" * 100, "printable"),
])
def test_refused_values_change_nothing(conf, name, value, msg) -> None:
    before = conf.read_bytes()
    r = run(conf, "Inventory.SetSetting(Name: %n%, Value: %v%);", actions=True, params={"n": name, "v": value})
    assert r.status == "error" and msg in str(r.error), r.error
    assert conf.read_bytes() == before


def test_broken_or_hostile_agent_conf(conf, tmp_path) -> None:
    conf.write_text(BASE + "Module.Inventory.BatchRows=-5\n")
    r = run(conf, 'Inventory.SetSetting(Name: "Module.Inventory.TCP.Enabled", Value: "false");', actions=True)
    assert r.status == "error" and "BatchRows" in str(r.error)
    assert "TCP.Enabled" not in conf.read_text()
    assert run(conf, "Inventory.GetSettings();").status == "error"
    conf.unlink()
    os.mkfifo(conf)  # never opened for reading: it would block
    r = run(conf, "Inventory.GetSettings();")
    assert r.status == "error" and "FIFO" in str(r.error)
    conf.unlink()
    conf.write_bytes(b"#" * (2 * 1024 * 1024))
    assert "larger" in str(run(conf, "Inventory.GetSettings();").error)
    conf.unlink()
    real = tmp_path / "real.conf"
    real.write_text(BASE)
    conf.symlink_to(real)
    r = run(conf, 'Inventory.SetSetting(Name: "Module.Inventory.TCP.Enabled", Value: "false");', actions=True)
    assert r.status == "error" and "not a regular file" in str(r.error)
    assert real.read_text() == BASE
    r = run_program(compile_scale("Inventory.GetSettings();"), context=AgentContext(data_dir=tmp_path))
    assert r.status == "error" and "no agent.conf" in str(r.error)
