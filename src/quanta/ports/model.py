"""The firewall table model: every network flow of a topology, built from the live settings.

A *flow* goes from a component to a component (DESIGN.md §2). A topology places components on
hosts. A flow between two hosts becomes two rows, the client's Outgoing row and the server's
matching Incoming row ("for each component with an output there is a matching input"); a flow
inside one host is internal and is listed by ``--internal`` instead. Rows of the model product
(the seed) that Quanta has no flow for still appear, marked "Not used by Quanta" with the reason.

Every number comes from :class:`quanta.settings.Settings` and from the ``SwitchConfiguration``
table (one Switch client port per row, and its poke port = client port + 1); nothing here
hard-codes a port.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from quanta.settings import PORTS_BY_NAME, DataDir, Settings, load_settings, poke_port, switch_layout

TOPOLOGIES = ("single-server", "remote-response-stack", "dmz", "remote-catalog")
Topology = Literal["single-server", "remote-response-stack", "dmz", "remote-catalog"]

# ----------------------------------------------------------------------------- devices
SERVER = "Quanta Server"  # single server: Master Stack and Response Stack on one host
MASTER = "Quanta Server (Master Stack)"
RESPONSE = "Quanta Server (Response Stack)"
DMZ = "DMZ Server"
CATALOG = "Catalog Server"
DATABASE = "Database server"
MAIL = "Mail server"
CLIENTS = "Clients"
INET_CLIENTS = "Internet-facing clients"
BROWSERS = "Browsers"
QUANTA_HOSTS = (SERVER, MASTER, RESPONSE, DMZ, CATALOG)
DEVICE_ORDER = (SERVER, MASTER, RESPONSE, DMZ, CATALOG, DATABASE, MAIL, CLIENTS, INET_CLIENTS, BROWSERS)

# Components, and where each topology puts them. A component missing from a placement does not
# exist in that topology.
_MASTER_SIDE = {"web": MASTER, "http": MASTER, "hub": MASTER, "coordinator": MASTER, "integrate": MASTER,
                "catalog": MASTER}
_RESPONSE_SIDE = {"core": RESPONSE, "switch": RESPONSE, "background": RESPONSE}
_EXTERNAL = {"clients": CLIENTS, "browsers": BROWSERS, "mail": MAIL, "database": DATABASE}
PLACEMENT: dict[str, dict[str, str]] = {
    "single-server": {**{c: SERVER for c in (*_MASTER_SIDE, *_RESPONSE_SIDE)}, **_EXTERNAL},
    "remote-response-stack": {**_MASTER_SIDE, **_RESPONSE_SIDE, **_EXTERNAL},
    "dmz": {**_MASTER_SIDE, **_RESPONSE_SIDE, **_EXTERNAL, "dmz_switch": DMZ, "dmz_background": DMZ,
            "inet_clients": INET_CLIENTS},
    "remote-catalog": {**{c: MASTER for c in (*_MASTER_SIDE, *_RESPONSE_SIDE)}, "catalog": CATALOG, **_EXTERNAL},
}

# preflight roles -> the component that says which host the role is
ROLE_COMPONENT = {"master": "web", "response": "core", "dmz": "dmz_switch", "catalog": "catalog",
                  "agent": "clients"}

# Components with a listener in this version of Quanta (preflight checks that these are bound;
# the others are Quanta's port assignments for components still to come).
IMPLEMENTED_LISTENERS = {"web", "background", "http", "switch", "poke", "core", "coordinator", "integrate"}
# The hub runs on a Master that has remote Response Stacks or DMZ servers (role "master").
REMOTE_ONLY_LISTENERS = {"hub"}

NOT_USED = "Not used by Quanta"


# ------------------------------------------------------------------------ live config
@dataclass(frozen=True)
class SwitchRow:
    name: str
    host: str
    port: int
    enabled: bool = True


@dataclass(frozen=True)
class Database:
    """One configured database: PostgreSQL at host:port, or an embedded SQLite file."""

    role: str  # "master", "responses", or "master and responses"
    kind: str  # "postgresql" | "sqlite" | other dialect name
    host: str | None
    port: int | None
    name: str | None  # database name or file path
    setting: str

    @property
    def embedded(self) -> bool:
        return self.kind == "sqlite"

    def where(self) -> str:
        if self.embedded:
            return f"the SQLite file{'s' if ' and ' in (self.name or '') else ''} {self.name}"
        return f"{self.kind} {self.host}:{self.port}" + (f"/{self.name}" if self.name else "")


@dataclass(frozen=True)
class LiveConfig:
    settings: Settings
    switches: tuple[SwitchRow, ...]
    databases: tuple[Database, ...]
    source: str  # "defaults" or the data directory

    def port(self, name: str) -> int:
        return self.settings.port(name)

    @property
    def enabled_switches(self) -> tuple[SwitchRow, ...]:
        return tuple(s for s in self.switches if s.enabled)


def _describe_db(role: str, url: str, settings: Settings, setting: str) -> Database:
    import sqlalchemy as sa

    from quanta.db import normalise_url

    u = sa.engine.make_url(normalise_url(url))
    backend = u.get_backend_name()
    if backend == "sqlite":
        return Database(role, "sqlite", None, None, u.database or ":memory:", setting)
    kind = "PostgreSQL" if backend == "postgresql" else backend
    return Database(role, kind, u.host or "localhost", u.port or settings.port("database"), u.database, setting)


def databases(settings: Settings, root: Path | None) -> tuple[Database, ...]:
    dd = DataDir(root or Path("DIR"))
    master_url, responses_url = dd.master_url(settings), dd.responses_url(settings)
    master = _describe_db("master", master_url, settings, "database_url")
    responses = _describe_db("responses", responses_url, settings,
                             "responses_database_url" if settings.responses_database_url else "database_url")
    if master_url == responses_url or (master.embedded and responses.embedded):
        name = master.name if master_url == responses_url else f"{master.name} and {responses.name}"
        return (Database("master and responses", master.kind, master.host, master.port, name, "database_url"),)
    return (master, responses)


def load_live(root: Path | str | None) -> LiveConfig:
    """The live configuration of a data directory, or the defaults when ``root`` is None."""
    if root is None:
        s = Settings(server_name="<server>")
        sw = tuple(_row(r) for r in switch_layout(s.server_name, s.port("switch"), s.switches))
        return LiveConfig(s, sw, databases(s, None), "defaults")
    from quanta.db import make_engine, store

    import sqlalchemy as sa

    root = Path(root)
    s = load_settings(root)
    source = str(root)
    if s.role == "dmz":  # a DMZ server has no database: its Switches are in its settings
        rows = [dict(r, Enabled=True) for r in s.local_switches]
    else:
        engine = make_engine(DataDir(root).master_url(s))
        try:
            rows = store.switch_rows(engine)
        except sa.exc.SQLAlchemyError as e:
            # still print/check what the settings say; the database check reports the outage
            rows = switch_layout(s.server_name, s.port("switch"), s.switches)
            source = f"{root} (database unreachable: {type(e.orig or e).__name__}; Switch ports from quanta.toml)"
        finally:
            engine.dispose()
    sw = tuple(_row(r) for r in rows)
    return LiveConfig(s, sw, databases(s, root), source)


def _row(r: dict[str, Any]) -> SwitchRow:
    return SwitchRow(str(r["Name"]), str(r["Host"]), int(r["Port"]), bool(r.get("Enabled", True)))


# ------------------------------------------------------------------------------- rows
Direction = Literal["Incoming", "Outgoing", "Incoming and outgoing", "none"]
Kind = Literal["flow", "local", "not-used", "none"]


@dataclass
class Row:
    device: str
    port: str  # "TCP 4000", "UDP 1434", "TCP 135 and 445", "none: embedded SQLite file"
    protocol: str
    direction: str
    usage: str
    configurable: str
    setting: str | None
    # not rendered in the JSON/markdown; used by nftables and preflight
    kind: Kind = "flow"
    numbers: tuple[int, ...] = ()
    transport: str = "tcp"
    component: str = ""  # this side's component
    peer_device: str = ""
    peer_component: str = ""
    label: str = ""  # short name of the flow (nftables comment, preflight)
    check: dict[str, Any] = field(default_factory=dict)  # how preflight probes the flow

    def as_json(self) -> dict[str, Any]:
        return {"device": self.device, "port": self.port, "protocol": self.protocol, "direction": self.direction,
                "usage": self.usage, "configurable": self.configurable, "setting": self.setting}


@dataclass(frozen=True)
class Flow:
    src: str  # client component
    dst: str  # server component
    port_name: str  # settings port name
    number: int
    protocol: str
    label: str
    usage_out: str  # the client's side: what it does
    usage_in: str  # the server's side
    configurable: str
    setting: str
    check: dict[str, Any] = field(default_factory=dict)


WSS = "WebSocket Secure (wss)"
WS = "WebSocket (ws)"


def _configurable(name: str) -> str:
    return {
        "https": "Yes: at init (quanta init --https-port) or ports.https in quanta.toml; agents' BackgroundChannelUrl "
                 "and browser URLs must follow",
        "http": "Yes: quanta init --port http=N or ports.http in quanta.toml; a port other than 80 goes in the URL",
        "switch": "Yes, after install: the Port column of SwitchConfiguration (quanta init --switch-port N); every "
                  "agent's Switch=<host>:<port> must be changed to match",
        "poke": "Follows the Switch client port: always client port + 1, never set on its own",
        "hub": "Yes, but not recommended: ports.hub in quanta.toml",
        "core": "Yes, but not recommended: ports.core in quanta.toml",
        "smtp": "Yes: ports.smtp; anonymous by default, authentication and TLS can be set after install",
        "integrate": "Yes, after install: ports.integrate in quanta.toml",
        "interaction": "Yes, at enrolment: agent setting Module.Interaction.Port (ports.interaction)",
        "database": "Yes: database_url (quanta init --database-url)",
        "coordinator": "Internal: ports.coordinator in quanta.toml",
    }.get(name, f"Yes: ports.{name} in quanta.toml")


def _setting(name: str) -> str:
    return {"switch": "SwitchConfiguration.Port", "poke": "SwitchConfiguration.Port + 1"}.get(name, f"ports.{name}")


def flows(cfg: LiveConfig, placement: dict[str, str]) -> list[Flow]:
    """Every flow between two components, with this configuration's port numbers."""
    s = cfg.settings
    https, http = s.port("https"), s.port("http")
    out: list[Flow] = []

    def add(src: str, dst: str, name: str, number: int, protocol: str, label: str, usage_out: str,
            usage_in: str, **check: Any) -> None:
        if src in placement and dst in placement:
            out.append(Flow(src, dst, name, number, protocol, label, usage_out, usage_in, _configurable(name),
                            _setting(name), check))

    add("browsers", "web", "https", https, "HTTPS", "browsers and CLI to Portal/Consumer API",
        f"Browsers and the quanta CLI open the Portal and the Consumer API at https://<server>:{https}/Consumer; "
        "the browser starts the connection. A port other than 443 goes in the URL.",
        f"Web tier: Portal and Consumer API (https, /Consumer) for browsers and the quanta CLI; set by ports.https.",
        service="https", path="/Consumer/health", component="web tier")
    add("clients", "background", "https", https, "HTTPS", "agents to Background Channel",
        f"Agents fetch instruction resources from the Background Channel; the agent starts it "
        f"(agent.conf BackgroundChannelUrl=https://<server>:{https}/Background).",
        "Background Channel (https, /Background): agents fetch instruction resources; set by ports.https.",
        service="https", path="/Consumer/health", component="web tier (Background Channel)")
    for sw in cfg.enabled_switches:
        add("clients", "switch", "switch", sw.port, WSS, f"agents to Switch {sw.name}",
            f"Agents start and keep a WebSocket Secure connection (mutual TLS) to Switch {sw.name}, which sends "
            f"instructions back over it. Agent setting Switch=<host>:{sw.port} must match SwitchConfiguration.Port.",
            f"Switch {sw.name} client port (wss, mutual TLS): agents connect and stay connected; set in "
            f"SwitchConfiguration.Port.",
            service="wss", path="/agent", component=f"Switch {sw.name}")
    catalog_path = "/Catalog"
    with_crl = placement.get("catalog") == placement.get("http")
    add("browsers", "catalog", "http", http, "HTTP", "browsers to Catalog UI/API" + (" and CRL" if with_crl else ""),
        f"Browsers open the Catalog UI at http://<server>:{http}{catalog_path}; a port other than 80 goes in the URL.",
        f"HTTP tier: Catalog UI/API ({catalog_path})"
        + (" and the CRL distribution point (/crl.pem)" if with_crl else "") + "; set by ports.http.",
        service="http", path="/health", component="HTTP tier (Catalog, CRL distribution point)")
    add("coordinator", "mail", "smtp", s.port("smtp"), "SMTP", "Coordinator email",
        f"The Coordinator sends email notifications to the SMTP server on TCP {s.port('smtp')}; anonymous by "
        "default.", "SMTP server receiving Quanta's email notifications.",
        service="smtp", component="SMTP server")
    # Consumer API -> Core: loopback ws inside one host, https /Core across hosts
    if placement.get("web") != placement.get("core"):
        add("web", "core", "https", https, "HTTPS", "Consumer API to Core",
            f"The Consumer API on the Master Stack calls the Core at https://<response-stack>:{https}/Core (used "
            "only with a remote Response Stack).",
            "The Core (https, /Core) answers the Master Stack's Consumer API; set by ports.https.",
            service="https", path="/Consumer/health", component="Response Stack web tier (/Core)")
    else:
        add("web", "core", "core", s.port("core"), WS, "Consumer API to Core",
            f"The Consumer API calls the Core's internal endpoint on {s.internal_host}:{s.port('core')}.",
            f"Core internal endpoint (ws, {s.internal_host}, no TLS).", service="tcp", component="Core")
    add("core", "hub", "hub", s.port("hub"), WSS, "Response Stack to Master hub",
        f"The Response Stack connects to the Master event hub on TCP {s.port('hub')}: it registers, streams device "
        "state and receives config pushes (Switch configuration, revocations, cancellations).",
        "Master event hub (wss, mutual TLS: host certificates of the installation CA): Response Stacks and DMZ "
        "Switch Hosts register and stream device state.",
        service="tcp", component="Master event hub")
    for sw in cfg.enabled_switches:
        pk = poke_port(sw.port)
        add("core", "switch", "poke", pk, "TCP", f"Core pokes Switch {sw.name}",
            f"The Core pokes Switch {sw.name} on TCP {pk} (its client port {sw.port} + 1) to say work is waiting "
            "(a 40-byte authenticated message).",
            f"Switch {sw.name} poke port = client port {sw.port} + 1: the Core says work is waiting.",
            service="tcp", component=f"Switch {sw.name} poke listener")
        add("switch", "core", "core", s.port("core"), WS, f"Switch {sw.name} to Core",
            f"Switch {sw.name} streams to the Core's internal endpoint ({s.internal_host}:{s.port('core')}).",
            "Core internal endpoint (ws, no TLS; loopback or LAN only).", service="tcp", component="Core")
    # DMZ: a Switch and a Background Channel for internet-facing agents
    for sw in cfg.enabled_switches:
        pk = poke_port(sw.port)
        add("core", "dmz_switch", "poke", pk, "TCP", f"Core pokes DMZ Switch {sw.name}",
            f"The Core pokes the DMZ Switch {sw.name} on TCP {pk} (client port {sw.port} + 1).",
            f"DMZ Switch {sw.name} poke port = client port {sw.port} + 1: the Core says work is waiting.",
            service="tcp", component=f"DMZ Switch {sw.name} poke listener")
        add("inet_clients", "dmz_switch", "switch", sw.port, WSS, f"internet agents to DMZ Switch {sw.name}",
            f"Internet-facing agents start and keep a WebSocket Secure connection to the DMZ Switch {sw.name} "
            f"(Switch=<dmz-host>:{sw.port}); a matching Switch must use the same port.",
            f"DMZ Switch {sw.name} client port (wss, mutual TLS) for internet-facing agents; set in "
            "SwitchConfiguration.Port.", service="wss", path="/agent", component=f"DMZ Switch {sw.name}")
    add("inet_clients", "dmz_background", "https", https, "HTTPS", "internet agents to DMZ Background Channel",
        f"Internet-facing agents fetch resources from the DMZ Background Channel "
        f"(BackgroundChannelUrl=https://<dmz-host>:{https}/Background).",
        "DMZ Background Channel (https, /Background) for internet-facing agents; set by ports.https.",
        service="https", path="/Consumer/health", component="DMZ web tier")
    add("dmz_switch", "core", "https", https, "HTTPS", "DMZ Switch and Background Channel to Core",
        f"The DMZ Switch and Background Channel call the Core at https://<response-stack>:{https}/Core.",
        "The Core (https, /Core) answers the DMZ Switch and Background Channel.",
        service="https", path="/Consumer/health", component="Response Stack web tier (/Core)")
    add("dmz_switch", "hub", "hub", s.port("hub"), WSS, "DMZ Switch Host to Master hub",
        f"The DMZ Switch Host connects to the Master event hub on TCP {s.port('hub')} (registration, device state, "
        "config pushes).", "Master event hub (wss, mutual TLS) for the DMZ Switch Host.", service="tcp",
        component="Master event hub")
    add("dmz_switch", "http", "http", http, "HTTP", "DMZ to CRL distribution point",
        f"The DMZ Server fetches the CRL from the distribution point http://<master>:{http}/crl.pem to validate "
        "client certificates.", "CRL distribution point (/crl.pem on the HTTP tier).",
        service="http", path="/crl.pem", component="HTTP tier (CRL distribution point)")
    add("web", "dmz_background", "https", https, "HTTPS", "Master to DMZ Background Channel",
        f"The Master Stack replicates Background Channel content to the DMZ web tier over https on {https}.",
        "DMZ web tier receives Background Channel content from the Master Stack.",
        service="https", path="/Consumer/health", component="DMZ web tier")
    # remote Catalog
    if placement.get("web") != placement.get("catalog"):
        add("web", "catalog", "http", http, "HTTP", "Master to Catalog",
            f"The Master Stack calls the Catalog API at http://<catalog>:{http}{catalog_path}; a port other than 80 "
            "is configured by hand (ports.http).", "Catalog API (http) for the Master Stack.",
            service="http", path="/health", component="Catalog HTTP tier")
    return out


def _db_users(placement: dict[str, str], db: Database) -> list[str]:
    """Hosts whose components open this database (Core, Consumer API, Catalog use the master one)."""
    comps = {"master": ("web", "core", "catalog"), "responses": ("web", "core"),
             "master and responses": ("web", "core", "catalog")}[db.role]
    hosts: list[str] = []
    for c in comps:
        h = placement.get(c)
        if h and h not in hosts:
            hosts.append(h)
    return hosts


def _db_rows(cfg: LiveConfig, placement: dict[str, str]) -> tuple[list[Row], list[Row]]:
    """Quanta's database rows, and the seed's SQL Server rows marked not used."""
    rows: list[Row] = []
    unused: list[Row] = []
    what = {"master": "Master database", "responses": "Responses database",
            "master and responses": "Master and Responses databases"}
    for db in cfg.databases:
        users = _db_users(placement, db)
        title = what[db.role]
        if db.embedded:
            for h in users:
                title = what[db.role] if h in _db_users(placement, Database("responses", "", None, None, None, "")) \
                    else "Master database (Catalog data)"
                rows.append(Row(h, "none: embedded SQLite file", "SQLite (file)", "none",
                                f"{title}: {db.where()} on this host; nothing crosses the network. "
                                "Set database_url to use PostgreSQL (required when components are on several hosts).",
                                _configurable("database"), db.setting, kind="none", component="database",
                                label=f"{title} (SQLite)", check={"service": "sqlite", "url_role": db.role}))
            rows.append(Row(DATABASE, "none: embedded SQLite file", "SQLite (file)", "none",
                            f"No database server: the {title.lower()} are embedded SQLite files on the Quanta server."
                            if "and" in db.role else
                            f"No database server: the {title.lower()} is an embedded SQLite file on the Quanta server.",
                            _configurable("database"), db.setting, kind="none", component="database",
                            label=f"{what[db.role]} (SQLite)"))
            title = what[db.role]
        else:
            for h in users:
                rows.append(Row(h, f"TCP {db.port}", db.kind, "Outgoing",
                                f"{title}: Quanta connects to {db.where()} ({db.setting}).",
                                _configurable("database"), db.setting, numbers=(db.port,), component="database-client",
                                peer_device=DATABASE, peer_component="database", label=f"{title} at {db.host}",
                                check={"service": "database", "url_role": db.role, "host": db.host,
                                       "component": f"{db.kind} server", "port": db.port}))
            rows.append(Row(DATABASE, f"TCP {db.port}", db.kind, "Incoming",
                            f"{title} at {db.where()}: the Quanta servers ({', '.join(users)}) connect.",
                            _configurable("database"), db.setting, numbers=(db.port,), component="database",
                            label=f"{title} at {db.host}"))
    # The model product's SQL Server rows: one per seed database (master, responses) and host
    by_role = {r: db for db in cfg.databases for r in ("master", "responses") if r in db.role}
    browsers: list[str] = []
    for role in ("master", "responses"):
        db = by_role[role]
        tds = (f"Not used by Quanta: Quanta does not use SQL Server (TDS). Its {role} database is "
               f"{'an embedded SQLite file' if db.embedded else db.where()} (see the database rows).")
        for h in _db_users(placement, Database(role, db.kind, None, None, None, "")):
            unused.append(_unused(h, "TCP 1433", "TDS", "Outgoing", tds))
            if h not in browsers:
                browsers.append(h)
        unused.append(_unused(DATABASE, "TCP 1433", "TDS", "Incoming", tds))
    for h in browsers:
        unused.append(_unused(h, "UDP 1434", "SQL Browser", "Outgoing",
                              "Not used by Quanta: there are no SQL Server named instances to look up; "
                              "a PostgreSQL port is fixed in database_url."))
    return rows, unused


def _unused(device: str, port: str, protocol: str, direction: str, reason: str) -> Row:
    return Row(device, port, protocol, direction, reason, "n/a", None, kind="not-used", component="none",
               label=reason)


def _local_rows(cfg: LiveConfig, placement: dict[str, str]) -> list[Row]:
    """Seed rows for flows that never leave one host: shown so the seed's row is there, no rule made."""
    s = cfg.settings
    rows = []
    if "integrate" in placement:
        rows.append(Row(placement["integrate"], f"TCP {s.port('integrate')}", WS, "Incoming and outgoing",
                        f"Integrate Agent: the Consumer API talks to it on this host only ({s.internal_host}:"
                        f"{s.port('integrate')}); remote installation is not supported, so no firewall opening is "
                        "needed.", _configurable("integrate"), "ports.integrate", kind="local", component="integrate",
                        numbers=(s.port("integrate"),), label="Integrate Agent (local only)"))
    for dev in (CLIENTS, INET_CLIENTS):
        if dev in placement.values():
            rows.append(Row(dev, f"TCP {s.port('interaction')}", "HTTPS", "Outgoing and incoming",
                            f"Agent interaction port: the device's own user session talks to the agent on loopback "
                            f"(Module.Interaction.Port={s.port('interaction')}); nothing crosses the network.",
                            _configurable("interaction"), "ports.interaction", kind="local", component="interaction",
                            numbers=(s.port("interaction"),), label="agent interaction port (local only)"))
    return rows


def _not_used_rows(placement: dict[str, str]) -> list[Row]:
    rows = []
    hosts = []
    for c in ("web", "catalog"):
        if placement.get(c) and placement[c] not in hosts:
            hosts.append(placement[c])
    for h in hosts:
        rows.append(_unused(h, "TCP 443", "HTTPS", "Outgoing",
                            "Not used by Quanta: the model product calls its vendor's cloud services here; Quanta has "
                            "no cloud dependency (catalog updates come from a file)."))
    web = placement["web"]
    rows.append(_unused(web, "TCP 1433", "TDS", "Outgoing",
                        "Not used by Quanta: the model product's inventory connectors read SQL Server databases; "
                        "Quanta has no inventory connectors (agents report inventory over their Switch connection)."))
    rows.append(_unused(web, "TCP 135 and 445", "WMI (DCOM)", "Outgoing",
                        "Not used by Quanta: no WMI/DCOM inventory providers or Content Distribution; Quanta is "
                        "cross-platform and agents answer over their Switch connection."))
    return rows


def build_table(cfg: LiveConfig, topology: str) -> list[Row]:
    """The firewall table of a topology: rows between hosts, plus local and not-used seed rows."""
    if topology not in PLACEMENT:
        raise ValueError(f"unknown topology {topology!r}; choose one of {', '.join(TOPOLOGIES)}")
    placement = PLACEMENT[topology]
    rows: list[Row] = []
    for f in flows(cfg, placement):
        a, b = placement[f.src], placement[f.dst]
        if a == b:
            continue
        rows.append(Row(a, f"TCP {f.number}", f.protocol, "Outgoing", f.usage_out, f.configurable, f.setting,
                        numbers=(f.number,), component=f.src, peer_device=b, peer_component=f.dst, label=f.label,
                        check=f.check))
        rows.append(Row(b, f"TCP {f.number}", f.protocol, "Incoming", f.usage_in, f.configurable, f.setting,
                        numbers=(f.number,), component=f.dst, peer_device=a, peer_component=f.src, label=f.label,
                        check=f.check))
    db_rows, db_unused = _db_rows(cfg, placement)
    rows += db_rows + _local_rows(cfg, placement) + db_unused + _not_used_rows(placement)
    order = {d: i for i, d in enumerate(DEVICE_ORDER)}
    kind_order = {"flow": 0, "none": 0, "local": 1, "not-used": 2}
    indexed = list(enumerate(rows))
    indexed.sort(key=lambda ir: (order[ir[1].device], kind_order[ir[1].kind], ir[0]))
    return [r for _, r in indexed]


def internal_rows(cfg: LiveConfig, topology: str = "single-server") -> list[Row]:
    """Flows inside one host (the seed's "Internal Server communications"), and every internal port."""
    placement = PLACEMENT[topology]
    rows: list[Row] = []
    seen: set[tuple[str, int]] = set()
    by_port: dict[tuple[str, int], Row] = {}
    for f in flows(cfg, placement):
        a, b = placement[f.src], placement[f.dst]
        if a != b:
            continue
        seen.add((f.port_name, f.number))
        if (a, f.number) in by_port:
            r = by_port[(a, f.number)]
            r.label += f"; {f.label}"
            r.usage = r.usage.rstrip(".") + f"; used by: {r.label}."
            continue
        r = Row(a, f"TCP {f.number}", f.protocol, "internal", f.usage_in, f.configurable, f.setting,
                numbers=(f.number,), component=f.dst, peer_device=a, peer_component=f.src, label=f.label,
                check=f.check)
        by_port[(a, f.number)] = r
        rows.append(r)
    s = cfg.settings
    for spec in PORTS_BY_NAME.values():
        if spec.name in ("database", "poke", "switch", "interaction", "smtp") or any(n == spec.name for n, _ in seen):
            continue
        if not spec.internal and spec.name not in ("https", "http"):
            continue
        n = s.port(spec.name)
        rows.append(Row(placement["web"], f"TCP {n}", spec.protocol, "internal",
                        f"{spec.listener} ({spec.clients or 'local'}); {spec.note}.",
                        _configurable(spec.name), _setting(spec.name), numbers=(n,), component=spec.name,
                        label=spec.listener))
    return rows


def host_of_role(topology: str, role: str) -> str:
    comp = ROLE_COMPONENT[role]
    if role == "agent":
        return CLIENTS
    placement = PLACEMENT[topology]
    if comp not in placement:
        raise ValueError(f"the {topology} topology has no {role} host; try --topology "
                         + {"dmz": "dmz", "catalog": "remote-catalog"}.get(role, "single-server"))
    return placement[comp]


def host_rules(rows: list[Row], device: str) -> list[tuple[str, int, list[Row]]]:
    """Incoming (transport, port) openings for one host, each with the rows it serves."""
    merged: dict[tuple[str, int], list[Row]] = {}
    for r in rows:
        if r.device == device and r.kind == "flow" and r.direction == "Incoming":
            for n in r.numbers:
                merged.setdefault((r.transport, n), []).append(r)
    return [(t, n, rs) for (t, n), rs in merged.items()]


DeviceFilter = Callable[[Row], bool]
