"""Connectors: read every record from a source, or fail with a clear error (and then nothing is written).

Each connector returns a list of source rows (``dict[str, object]``); :func:`to_records` maps them to
typed :class:`DeviceRecord` values with the connector's field map. Reading is complete before any
write happens, so a source that is down or returns garbage changes nothing.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from quanta.accounts.validate import has_control

from .config import ConfigError, FileConnector, LdapConnector, SqlConnector

MAX_FILE_BYTES = 512 * 1024 * 1024
MAX_ATTRIBUTE_VALUE = 255  # characters (device_attributes.value)
_BAD_ID = re.compile(r"[/\\\x00-\x1f]")


class SourceError(Exception):
    """The source could not be read, or returned rows that do not map to devices."""


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    """One device from a source. ``attributes``: the server-assigned attributes the source gives it
    (what it does not give, this connector removes), or None when they were refused (``problem``
    says why; then the device's attributes are left as they were)."""

    device_id: str
    fqdn: str = ""
    os: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    attributes: dict[str, str] | None = field(default_factory=dict)
    problem: str | None = None


def _scrub(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret else text


# ------------------------------------------------------------------------------------- file
def read_file(c: FileConnector) -> list[dict[str, Any]]:
    fmt = c.file_format()
    try:
        size = c.path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise SourceError(f"{c.path} is {size} bytes; the limit is {MAX_FILE_BYTES}")
        data = c.path.read_bytes()
    except OSError as e:
        raise SourceError(f"cannot read {c.path}: {e.strerror}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SourceError(f"{c.path}: not UTF-8 (byte {e.start})") from None
    if fmt == "json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise SourceError(f"{c.path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise SourceError(f"{c.path}: expected a JSON list of objects")
        return rows
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    try:
        rows = []
        for row in reader:
            if None in row:
                raise SourceError(f"{c.path}: line {reader.line_num}: more values than header columns")
            rows.append(row)
    except csv.Error as e:
        raise SourceError(f"{c.path}: line {reader.line_num}: {e}") from None
    if reader.fieldnames is None:
        raise SourceError(f"{c.path}: empty file (no header line)")
    return rows


# -------------------------------------------------------------------------------------- sql
def read_sql(c: SqlConnector) -> list[dict[str, Any]]:
    from quanta.db import normalise_url

    password = c.password()
    secret = password.get_secret_value() if password else None
    url = sa.engine.make_url(normalise_url(c.url))
    if url.drivername == "mysql":
        url = url.set(drivername="mysql+pymysql")
    if secret is not None:
        url = url.set(password=secret)
    connect_args: dict[str, Any] = {}
    if url.get_backend_name() in ("postgresql", "mysql", "mariadb"):
        connect_args["connect_timeout"] = c.timeout
    try:
        engine = sa.create_engine(url, poolclass=sa.pool.NullPool, connect_args=connect_args)
    except Exception as e:  # noqa: BLE001 - unknown driver etc.
        raise SourceError(_scrub(f"cannot use database URL {c.url}: {e}", secret)) from None
    try:
        with engine.connect() as conn:
            try:
                result = conn.execute(sa.text(c.query), dict(c.parameters))
                if not result.returns_rows:
                    raise SourceError("the query returned no result set (it must be a SELECT)")
                rows = []
                for r in result.mappings():
                    rows.append(dict(r))
                    if len(rows) > c.max_records:
                        raise SourceError(f"the query returned more than max_records={c.max_records} rows")
                return rows
            finally:
                conn.rollback()  # the connector only reads; anything else the query did is undone
    except sa.exc.SQLAlchemyError as e:
        msg = str(getattr(e, "orig", None) or e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SourceError(_scrub(f"database {url.render_as_string(hide_password=True)}: {msg}", secret)) from None
    finally:
        engine.dispose()


# ------------------------------------------------------------------------------------- ldap
def read_ldap(c: LdapConnector) -> list[dict[str, Any]]:
    import ldap3
    from ldap3.core.exceptions import LDAPException

    password = c.bind_password()
    secret = password.get_secret_value() if password else None
    fm = c.field_map()
    attrs = sorted({v for k, v in fm.items() if k not in ("tags", "attributes") and v} | set(fm["tags"])
                   | set(fm["attributes"].values()))
    try:
        server = ldap3.Server(c.url, connect_timeout=c.timeout, get_info=ldap3.NONE)
        conn = ldap3.Connection(server, user=c.bind_dn, password=secret, auto_bind=True, raise_exceptions=True,
                                receive_timeout=c.timeout, read_only=True)
    except LDAPException as e:
        raise SourceError(_scrub(f"LDAP {c.url}: cannot bind as {c.bind_dn or 'anonymous'}: "
                                 f"{type(e).__name__}: {e}", secret)) from None
    try:
        entries = conn.extend.standard.paged_search(c.base_dn, c.filter, attributes=attrs, paged_size=500,
                                                    generator=True)
        rows: list[dict[str, Any]] = []
        for e in entries:
            if e.get("type") != "searchResEntry":
                continue
            row: dict[str, Any] = {"dn": e["dn"]}
            for k, v in e["attributes"].items():
                if isinstance(v, list):
                    v = v[0] if v else None
                row[k] = v
            # attribute names are case-insensitive in LDAP: index by the configured spelling
            lower = {k.lower(): v for k, v in row.items()}
            rows.append({a: lower.get(a.lower()) for a in attrs} | {"dn": e["dn"]})
            if len(rows) > c.max_records:
                raise SourceError(f"the search returned more than max_records={c.max_records} entries")
        return rows
    except LDAPException as e:
        raise SourceError(_scrub(f"LDAP {c.url}: search {c.base_dn!r} {c.filter!r} failed: "
                                 f"{type(e).__name__}: {e}", secret)) from None
    finally:
        conn.unbind()


def read_source(c: FileConnector | SqlConnector | LdapConnector) -> list[dict[str, Any]]:
    try:
        if isinstance(c, FileConnector):
            return read_file(c)
        if isinstance(c, SqlConnector):
            return read_sql(c)
        return read_ldap(c)
    except ConfigError as e:
        raise SourceError(str(e)) from None


# ---------------------------------------------------------------------------------- mapping
def _text(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return str(v)


def to_records(c: FileConnector | SqlConnector | LdapConnector, rows: list[dict[str, Any]]) -> list[DeviceRecord]:
    """Map source rows to device records; any bad row fails the whole run (naming the row)."""
    fm = c.field_map()
    if len(rows) > c.max_records:
        raise SourceError(f"{len(rows)} records; more than max_records={c.max_records}")
    out: list[DeviceRecord] = []
    seen: set[str] = set()
    for i, row in enumerate(rows, 1):
        where = f"record {i}"
        if fm["device_id"] not in row:
            raise SourceError(f"{where}: no {fm['device_id']!r} field (the device_id mapping); "
                              f"fields are: {', '.join(map(str, row))[:300]}")
        device_id = _text(row.get(fm["device_id"])).strip()
        if not device_id or len(device_id) > 255 or _BAD_ID.search(device_id):
            raise SourceError(f"{where}: invalid device_id {device_id[:80]!r}")
        if device_id.lower() in seen:
            raise SourceError(f"{where}: duplicate device_id {device_id!r}")
        seen.add(device_id.lower())
        fqdn = _text(row.get(fm["fqdn"])).strip() if fm.get("fqdn") else ""
        os_ = _text(row.get(fm["os"])).strip() if fm.get("os") else ""
        if len(fqdn) > 255 or len(os_) > 255:
            raise SourceError(f"{where} ({device_id}): fqdn or os longer than 255 characters")
        tags = {}
        for t in fm["tags"]:
            v = row.get(t)
            if v is not None and _text(v) != "":
                tags[t] = _text(v)[:255]
        attributes, problem = _attributes(fm["attributes"], row)
        out.append(DeviceRecord(device_id, fqdn, os_, tags, attributes,
                                None if problem is None else f"{where} ({device_id}): {problem}"))
    return out


def _attributes(mapping: dict[str, str], row: dict[str, Any]) -> tuple[dict[str, str] | None, str | None]:
    """The attributes a source row gives (an empty or missing field gives none), or None and why
    they are refused: a value that is not one scalar, longer than MAX_ATTRIBUTE_VALUE, or holding
    control characters. One bad value refuses the device's attributes, not the run."""
    out: dict[str, str] = {}
    for name, source_field in mapping.items():
        v = row.get(source_field)
        if isinstance(v, (dict, list, tuple)):
            return None, f"attribute {name!r} (field {source_field!r}): not a single value; attributes left unchanged"
        text = _text(v).strip()
        if not text:
            continue
        if len(text) > MAX_ATTRIBUTE_VALUE:
            return None, (f"attribute {name!r} (field {source_field!r}): {len(text)} characters, at most "
                          f"{MAX_ATTRIBUTE_VALUE}; attributes left unchanged")
        if has_control(text):
            return None, (f"attribute {name!r} (field {source_field!r}): control characters are not allowed; "
                          "attributes left unchanged")
        out[name] = text
    return out, None
