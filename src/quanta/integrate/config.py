"""Connector configuration: ``DIR/integrate.toml`` (typed, validated; errors name the connector and key).

::

    [[connector]]
    name = "cmdb"                      # unique, [A-Za-z0-9_.-]
    type = "file"                      # file | sql | ldap
    path = "/srv/inventory.csv"        # .csv or .json (a list of objects)
    interval = 3600                    # seconds between scheduled runs; 0 = on demand only
    allow_empty = false                # an empty source may remove every device it imported before
    [connector.fields]                 # device field -> source column/attribute
    device_id = "hostname"
    fqdn = "dns_name"
    os = "operating_system"
    tags = ["site", "owner"]           # copied into the device's tags
    # server-assigned attributes (name -> source column/attribute): what management-group rules'
    # "attributes" match; written with this connector as their source, never over an administrator's
    attributes = { department = "ou", owner = "managedBy" }

    [[connector]]
    name = "assets-db"
    type = "sql"
    url = "postgresql://reader@db.example.com/assets"   # any SQLAlchemy URL; no password here
    password_file = "/etc/quanta/assets-db.password"    # or password_env = "ASSETS_DB_PASSWORD"
    query = "SELECT name AS device_id, dns AS fqdn, os FROM assets WHERE retired = :retired"
    parameters = { retired = false }                    # bound, never pasted

    [[connector]]
    name = "directory"
    type = "ldap"
    url = "ldap://dc.example.com:389"
    bind_dn = "cn=quanta,ou=services,dc=example,dc=com"
    bind_password_file = "/etc/quanta/ldap.password"    # or bind_password_env
    base_dn = "ou=computers,dc=example,dc=com"
    filter = "(objectClass=device)"

Secrets are read from a file or an environment variable at run time, never from this file, and are
never logged.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from quanta.rbac import ATTRIBUTE_NAME, MAX_ATTRIBUTES

CONFIG_FILE = "integrate.toml"
LaxPath = Annotated[Path, Field(strict=False)]
NAME_RX = r"^[A-Za-z0-9_.\-]{1,64}$"


class ConfigError(ValueError):
    pass


class Fields(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    device_id: str | None = None
    fqdn: str | None = None
    os: str | None = None
    tags: list[str] = Field(default_factory=list, max_length=64)
    # attribute name -> the source field that gives its value
    attributes: dict[str, str] = Field(default_factory=dict)

    @field_validator("attributes")
    @classmethod
    def _attribute_names(cls, v: dict[str, str]) -> dict[str, str]:
        if len(v) > MAX_ATTRIBUTES:
            raise ValueError(f"{len(v)} attributes; a device has at most {MAX_ATTRIBUTES}")
        for name, field in v.items():
            if not ATTRIBUTE_NAME.fullmatch(name):
                raise ValueError(f"attribute name {name[:80]!r}: 1-64 letters, digits, '_', '.', '-'")
            if not 1 <= len(field) <= 255 or "\x00" in field:
                raise ValueError(f"attribute {name!r}: the source field name is 1-255 characters, without NUL")
        return v

    @model_validator(mode="after")
    def _attributes_are_not_tags(self) -> Fields:
        both = sorted(set(self.attributes) & set(self.tags))
        if both:
            raise ValueError(f"{', '.join(repr(b) for b in both)} both a tag and an attribute: a tag is what a "
                             "device may say of itself, an attribute only the server sets; choose one")
        return self


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(pattern=NAME_RX)
    interval: int = Field(default=0, ge=0, le=30 * 24 * 3600)
    allow_empty: bool = False
    max_records: int = Field(default=1_000_000, ge=1, le=10_000_000)
    fields: Fields = Field(default_factory=Fields)

    DEFAULT_FIELDS: ClassVar[dict[str, str]] = {}  # per type, see below

    def field_map(self) -> dict[str, Any]:
        d = dict(self.DEFAULT_FIELDS)
        for k in ("device_id", "fqdn", "os"):
            v = getattr(self.fields, k)
            if v is not None:
                d[k] = v
        d["tags"] = list(self.fields.tags)
        d["attributes"] = dict(self.fields.attributes)
        return d


def _secret(file: Path | None, env: str | None, what: str) -> SecretStr | None:
    if file is not None:
        try:
            return SecretStr(file.read_text().rstrip("\r\n"))
        except OSError as e:
            raise ConfigError(f"cannot read {what} file {file}: {e.strerror}") from None
    if env is not None:
        if env not in os.environ:
            raise ConfigError(f"{what} environment variable {env} is not set")
        return SecretStr(os.environ[env])
    return None


class FileConnector(_Base):
    type: Literal["file"]
    path: LaxPath
    format: Literal["csv", "json"] | None = None  # default: from the file name
    DEFAULT_FIELDS: ClassVar[dict[str, str]] = {"device_id": "device_id", "fqdn": "fqdn", "os": "os"}

    def file_format(self) -> str:
        if self.format:
            return self.format
        suffix = self.path.suffix.lower()
        if suffix not in (".csv", ".json"):
            raise ConfigError(f"connector {self.name!r}: cannot tell the format of {self.path}; set format")
        return suffix[1:]


class SqlConnector(_Base):
    type: Literal["sql"]
    url: str = Field(min_length=1)
    query: str = Field(min_length=1, max_length=100_000)
    parameters: dict[str, str | int | float | bool] = Field(default_factory=dict)
    password_file: LaxPath | None = None
    password_env: str | None = None
    timeout: int = Field(default=15, ge=1, le=3600)
    DEFAULT_FIELDS: ClassVar[dict[str, str]] = {"device_id": "device_id", "fqdn": "fqdn", "os": "os"}

    @field_validator("url")
    @classmethod
    def _no_inline_password(cls, v: str) -> str:
        from sqlalchemy.engine import make_url

        try:
            u = make_url(v)
        except Exception:  # noqa: BLE001
            raise ValueError("not a valid SQLAlchemy database URL") from None
        if u.password:
            raise ValueError("the URL must not hold a password: use password_file or password_env")
        return v

    def password(self) -> SecretStr | None:
        return _secret(self.password_file, self.password_env, "password")


class LdapConnector(_Base):
    type: Literal["ldap"]
    url: str = Field(pattern=r"^ldaps?://[^/\s]+/?$")
    bind_dn: str | None = None
    bind_password_file: LaxPath | None = None
    bind_password_env: str | None = None
    base_dn: str = Field(min_length=1)
    filter: str = Field(default="(objectClass=*)", min_length=3, max_length=4096)
    timeout: int = Field(default=15, ge=1, le=3600)
    DEFAULT_FIELDS: ClassVar[dict[str, str]] = {"device_id": "cn", "fqdn": "dNSHostName", "os": "operatingSystem"}

    def bind_password(self) -> SecretStr | None:
        return _secret(self.bind_password_file, self.bind_password_env, "bind password")


Connector = Annotated[Union[FileConnector, SqlConnector, LdapConnector], Field(discriminator="type")]


class IntegrateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    connector: list[Connector] = Field(default_factory=list)

    @field_validator("connector")
    @classmethod
    def _unique(cls, v: list[Any]) -> list[Any]:
        names = [c.name for c in v]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate connector name(s): {', '.join(sorted(dup))}")
        return v

    def get(self, name: str) -> FileConnector | SqlConnector | LdapConnector:
        for c in self.connector:
            if c.name == name:
                return c
        known = ", ".join(c.name for c in self.connector) or "none configured"
        raise ConfigError(f"unknown connector {name!r} (known: {known})")


def config_path(root: Path | str) -> Path:
    return Path(root) / CONFIG_FILE


def load_config(root: Path | str) -> IntegrateConfig:
    """Read ``DIR/integrate.toml``; a missing file means no connectors."""
    path = config_path(root)
    if not path.exists():
        return IntegrateConfig()
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: {e}") from None
    try:
        return IntegrateConfig.model_validate(raw)
    except ValidationError as e:
        msgs = []
        for err in e.errors()[:5]:
            loc = list(err["loc"])
            if len(loc) >= 2 and loc[0] == "connector" and isinstance(loc[1], int):
                items = raw.get("connector", [])
                item = items[loc[1]] if loc[1] < len(items) and isinstance(items[loc[1]], dict) else {}
                name = repr(item["name"]) if isinstance(item.get("name"), str) else f"#{loc[1] + 1}"
                loc = [f"connector {name}"] + [str(x) for x in loc[3 if len(loc) > 2 and loc[2] in (
                    "file", "sql", "ldap") else 2:]]
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            msgs.append(f"{': '.join([loc[0], '.'.join(str(x) for x in loc[1:])]) if len(loc) > 1 else loc[0] if loc else ''}"
                        f": {msg}")
        raise ConfigError(f"{path}: " + "; ".join(re.sub(r"\s+", " ", m) for m in msgs)) from None
