"""Service units: what ``quanta.deploy`` writes is accepted by systemd's own checker.

``systemd-analyze verify`` parses the units as systemd would (it needs no running systemd); the
test skips with a reason where the tool is absent (outside CI).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from quanta.deploy import agent_unit, server_unit

EXE = Path(sys.executable).with_name("quanta")


def _verify(tmp_path: Path, *units) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    tool = shutil.which("systemd-analyze")
    if tool is None:
        why = "systemd-analyze is not installed (Debian package systemd)"
        if os.environ.get("QUANTA_CI"):
            pytest.fail(why)
        pytest.skip(why)
    for u in units:
        (tmp_path / u.name).write_text(u.text)
    return subprocess.run([tool, "verify", *[str(tmp_path / u.name) for u in units]], capture_output=True,
                          text=True, timeout=60)


def test_units_verify_cleanly_even_for_awkward_paths(tmp_path: Path) -> None:
    # a careless operator's data directory: spaces, a percent sign and a dollar in its name
    root = tmp_path / "quanta data 100% $HOME"
    root.mkdir()
    agent = tmp_path / "agent dir"
    agent.mkdir()
    s, a = server_unit(root, EXE), agent_unit(agent, EXE)
    assert s.name.startswith("quanta-server-") and s.name.endswith(".service") and " " not in s.name
    r = _verify(tmp_path, s, a)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "", r.stderr  # no "Invalid URL, ignoring" or unknown-directive warnings
    assert "ExecStart=" in s.text and "server '" in s.text and "%%" in s.text and "$$HOME" in s.text
    assert "LimitNOFILE=65536" in s.text and "UMask=0077" in s.text
    assert "User=root" in a.text and "Restart=always" in a.text


def test_a_line_break_in_a_path_is_refused(tmp_path: Path) -> None:
    # a newline would let the path inject its own directives into the unit
    evil = tmp_path / "x\nExecStartPre=rm -rf ~"
    evil.mkdir()
    with pytest.raises(ValueError, match="line break"):
        server_unit(evil, EXE)
