"""Logon capture's macOS and Windows path, driven on Linux.

Those systems have no wtmp; the capture compares the sessions ``psutil.users()`` lists there
(utmpx on macOS, terminal services sessions on Windows) between polls. Neither session table can
be written here, so a list of records with psutil's documented fields (name, terminal, host,
started, pid) stands in for
what ``psutil.users()`` answers on them. The real ``psutil.users()`` is also run once with the
path forced, to show it is called as psutil defines it. The store is real."""

from __future__ import annotations

import sqlite3
from collections import namedtuple
from pathlib import Path
from typing import Any

import psutil

from quanta.agent.inventory import Store, parse_settings
from quanta.agent.inventory.logon import LogonCapture

suser = namedtuple("suser", ("name", "terminal", "host", "started", "pid"))  # psutil.users()'s documented fields


def logon_rows(s: Store) -> list[tuple]:
    s.flush()
    c = sqlite3.connect(f"file:{s.path}?mode=ro", uri=True)
    try:
        return c.execute("SELECT Ts, UserName, Operation, Terminal, RemoteHost, ProcessId FROM Logon_Live "
                         "ORDER BY rowid").fetchall()
    finally:
        c.close()


def test_sessions_appearing_and_going_are_logons_and_logoffs(tmp_path: Path) -> None:
    s = Store(tmp_path / "inventory.db", parse_settings({"Module.Inventory.FlushIntervalSeconds": "0.05"}))
    s.start()
    listed: list[Any] = [suser("alice", "console", "", 1_700_000_000.0, 88),
                         suser("bob", "ttys001", "203.0.113.7", 1_700_000_100.0, None)]
    now = [1_700_000_500.0]
    try:
        cap = LogonCapture(s, parse_settings({}), tmp_path, clock=lambda: now[0], wtmp=tmp_path / "no-wtmp",
                           platform="darwin", users=lambda: listed)
        state = cap.poll_once({})
        assert logon_rows(s) == [(1_700_000_000, "alice", "Logon", "console", "", 88),
                                 (1_700_000_100, "bob", "Logon", "ttys001", "203.0.113.7", None)]
        state = cap.poll_once(state)  # nothing changed: nothing recorded
        assert len(logon_rows(s)) == 2
        now[0] = 1_700_000_900.0
        listed[:] = [listed[0], suser("carol'); DROP TABLE Logon_Live; --", "rdp-tcp#1", "", "not a time", "x")]
        state = cap.poll_once(state)
        assert logon_rows(s)[2:] == [(1_700_000_900, "carol'); DROP TABLE Logon_Live; --", "Logon", "rdp-tcp#1", "", None),
                                     (1_700_000_900, "bob", "Logoff", "ttys001", "203.0.113.7", None)]
        # the list failing for a poll records nothing and forgets nothing
        def broken() -> list[Any]:
            raise psutil.AccessDenied()
        cap.users = broken
        state = cap.poll_once(state)
        assert len(logon_rows(s)) == 4
        # a restart: the sessions of the last poll come from the state file
        listed[:] = [listed[0]]
        again = LogonCapture(s, parse_settings({}), tmp_path, clock=lambda: now[0], wtmp=tmp_path / "no-wtmp",
                             platform="win32", users=lambda: listed)
        again.poll_once(again._load())
        assert logon_rows(s)[4:] == [(1_700_000_900, "carol'); DROP TABLE Logon_Live; --", "Logoff", "rdp-tcp#1", "",
                                      None)]
        # the real psutil.users(), as psutil defines it, on the forced path
        real = LogonCapture(s, parse_settings({}), tmp_path / "real", wtmp=tmp_path / "no-wtmp", platform="darwin")
        (tmp_path / "real").mkdir()
        assert "sessions" in real.poll_once({})
    finally:
        s.stop()


def test_linux_keeps_reading_wtmp(tmp_path: Path) -> None:
    s = Store(tmp_path / "inventory.db", parse_settings({"Module.Inventory.FlushIntervalSeconds": "0.05"}))
    s.start()
    try:
        called = []
        cap = LogonCapture(s, parse_settings({}), tmp_path, wtmp=tmp_path / "no-wtmp", platform="linux",
                           users=lambda: called.append(1) or [])
        assert "sessions" not in cap.poll_once({}) and called == []
    finally:
        s.stop()
