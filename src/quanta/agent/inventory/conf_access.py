"""Reading and changing the Activity Record's settings in ``agent.conf`` on behalf of instructions.

``settings_rows`` lists every ``Module.Inventory.*`` setting with the value that the agent's own
parser (:func:`.settings.parse_settings`) gives it; ``change_setting`` rewrites one key in
``agent.conf`` after checking the whole file still parses, atomically (a temporary file in the
same directory, fsync, rename) and with mode 0600. The running agent applies a change without a
restart (:mod:`quanta.agent.activity`); ``Applied`` says whether it uses a value.
"""

from __future__ import annotations

import os
import stat
import tempfile
import threading
from pathlib import Path

from quanta.scale.tables import GRANULARITIES, SOURCES

from .settings import InventoryConfigError, InventorySettings, parse_settings

MAX_CONF_BYTES = 1024 * 1024
MAX_VALUE = 64
_LOCK = threading.Lock()


class SettingsAccessError(ValueError):
    """A setting that cannot be read or changed; the message says why."""


def flatten(s: InventorySettings) -> dict[str, str]:
    def num(v: float) -> str:
        return f"{v:g}"

    out = {
        "Module.Inventory.Enabled": str(s.enabled).lower(),
        "Module.Inventory.MaxSizeMB": num(s.max_size_bytes / (1024 * 1024)),
        "Module.Inventory.FlushIntervalSeconds": num(s.flush_seconds),
        "Module.Inventory.BatchRows": str(s.batch_rows),
        "Module.Inventory.QueueRows": str(s.queue_rows),
        "Module.Inventory.MaintenanceIntervalSeconds": num(s.maintenance_seconds),
        "Module.Inventory.Process.Method": s.process_method,
    }
    for src in SOURCES:
        ss = s.source(src.name)
        out[f"Module.Inventory.{src.name}.Enabled"] = str(ss.enabled).lower()
        out[f"Module.Inventory.{src.name}.PollIntervalSeconds"] = num(ss.interval)
        for g in GRANULARITIES:
            if g in ss.retention:
                days, rows = ss.retention[g]
                out[f"Module.Inventory.{src.name}.{g}.MaxAgeDays"] = num(days)
                out[f"Module.Inventory.{src.name}.{g}.MaxRows"] = str(rows)
    return out


KNOWN_KEYS: dict[str, str] = {k.lower(): k for k in flatten(parse_settings({}))}


def _read_lines(conf: Path) -> list[str]:
    """agent.conf's lines: a regular file (no FIFO, device or link loop), at most 1 MB."""
    from quanta.scale.methods._common import open_regular, read_capped

    try:
        with open_regular(conf) as f:
            data = read_capped(f, MAX_CONF_BYTES)
    except FileNotFoundError:
        raise SettingsAccessError(f"{conf} not found") from None
    except OSError as e:
        raise SettingsAccessError(f"cannot read {conf}: {e}") from None
    if len(data) > MAX_CONF_BYTES:
        raise SettingsAccessError(f"{conf} is larger than {MAX_CONF_BYTES // 1024} KB")
    return data.decode("utf-8", errors="replace").splitlines()


def _values(lines: list[str]) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in lines:
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip()
    return values


def _parse(values: dict[str, str], conf: Path) -> InventorySettings:
    try:
        return parse_settings(values)
    except InventoryConfigError as e:
        raise SettingsAccessError(f"{conf}: {e}") from None


def settings_rows(conf: Path, in_force: dict[str, str] | None = None) -> list[list[object]]:
    """[Name, Value, Default, Configured, Applied] per setting, from agent.conf as the agent parses it.

    ``Configured``: agent.conf sets the key. ``Applied``: the running capture uses this value
    (``in_force``: the values it uses, None outside a running agent)."""
    conf = Path(conf)
    lines = _read_lines(conf)
    values = _values(lines)
    current = flatten(_parse(values, conf))
    defaults = flatten(parse_settings({}))
    configured = {k.strip().lower() for k in values}
    force = in_force or {}
    return [[k, v, defaults[k], k.lower() in configured, force.get(k) == v] for k, v in current.items()]


def change_setting(conf: Path, name: str, value: str) -> tuple[str, str, str]:
    """Set one ``Module.Inventory.*`` key in agent.conf; returns (canonical name, old value, new value).

    The value is checked by the agent's parser together with the rest of the file; nothing is
    written when it is refused."""
    conf = Path(conf)
    canonical = KNOWN_KEYS.get(name.strip().lower())
    if canonical is None:
        raise SettingsAccessError(f"{name!r} is not a Module.Inventory setting")
    value = value.strip()
    if not value or len(value) > MAX_VALUE or not value.isprintable() or "=" in value:
        raise SettingsAccessError(f"value must be 1 to {MAX_VALUE} printable characters without '='")
    with _LOCK:
        lines = _read_lines(conf)
        values = _values(lines)
        old = flatten(_parse(values, conf))[canonical]
        out: list[str] = []
        replaced = False
        for line in lines:
            key, sep, _ = line.strip().partition("=")
            if sep and not line.strip().startswith(("#", ";")) and key.strip().lower() == canonical.lower():
                if not replaced:
                    out.append(f"{canonical}={value}")
                    replaced = True
                continue  # a duplicate of the key: the one written wins, the others go
            out.append(line)
        if not replaced:
            out.append(f"{canonical}={value}")
        new_settings = _parse(_values(out), conf)  # the agent's parser, on the whole new file
        new = flatten(new_settings)[canonical]
        _write_atomic(conf, "\n".join(out) + "\n")
    return canonical, old, new


def _write_atomic(conf: Path, text: str) -> None:
    st = os.lstat(conf)
    if not stat.S_ISREG(st.st_mode):
        raise SettingsAccessError(f"{conf} is not a regular file")
    fd, tmp = tempfile.mkstemp(dir=conf.parent, prefix=".agent-conf-", suffix=".tmp")
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, conf)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:
        dfd = os.open(conf.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
