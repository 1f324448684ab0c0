"""One source of truth for Quanta's settings and its port table.

Every listener, every client default, the ``quanta ports`` report and the docs derive their
port numbers from :data:`PORTS` and from a :class:`Settings` instance loaded from the data
directory's ``quanta.toml``.  The Switch poke port is never stored: it is always the Switch
client port + 1 (see :func:`poke_port`).
"""

from __future__ import annotations

import secrets
import socket
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from quanta.datadir import CONFIG_FILE, DataDir  # noqa: F401  (re-exported)



@dataclass(frozen=True, slots=True)
class PortSpec:
    """One row of DESIGN.md §2."""

    name: str  # key in Settings.ports, and the NAME of ``quanta init --port NAME=NUMBER``
    default: int
    protocol: str
    listener: str
    clients: str
    note: str
    internal: bool  # bound to loopback by default
    settable: bool = True  # False for derived ports (poke)


PORTS: tuple[PortSpec, ...] = (
    PortSpec("https", 443, "HTTPS", "Web tier: Consumer API, Portal, Core (/Core), Background Channel (/Background)",
             "browsers, CLI, agents (Background), remote Consumer API to Core, DMZ Switch to Core",
             "HTTPSIISPORT, set at install (quanta init --https-port)", internal=False),
    PortSpec("http", 80, "HTTP", "Catalog UI/API; CRL distribution point",
             "browsers; Switches and agents fetching the CRL", "configurable (--port http=N)", internal=False),
    PortSpec("switch", 4000, "WSS", "Switch client port",
             "agents", "SwitchConfiguration.Port; agent setting Switch=<host>:<port>", internal=False),
    PortSpec("poke", 4001, "TCP", "Switch poke port (= client port + 1)",
             "the Core, to tell a Switch that work is waiting", "derived, never set on its own",
             internal=False, settable=False),
    PortSpec("core", 3900, "WS", "Core internal endpoint",
             "local Switches streaming to the Core (no TLS; loopback or LAN only)",
             "internal; changing it is not recommended", internal=True),
    PortSpec("hub", 3901, "WS", "Master event hub",
             "Response Stacks and DMZ Switch Hosts (register, device state, config pushes)", "internal",
             internal=True),
    PortSpec("coordinator", 8081, "HTTPS", "Coordinator internal API", "Consumer API", "internal", internal=True),
    PortSpec("integrate", 6002, "WS", "Integrate Agent", "Consumer API, local only", "local only", internal=True),
    PortSpec("interaction", 7766, "HTTPS", "Agent interaction port (end-user prompts and answers)",
             "the device's own user session", "Module.Interaction.Port", internal=True),
    PortSpec("smtp", 25, "SMTP", "outgoing from the Coordinator", "",
             "anonymous by default; authentication and TLS can be set after install", internal=False),
    PortSpec("database", 5432, "PostgreSQL", "Master and Responses databases (embedded SQLite by default)",
             "Master, Core, Catalog", "from --database-url; none with embedded SQLite", internal=False),
)

PORTS_BY_NAME: dict[str, PortSpec] = {p.name: p for p in PORTS}
SETTABLE_PORTS: tuple[str, ...] = tuple(p.name for p in PORTS if p.settable)


def poke_port(switch_port: int) -> int:
    """The poke port is always the Switch client port + 1."""
    return switch_port + 1


def switch_layout(host: str, first_port: int, count: int, prefix: str = "") -> list[dict[str, Any]]:
    """The SwitchConfiguration rows of ``count`` Switches on one host: ``<prefix>switch-<n>`` on consecutive
    port pairs (client port, poke port = client port + 1), starting at ``first_port``. The one place that
    lays Switches out; ``quanta init``, ``quanta host export`` and the port map all use it."""
    return [dict(Name=f"{prefix}switch-{i + 1}", Host=host, Port=first_port + 2 * i, Enabled=True)
            for i in range(count)]


def core_link_max_bytes(max_message_bytes: int) -> int:
    """Largest Switch->Core frame: a response batch holds at most two agent messages' worth."""
    return 4 * max_message_bytes


def default_ports() -> dict[str, int]:
    return {p.name: p.default for p in PORTS if p.settable}


LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
COMPONENTS = ("server", "core", "switch-host", "switch", "coordinator", "web", "http", "integrate", "hub", "catalog",
              "hub-client")
"""The processes a server runs (``quanta server`` is the supervisor): the names of ``log_levels``."""


class Settings(BaseModel):
    """Typed settings of one Quanta data directory (``DIR/quanta.toml``)."""

    model_config = ConfigDict(extra="forbid")

    server_name: str = Field(default_factory=socket.getfqdn, description=(
        "the name agents and browsers use for this server; its certificates carry it (default: this host's FQDN)"))
    bind_host: str = Field("0.0.0.0", description="address of the public listeners (HTTPS, Switches, HTTP)")
    internal_host: str = Field("127.0.0.1", description=(
        "address of the internal listeners (Core, Coordinator, Integrate, metrics): loopback unless components "
        "run on other hosts"))
    ports: dict[str, int] = Field(default_factory=default_ports, description=(
        "port numbers by name (see ports.md); `quanta init --port NAME=N` sets them"))
    database_url: str | None = Field(None, description=(
        "the Master database (postgresql://...); unset: the embedded SQLite file DIR/master.db"))
    responses_database_url: str | None = Field(None, description=(
        "the Responses database; unset: database_url, or DIR/responses.db with SQLite"))
    switches: int = Field(1, description="Switch processes under the Switch Host (rows in SwitchConfiguration)")
    instruction_ttl_default: int = Field(60, description="seconds: an instruction's gather window when none is given")
    response_ttl_default: int = Field(7 * 24 * 3600, description="seconds answers are kept when none is given")
    approval_ttl: int = Field(24 * 3600, description="seconds: an action nobody approves within this expires")
    role: Literal["single", "master", "response", "dmz"] = Field("single", description=(
        "topology (DESIGN §2): single (everything here), master (Master stack and hub for remote hosts), response "
        "(a remote Response Stack), dmz (Switches and a Background Channel for internet-facing agents)"))
    core_url: str | None = Field(None, description=(
        "where the Consumer API and the Coordinator reach the Core; unset: http://internal_host:ports.core"))
    switch_core_url: str | None = Field(None, description=(
        "where this host's Switches reach the Core; unset: ws://internal_host:ports.core/Core/Switch"))
    hub_url: str | None = Field(None, description="response/dmz: the Master hub (wss://master:3901/Hub)")
    crl_url: str | None = Field(None, description="dmz: the CRL distribution point (http://master:80/crl.pem)")
    replicate_to: list[str] = Field([], description="master: DMZ web tiers that receive Background content")
    local_switches: list[dict[str, str | int | bool]] = Field([], description=(
        "dmz: its Switches (Name, Host, Port, Enabled), as it has no database"))
    max_message_bytes: int = Field(1024 * 1024, description=(
        "largest WebSocket message between an agent and a Switch; agents learn it in the Welcome"))
    log_level: LogLevel = Field("INFO", description="DEBUG, INFO, WARNING or ERROR for every component")
    log_levels: dict[str, LogLevel] = Field({}, description=(
        "per component (" + ", ".join(COMPONENTS) + "): overrides log_level"))
    log_format: Literal["text", "json"] = Field("text", description=(
        "text (one line) or json (one object a line: time, level, component, pid, logger, message); "
        "QUANTA_LOG_FORMAT overrides"))
    metrics_ports: dict[str, int] = Field({}, description=(
        "Prometheus /metrics port per component, on internal_host (none by default); the Switches of a Switch "
        "Host use metrics_ports.switch + 0, 1, 2, ... in SwitchConfiguration order"))
    catalog_url: str | None = Field(None, description=(
        "where the Master reaches the Catalog; unset: this host's HTTP port, /Catalog"))
    catalog_database_url: str | None = Field(None, description=(
        "the Catalog's database; unset: the Master database (a Remote Catalog host sets its own)"))
    # Accounts (quanta.accounts.Policy): sessions, lockout, passwords.
    session_ttl: int = Field(default=15 * 60, ge=60, le=24 * 3600, description=(
        "seconds: a token not used for this long expires; each use renews it"))
    session_max_age: int = Field(default=8 * 3600, ge=60, le=30 * 86400, description=(
        "seconds: no renewal takes a session past this age"))
    session_renew_interval: int = Field(default=60, ge=1, le=3600, description=(
        "seconds: a session's renewal is written at most this often"))
    login_max_failures: int = Field(default=5, ge=1, le=1000, description=(
        "failed logins for one user name within the window that lock it"))
    login_source_max_failures: int = Field(default=20, ge=1, le=100000, description=(
        "failed logins from one source address within the window that lock the address"))
    login_failure_window: int = Field(default=15 * 60, ge=1, le=86400, description="seconds: how far back failures count")
    login_lock_duration: int = Field(default=15 * 60, ge=1, le=7 * 86400, description=(
        "seconds a lock lasts (administrators can lift it earlier: quanta user unlock)"))
    password_min_length: int = Field(default=12, ge=8, le=1024, description="shortest password accepted when one is set")

    def level_of(self, component: str) -> str:
        """The log level of one component: ``log_levels[component]``, else ``log_level``."""
        return self.log_levels.get(component, self.log_level)

    @field_validator("log_levels")
    @classmethod
    def _check_log_levels(cls, v: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(v) - set(COMPONENTS))
        if unknown:
            raise ValueError(f"log_levels: unknown component {', '.join(map(repr, unknown))}; known: "
                             f"{', '.join(COMPONENTS)}")
        return v

    @field_validator("metrics_ports")
    @classmethod
    def _check_metrics_ports(cls, v: dict[str, int]) -> dict[str, int]:
        unknown = sorted(set(v) - set(COMPONENTS))
        if unknown:
            raise ValueError(f"metrics_ports: unknown component {', '.join(map(repr, unknown))}; known: "
                             f"{', '.join(COMPONENTS)}")
        for name, number in v.items():
            if not 1 <= int(number) <= 65535:
                raise ValueError(f"metrics_ports.{name}={number} is out of range 1-65535")
        return v

    @field_validator("ports")
    @classmethod
    def _check_ports(cls, v: dict[str, int]) -> dict[str, int]:
        merged = default_ports()
        for name, number in v.items():
            if name not in PORTS_BY_NAME:
                raise ValueError(f"unknown port name {name!r}; known: {', '.join(SETTABLE_PORTS)}")
            if not PORTS_BY_NAME[name].settable:
                raise ValueError(f"port {name!r} is derived (Switch port + 1) and cannot be set on its own")
            if not 1 <= int(number) <= 65535:
                raise ValueError(f"port {name}={number} is out of range 1-65535")
            merged[name] = int(number)
        return merged

    def core_http_url(self) -> str:
        return self.core_url or f"http://{self.internal_host}:{self.port('core')}"

    def core_link_url(self) -> str:
        return self.switch_core_url or f"ws://{self.internal_host}:{self.port('core')}/Core/Switch"

    def port(self, name: str) -> int:
        if name == "poke":
            return poke_port(self.ports["switch"])
        return self.ports[name]


def new_internal_secret() -> str:
    return secrets.token_hex(32)


def _toml_value(v: object) -> str:
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    raise TypeError(type(v))


def dump_settings(s: Settings) -> str:
    """Serialise settings as TOML (flat keys plus a [ports] table)."""
    lines = ["# Quanta settings. Ports follow DESIGN.md §2; the poke port is always switch + 1.", ""]
    for key, value in s.model_dump().items():
        if key == "ports" or value is None:
            continue
        lines.append(f"{key} = {_toml_value(value)}")
    lines += ["", "[ports]"]
    for name, number in s.ports.items():
        lines.append(f"{name} = {number}")
    return "\n".join(lines) + "\n"


def load_settings(root: Path | str) -> Settings:
    path = DataDir(Path(root)).config
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run 'quanta init {root}' first")
    return Settings.model_validate(tomllib.loads(path.read_text()))


def save_settings(root: Path | str, s: Settings) -> None:
    DataDir(Path(root)).config.write_text(dump_settings(s))
