"""Logging: ``log_format = "json"`` gives one JSON object a line that a log shipper can parse, tracebacks
included; per-component levels; a mistyped format or component is refused with the valid names."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from pydantic import ValidationError

from quanta.settings import Settings

SCRIPT = textwrap.dedent("""
    import logging
    from quanta.runtime import configure_logging
    from quanta.settings import Settings
    configure_logging("core", Settings(server_name="x", log_format="{fmt}", log_levels={{"core": "DEBUG"}}))
    log = logging.getLogger("quanta.core")
    log.debug("debug shows: %s", "per-component level")
    log.info("a message with a line break\\nand a quote \\" and ünïcode")
    try:
        1 / 0
    except ZeroDivisionError:
        log.exception("it failed")
""")


def _run(fmt: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", SCRIPT.format(fmt=fmt)], capture_output=True, text=True,
                          timeout=60, env=env)


def test_json_lines_parse_and_carry_the_fields() -> None:
    r = _run("json")
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 3, lines  # the line break and the traceback stay inside their objects
    objs = [json.loads(line) for line in lines]
    assert [o["level"] for o in objs] == ["DEBUG", "INFO", "ERROR"]
    assert all(o["component"] == "core" and o["logger"] == "quanta.core" and isinstance(o["pid"], int)
               and o["time"].endswith("+00:00") for o in objs)
    assert objs[1]["message"] == 'a message with a line break\nand a quote " and ünïcode'
    assert "ZeroDivisionError" in objs[2]["exc_info"]


def test_text_is_the_default_and_the_environment_overrides_the_file() -> None:
    r = _run("text")
    assert r.returncode == 0 and "INFO core[" in r.stderr and not r.stderr.lstrip().startswith("{")
    import os

    r = _run("text", env={**os.environ, "QUANTA_LOG_FORMAT": "json"})
    assert all(json.loads(line)["component"] == "core" for line in r.stderr.splitlines())


def test_a_careless_setting_is_refused_with_the_valid_names() -> None:
    with pytest.raises(ValidationError, match="log_format"):
        Settings(server_name="x", log_format="xml")
    with pytest.raises(ValidationError, match="unknown component 'cor'.*switch-host"):
        Settings(server_name="x", log_levels={"cor": "DEBUG"})
    import os

    r = subprocess.run([sys.executable, "-c", "from quanta.runtime import setup_logging; setup_logging('core')"],
                       capture_output=True, text=True, timeout=60, env={**os.environ, "QUANTA_LOG_FORMAT": "xml"})
    assert r.returncode == 1 and "'xml' is not one of text, json" in r.stderr
