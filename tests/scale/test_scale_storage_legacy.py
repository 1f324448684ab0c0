"""Storage.* tables an earlier agent stored under an instruction name's prefix ("Acme-Tools") rather
than a signed owner: on the first open by this version they move to ``legacy:<old owner>``, where no
instruction reaches them (not the pack whose name matches, not an owner crafted to equal the old
one or the legacy name), and the device's operator lists, adopts or drops them with
``quanta agent-storage``. The old store is made as the earlier agent made it: its schema, its rows,
no ``storage_meta``."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from quanta.scale import AgentContext, RunResult, compile_scale, run_program
from quanta.scale.methods import storage

ACME = "pack:Acme-Tools@" + "2" * 32
MALLORY = "pack:Acme-Tools@" + "6" * 32  # the same pack name, another publisher's key
OLD_SCHEMA = """CREATE TABLE storage_tables (
    owner TEXT NOT NULL, key TEXT NOT NULL, name TEXT NOT NULL, columns TEXT NOT NULL, rows TEXT NOT NULL,
    nrows INTEGER NOT NULL, bytes INTEGER NOT NULL, updated INTEGER NOT NULL, PRIMARY KEY (owner, key));"""


def old_store(state: Path, rows: list[tuple[str, str, list[list[object]]]]) -> None:
    state.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(state / "storage.db")
    conn.executescript(OLD_SCHEMA)
    for owner, name, data in rows:
        cols, text = json.dumps(["V"]), json.dumps(data)
        conn.execute("INSERT INTO storage_tables VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                     (owner, name.lower(), name, cols, text, len(data), len(cols) + len(text), 1_700_000_000))
    conn.commit()
    conn.close()
    (state / "storage.db").chmod(0o600)


def run(state: Path, owner: str | None, text: str) -> RunResult:
    return run_program(compile_scale(text), context=AgentContext(data_dir=state, storage_owner=owner), allow_actions=True)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    s = tmp_path / "agent" / "state"
    old_store(s, [("Acme-Tools", "Seen", [["old-acme"]]), ("Acme-Tools", "Other", [["x"]]),
                  ("adhoc", "Seen", [["old-adhoc"]]), ("local", "Scratch", [["mine"]]),
                  ("Lonely", "Seen", [["lonely"]]),
                  # a row of the version that signed owners but kept no storage_meta: left where it is
                  (ACME, "Seen", [["signed"]])])
    (tmp_path / "agent" / "agent.conf").write_text("DeviceName=d1\n")
    return s


def test_old_owners_move_aside_and_no_instruction_reaches_them(state: Path) -> None:
    assert run(state, ACME, 'Storage.Get(Name: "Seen");').rows == [["signed"]]  # the first open migrates
    assert run(state, ACME, 'Storage.Get(Name: "Other");').rows == []  # not handed over by its name
    assert run(state, MALLORY, 'Storage.Get(Name: "Other");').rows == []
    # an owner crafted to equal the old one, or the legacy name space, reaches nothing
    assert run(state, "Acme-Tools", 'Storage.Get(Name: "Other");').rows == []
    for crafted in ("legacy:Acme-Tools", "LEGACY:Acme-Tools", "Legacy:adhoc"):
        r = run(state, crafted, 'Storage.Get(Name: "Other");')
        assert r.status == "error" and "cannot own storage" in str(r.error), r
    # "adhoc" was an instruction named adhoc-... to the old agent: not given to today's adhoc
    assert run(state, "adhoc", 'Storage.Get(Name: "Seen");').rows == []
    assert run(state, None, 'Storage.Get(Name: "Scratch");').rows == [["mine"]]  # local meant and means local
    assert storage.owners(state) == [
        ("legacy:Acme-Tools", 2, 2, storage.owners(state)[0][3]),
        ("legacy:Lonely", 1, 1, storage.owners(state)[1][3]),
        ("legacy:adhoc", 1, 1, storage.owners(state)[2][3]),
        ("local", 1, 1, storage.owners(state)[3][3]),
        (ACME, 1, 1, storage.owners(state)[4][3]),
    ]
    # the migration ran once: rows an owner "adhoc" writes now (an older server) stay its own
    assert run(state, "adhoc", '@t = SELECT "now" AS V; Storage.Set(Name: "Seen", Value: @t);').status == "success"
    storage._CONNS.clear()  # a new agent process opens the store again
    assert run(state, "adhoc", 'Storage.Get(Name: "Seen");').rows == [["now"]]


def test_the_operator_adopts_or_drops_them(state: Path) -> None:
    run(state, ACME, 'Storage.Check(Name: "Seen");')
    moved, left = storage.adopt_legacy(state, "Acme-Tools", ACME)
    assert (moved, left) == (1, ["seen"])  # ACME has a Seen of its own: that one stays legacy
    assert run(state, ACME, 'Storage.Get(Name: "Other");').rows == [["x"]]
    assert run(state, ACME, 'Storage.Get(Name: "Seen");').rows == [["signed"]]
    assert run(state, MALLORY, 'Storage.Get(Name: "Other");').rows == []
    assert storage.drop_legacy(state, "legacy:Acme-Tools") == 1
    assert storage.drop_legacy(state, "Lonely") == 1
    assert [o for o, *_ in storage.owners(state)] == ["legacy:adhoc", "local", ACME]
    # hostile or careless requests change nothing
    for old, new in [("pack:Acme-Tools@" + "2" * 32, ACME), ("adhoc", "legacy:x"), ("adhoc", "a'; DROP TABLE x; --"),
                     ("x' OR '1'='1", ACME), ("nobody", ACME), ("adhoc", "")]:
        with pytest.raises(storage.StorageAdminError):
            storage.adopt_legacy(state, old, new)
    with pytest.raises(storage.StorageAdminError):
        storage.drop_legacy(state, "pack:Acme-Tools@" + "2" * 32)
    assert [o for o, *_ in storage.owners(state)] == ["legacy:adhoc", "local", ACME]


def test_quanta_agent_storage_command(state: Path) -> None:
    agent_dir = state.parent

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "quanta", "agent-storage", str(agent_dir), *args],
                              capture_output=True, text=True, timeout=60)

    r = cli()
    assert r.returncode == 0, r.stderr
    assert "legacy:Acme-Tools\t2 table(s)" in r.stdout and "no instruction reaches it" in r.stdout
    assert ACME in r.stdout
    r = cli("--adopt", "legacy:Lonely", "--to", ACME)  # ACME has a Seen already: nothing moves
    assert r.returncode == 0 and "0 table(s) given to " + ACME in r.stdout and "seen" in r.stdout, r.stdout
    r = cli("--adopt", "Lonely", "--to", MALLORY)
    assert r.returncode == 0 and "1 table(s) given to " + MALLORY in r.stdout, r.stdout + r.stderr
    assert run(state, MALLORY, 'Storage.Get(Name: "Seen");').rows == [["lonely"]]
    assert run(state, ACME, 'Storage.Get(Name: "Seen");').rows == [["signed"]]
    r = cli("--drop", "Acme-Tools")
    assert r.returncode == 0 and "2 table(s) deleted" in r.stdout
    r = cli("--adopt", "adhoc", "--to", "legacy:evil")
    assert r.returncode == 1 and "not an owner" in (r.stdout + r.stderr)
    r = cli("--adopt", "adhoc")
    assert r.returncode == 2
    r = subprocess.run([sys.executable, "-m", "quanta", "agent-storage", str(agent_dir / "nope")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "not an agent directory" in (r.stdout + r.stderr)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to own files as another user")
def test_run_as_root_the_store_stays_the_agents(state: Path) -> None:
    """A careless operator runs the command as root on an agent that runs as another account: the
    WAL files SQLite makes for it must stay that account's, or the agent could not open its store.
    (SQLite's own VFS gives a root process's journal and WAL files the database file's owner; this
    holds it to that.)"""
    for f in state.iterdir():
        os.chown(f, 65534, 65534)
    storage._CONNS.clear()
    storage.owners(state)
    for side in ("storage.db-wal", "storage.db-shm"):  # open while the connection is (WAL mode)
        assert (state / side).stat().st_uid == 65534, side
    assert (state / "storage.db").stat().st_uid == 65534
