"""Software capture's Windows and macOS code paths, driven on Linux.

Windows: a Windows registry cannot exist on Linux, so :class:`FakeWinreg` stands in for the
standard ``winreg`` module (the same calls, constants and errors: ``OpenKey`` with a registry view,
``EnumKey`` raising ``OSError`` past the last subkey, ``QueryValueEx`` raising
``FileNotFoundError`` for a missing value) over an in-memory tree of Uninstall keys. macOS: the
receipts and the applications' ``Info.plist`` files are real plist files written here (binary and
XML, with ``plistlib``); only where they are (``/var/db/receipts``, ``/Applications``) is a
temporary directory. The capture runs against a real store."""

from __future__ import annotations

import os
import plistlib
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from quanta.agent.inventory import Store, parse_settings
from quanta.agent.inventory import software as sw

UNINSTALL = sw.WINDOWS_UNINSTALL


class FakeWinreg:
    """Stands in for ``winreg`` (a Windows registry cannot exist on Linux): HKLM's Uninstall key in
    a 64-bit and a 32-bit view, each a dict of subkey -> values; ``denied`` subkeys raise
    PermissionError when opened; every handle opened must be closed."""

    HKEY_LOCAL_MACHINE = 0x80000002
    KEY_READ = 0x20019
    KEY_WOW64_64KEY = 0x0100
    KEY_WOW64_32KEY = 0x0200

    def __init__(self, views: dict[str, dict[str, dict[str, Any]]], denied: set[str] = frozenset()) -> None:
        self.views = views  # "x64" / "x86" -> subkey -> values
        self.denied = denied
        self.open: set[int] = set()
        self.next = 1

    def _handle(self, obj: Any) -> tuple[int, Any]:
        h = (self.next, obj)
        self.next += 1
        self.open.add(h[0])
        return h

    def OpenKey(self, key: Any, sub: str, reserved: int = 0, access: int = KEY_READ) -> tuple[int, Any]:
        view = "x64" if access & self.KEY_WOW64_64KEY else "x86"
        if key == self.HKEY_LOCAL_MACHINE:
            if sub != UNINSTALL or view not in self.views:
                raise FileNotFoundError(2, "The system cannot find the file specified")
            return self._handle(("root", view))
        assert key[0] in self.open and key[1][0] == "root"
        if sub in self.denied:
            raise PermissionError(5, "Access is denied")
        if sub not in self.views[key[1][1]]:
            raise FileNotFoundError(2, "The system cannot find the file specified")
        return self._handle(("entry", key[1][1], sub))

    def EnumKey(self, key: tuple[int, Any], i: int) -> str:
        assert key[0] in self.open
        names = list(self.views[key[1][1]])
        if i >= len(names):
            raise OSError(259, "No more data is available")
        return names[i]

    def QueryValueEx(self, key: tuple[int, Any], name: str) -> tuple[Any, int]:
        assert key[0] in self.open
        values = self.views[key[1][1]][key[1][2]]
        if name not in values:
            raise FileNotFoundError(2, "The system cannot find the file specified")
        v = values[name]
        return v, (4 if isinstance(v, int) else 1)

    def CloseKey(self, key: tuple[int, Any]) -> None:
        self.open.discard(key[0])


def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "inventory.db", parse_settings({"Module.Inventory.FlushIntervalSeconds": "0.05"}))
    s.start()
    return s


def software_rows(s: Store) -> list[tuple]:
    s.flush()
    c = sqlite3.connect(f"file:{s.path}?mode=ro", uri=True)
    try:
        return c.execute("SELECT Operation, Product, Version, PreviousVersion, Publisher, Architecture, PackageManager "
                         "FROM Software_Live ORDER BY rowid").fetchall()
    finally:
        c.close()


def capture(tmp_path: Path, s: Store, **kw: Any) -> sw.SoftwareCapture:
    return sw.SoftwareCapture(s, parse_settings({}), tmp_path, dpkg_status=tmp_path / "no-dpkg-status", **kw)


def test_windows_uninstall_keys_both_views_as_programs_and_features_lists_them() -> None:
    reg = FakeWinreg({
        "x64": {
            "{A1}": {"DisplayName": "7-Zip 23.01 (x64)", "DisplayVersion": "23.01", "Publisher": "Igor Pavlov"},
            "NoName": {"DisplayVersion": "1.0"},  # no DisplayName: not listed
            "Driver": {"DisplayName": "A driver", "SystemComponent": 1},  # a system component
            "KB123": {"DisplayName": "Update for X", "ParentKeyName": "X"},  # an update of another entry
            "Colon": {"DisplayName": "Foo: Bar'); DROP TABLE Software_Live; --\x00\r\n", "DisplayVersion": 7},
            "Long": {"DisplayName": "L" * 5000, "Publisher": "P" * 5000},
            "Locked": {"DisplayName": "unreadable"},
        },
        "x86": {"{A1}": {"DisplayName": "7-Zip 23.01 (x64)", "DisplayVersion": "9.20"}},
    }, denied={"Locked"})
    got = sw.read_windows_uninstall(reg)
    assert reg.open == set()  # every key opened was closed
    assert got["7-Zip 23.01 (x64):x64"] == ("23.01", "Igor Pavlov", "x64")
    assert got["7-Zip 23.01 (x64):x86"] == ("9.20", "", "x86")
    hostile = "Foo: Bar'); DROP TABLE Software_Live; --\x00"
    assert got[f"{hostile}:x64"] == ("7", "", "x64")
    assert got["L" * sw.MAX_TEXT + ":x64"] == ("", "P" * sw.MAX_TEXT, "x64")
    assert len(got) == 4
    # a registry without the 32-bit view (a 32-bit Windows), or none readable at all
    assert set(sw.read_windows_uninstall(FakeWinreg({"x64": {}}))) == set()
    assert sw.read_windows_uninstall(FakeWinreg({})) == {}


def test_windows_installs_upgrades_and_removals_are_recorded(tmp_path: Path) -> None:
    reg = FakeWinreg({"x64": {"{A1}": {"DisplayName": "Foo: Editor", "DisplayVersion": "1.0", "Publisher": "Foo Ltd"},
                              "{B2}": {"DisplayName": "Bar", "DisplayVersion": "2.0"}}})
    s = store(tmp_path)
    try:
        cap = capture(tmp_path, s, platform="win32", winreg=reg)
        state = cap.poll_once(None, [0.0])
        assert software_rows(s) == [("Present", "Foo: Editor", "1.0", "", "Foo Ltd", "x64", "windows"),
                                    ("Present", "Bar", "2.0", "", "", "x64", "windows")]
        reg.views["x64"]["{A1}"]["DisplayVersion"] = "1.1"
        del reg.views["x64"]["{B2}"]
        reg.views["x64"]["{C3}"] = {"DisplayName": "Baz", "DisplayVersion": "3", "Publisher": "Baz Inc"}
        state = cap.poll_once(state, [0.0])
        assert software_rows(s)[2:] == [("Upgrade", "Foo: Editor", "1.1", "1.0", "Foo Ltd", "x64", "windows"),
                                        ("Install", "Baz", "3", "", "Baz Inc", "x64", "windows"),
                                        ("Uninstall", "Bar", "2.0", "", "", "x64", "windows")]
        # the registry unreadable for a poll: not every program removed
        cap.winreg = FakeWinreg({})
        state = cap.poll_once(state, [0.0])
        assert len(software_rows(s)) == 5
        # the state survives a restart: the next agent finds what changed while it was stopped
        reg.views["x64"]["{D4}"] = {"DisplayName": "Qux"}
        again = capture(tmp_path, s, platform="win32", winreg=reg)
        again.poll_once(again._load(), [0.0])
        assert software_rows(s)[5:] == [("Install", "Qux", "", "", "", "x64", "windows")]
    finally:
        s.stop()


def test_the_windows_path_stays_behind_the_os_check(tmp_path: Path) -> None:
    """On Linux the capture never imports winreg or reads macOS's files; on another system it
    reads neither dpkg nor rpm."""
    reg = FakeWinreg({"x64": {"{A1}": {"DisplayName": "Foo"}}})
    s = store(tmp_path)
    try:
        cap = capture(tmp_path, s, platform="linux", winreg=reg)
        assert cap.read_other() == {}
        cap.poll_once(None, [0.0])
        assert all(r[6] not in ("windows", "pkgutil", "app") for r in software_rows(s))
        with pytest.raises(ModuleNotFoundError):  # the real module does not exist here
            sw.read_windows_uninstall()
    finally:
        s.stop()


def write_plist(path: Path, value: Any, fmt: plistlib.PlistFormat = plistlib.FMT_BINARY) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(plistlib.dumps(value, fmt=fmt))


def mac_tree(tmp_path: Path) -> tuple[Path, Path]:
    receipts, apps = tmp_path / "receipts", tmp_path / "Applications"
    write_plist(receipts / "com.apple.pkg.XProtect.plist",
                {"PackageIdentifier": "com.apple.pkg.XProtect", "PackageVersion": "2.145", "InstallProcessName": "x"})
    write_plist(receipts / "org.python.Python.plist", {"PackageIdentifier": "org.python.Python", "PackageVersion": "3.12"},
                plistlib.FMT_XML)
    (receipts / "com.apple.pkg.XProtect.bom").write_bytes(b"BOMStore")  # not a plist: not read
    write_plist(apps / "Safari.app" / "Contents" / "Info.plist",
                {"CFBundleName": "Safari", "CFBundleShortVersionString": "17.1", "CFBundleIdentifier": "com.apple.Safari"})
    write_plist(apps / "Only Version.app" / "Contents" / "Info.plist", {"CFBundleVersion": "42"}, plistlib.FMT_XML)
    return receipts, apps


def test_macos_receipts_and_applications(tmp_path: Path) -> None:
    receipts, apps = mac_tree(tmp_path)
    # hostile or broken entries are skipped, and none blocks the read
    (receipts / "garbage.plist").write_bytes(b"\x00not a plist")
    (receipts / "big.plist").write_bytes(b"<" * (sw.MAX_PLIST_BYTES + 1))
    (receipts / "list.plist").write_bytes(plistlib.dumps(["PackageIdentifier", "x"]))
    (receipts / "entity.plist").write_text(
        '<?xml version="1.0"?><!DOCTYPE plist [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">]>'
        '<plist version="1.0"><dict><key>PackageIdentifier</key><string>&b;</string></dict></plist>')
    os.mkfifo(receipts / "fifo.plist")
    (receipts / "link.plist").symlink_to(receipts / "org.python.Python.plist")  # not followed
    write_plist(tmp_path / "elsewhere" / "Info.plist", {"CFBundleName": "Elsewhere"})
    (apps / "Linked.app").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (apps / "Broken.app" / "Contents").mkdir(parents=True)
    (apps / "Broken.app" / "Contents" / "Info.plist").symlink_to(tmp_path / "elsewhere" / "Info.plist")
    (apps / "notes.txt").write_text("not an app")

    assert sw.read_macos_receipts(receipts) == {"com.apple.pkg.XProtect:": ("2.145", "", ""),
                                                "org.python.Python:": ("3.12", "", "")}
    assert sw.read_macos_applications(apps) == {"Safari:": ("17.1", "com.apple.Safari", ""),
                                                "Only Version:": ("42", "", "")}
    assert sw.read_macos_receipts(tmp_path / "missing") == {}
    assert sw.read_macos_applications(tmp_path / "missing") == {}


def test_macos_installs_and_removals_are_recorded(tmp_path: Path) -> None:
    receipts, apps = mac_tree(tmp_path)
    s = store(tmp_path)
    try:
        cap = capture(tmp_path, s, platform="darwin", mac_receipts=receipts, mac_applications=apps)
        state = cap.poll_once(None, [0.0])
        assert sorted(software_rows(s)) == sorted([
            ("Present", "com.apple.pkg.XProtect", "2.145", "", "", "", "pkgutil"),
            ("Present", "org.python.Python", "3.12", "", "", "", "pkgutil"),
            ("Present", "Safari", "17.1", "", "com.apple.Safari", "", "app"),
            ("Present", "Only Version", "42", "", "", "", "app")])
        write_plist(receipts / "com.example.tool.plist", {"PackageIdentifier": "com.example.tool", "PackageVersion": "1"})
        write_plist(apps / "Safari.app" / "Contents" / "Info.plist",
                    {"CFBundleName": "Safari", "CFBundleShortVersionString": "17.2", "CFBundleIdentifier": "com.apple.Safari"})
        import shutil

        shutil.rmtree(apps / "Only Version.app")
        cap.poll_once(state, [0.0])
        assert sorted(software_rows(s)[4:]) == sorted([
            ("Install", "com.example.tool", "1", "", "", "", "pkgutil"),
            ("Upgrade", "Safari", "17.2", "17.1", "com.apple.Safari", "", "app"),
            ("Uninstall", "Only Version", "42", "", "", "", "app")])
    finally:
        s.stop()
