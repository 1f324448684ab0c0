"""Remote hosts of the seed's topologies: a remote Response Stack and a DMZ server.

``quanta host export MASTERDIR --role response|dmz ...`` writes the data directory for such a
host: its own server certificate and host certificate (its client identity towards the Master
hub, Purpose.HOST; both issued by the installation CA, whose key stays on the Master), the CA
certificate, the CRL, the instruction-signing public key, the internal credentials of the hops
its role uses (``pki/internal.credentials``, quanta.internal.ROLE_HOPS: never the installation
secret, from which every hop's could be derived), and settings that point it at the Master hub, the Core and the CRL distribution point.

The Master learns about the new host only when asked (``--update-master``): that records the
host's Switches in SwitchConfiguration, and on a single server turns it into a Master (role =
master: it stops running its own Core and Switches, so its own Switch rows go), points it at the
remote Core (response) or adds the DMZ server's Background Channel to its content replication
list. :func:`plan_export` says all of that before anything is written (``--dry-run`` prints it
and stops); :func:`apply_export` does it. Copy the directory to that host and run
``quanta server DIR`` there.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quanta.datadir import make_private_dir, tighten, write_private
from quanta.db import is_sqlite, make_engine
from quanta.db.tables import switch_configuration
from quanta.internal import CREDENTIALS_FILE, ROLE_HOPS, Credentials, hop_name
from quanta.pki import Pki, Purpose
from quanta.settings import DataDir, Settings, load_settings, save_settings, switch_layout


class TopologyError(ValueError):
    pass


HOSTS_FILE = "hosts.json"  # in the Master's data directory: every host exported from it


def exported_hosts(master_root: Path) -> dict[str, dict[str, Any]]:
    """name -> {role, out, listens: {what: port}} of every host exported from this Master."""
    f = Path(master_root) / HOSTS_FILE
    if not f.exists():
        return {}
    try:
        data = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise TopologyError(f"{f} is unreadable ({e}): it lists the hosts exported from this Master; "
                            "repair or remove it") from None
    return {str(k): v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}


def _record_host(plan: ExportPlan) -> None:
    hosts = exported_hosts(plan.master_root)
    hosts[plan.server_name] = {"role": plan.role, "out": str(plan.out.resolve()), "listens": listens(plan.settings)}
    write_private(Path(plan.master_root) / HOSTS_FILE, (json.dumps(hosts, indent=1, sort_keys=True) + "\n").encode())


def listens(settings: Settings) -> dict[str, int]:
    """The ports ``quanta server`` opens on a host of this role (quanta.status.ROLE_COMPONENTS),
    by what listens there."""
    out = {"https": settings.port("https")}
    if settings.role in ("single", "response"):
        out["core"] = settings.port("core")
    if settings.role in ("single", "master"):
        out |= {k: settings.port(k) for k in ("http", "hub", "coordinator", "integrate")}
    if settings.role != "master":
        base = settings.port("switch")
        for i in range(max(1, settings.switches)):
            out[f"switch {i + 1}"] = base + 2 * i
            out[f"switch {i + 1} poke"] = base + 2 * i + 1
    return out


def _addresses(name: str) -> set[str]:
    try:
        return {str(a[4][0]) for a in socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)}
    except (OSError, UnicodeError):
        return {name}


def same_machine(a: str, b: str) -> bool:
    """True when two host names are this one machine: an address in common, or both loopback
    (127.0.0.2 and 127.0.0.3 are the same kernel: a port bound on 0.0.0.0 is taken on both)."""
    if a == b:
        return True
    aa, bb = _addresses(a), _addresses(b)
    if aa & bb:
        return True

    def loopback(xs: set[str]) -> bool:
        try:
            return bool(xs) and all(ipaddress.ip_address(x).is_loopback for x in xs)
        except ValueError:
            return False
    return loopback(aa) and loopback(bb)


def _port_clash(mine: dict[str, int], theirs: dict[str, int]) -> tuple[str, str, int] | None:
    by_port = {v: k for k, v in theirs.items()}
    for what, port in sorted(mine.items(), key=lambda kv: kv[1]):
        if port in by_port:
            return what, by_port[port], port
    return None


@dataclass
class ExportPlan:
    master_root: Path
    out: Path
    role: str
    server_name: str
    settings: Settings  # the exported host's
    rows: list[dict[str, Any]]  # its Switches, for the Master's SwitchConfiguration
    master_changes: dict[str, Any] = field(default_factory=dict)  # quanta.toml keys of the Master
    drop_master_switches: list[str] = field(default_factory=list)  # the Master's own Switch rows to delete
    replaced_rows: list[str] = field(default_factory=list)  # earlier rows of this host name, replaced
    reuse_out: bool = False  # the directory already holds this host's export
    drop_secret: bool = False  # that earlier export holds the installation secret: replace it

    def describe(self) -> list[str]:
        """What writing the directory and updating the Master would change, one line each."""
        lines = [f"{'keep' if self.reuse_out else 'write'} {self.out}: data directory of {self.role} host "
                 f"{self.server_name} (https {self.settings.port('https')}, switch {self.settings.port('switch')})"]
        if self.drop_secret:
            lines.append(f"replace {self.out / 'pki' / 'internal.secret'} (the installation secret) with "
                         f"{CREDENTIALS_FILE} ({', '.join(hop_name(h) for h in ROLE_HOPS[self.role])}): copy the "
                         "directory to the host again and delete internal.secret there")
        for r in self.rows:
            lines.append(f"master: add Switch {r['Name']} ({r['Host']}:{r['Port']}) to SwitchConfiguration")
        for name in self.replaced_rows:
            lines.append(f"master: replace the earlier SwitchConfiguration row {name}")
        for name in self.drop_master_switches:
            lines.append(f"master: remove its own Switch {name} (a Master runs no Switch: agents of it go offline "
                         "until they dial a remote Switch)")
        for k, v in self.master_changes.items():
            extra = " (it stops running its own Core and Switch Host)" if k == "role" else ""
            lines.append(f"master: set {k} = {v!r} in quanta.toml{extra}")
        return lines


def plan_export(master_root: Path, out: Path, *, role: str, server_name: str, https_port: int,
                switch_port: int, switches: int = 1, ports: dict[str, int] | None = None,
                response_url: str | None = None, replace: bool = False) -> ExportPlan:
    """Check everything and say what an export would change; nothing is written.

    Several Response Stacks may be exported from one Master (they share its PostgreSQL
    databases; ``quanta.core.stacks``). Refused, with one error and nothing written: a name
    already exported to another directory (unless ``replace``), and a host that would listen on a
    port another host exported from this Master (or the Master itself) opens on the same machine."""
    master = load_settings(master_root)
    mdd = DataDir(master_root)
    if role not in ("response", "dmz"):
        raise TopologyError("role must be response or dmz")
    if not mdd.secret_file.exists():
        raise TopologyError(f"{master_root} holds no installation secret ({mdd.secret_file}): export hosts from "
                            "the Master's data directory")
    if server_name == master.server_name:
        raise TopologyError(f"{server_name!r} is this Master's own name: give the remote host's name")
    reuse = False
    if out.exists():
        if not out.is_dir():
            raise TopologyError(f"{out} exists and is not a directory")
        if any(out.iterdir()):
            try:
                prior = load_settings(out)
            except (OSError, ValueError):
                prior = None
            if prior is None or prior.server_name != server_name or prior.role != role:
                raise TopologyError(f"{out} is not empty")
            reuse = True  # an earlier export of the same host: only the Master's side is left to do
    hosts = exported_hosts(master_root)
    prior_host = hosts.get(server_name)
    if prior_host is not None and not replace and Path(prior_host.get("out", "")) != out.resolve():
        raise TopologyError(f"a {prior_host.get('role')} host named {server_name!r} was already exported from this "
                            f"Master to {prior_host.get('out')}: give each host its own --server-name, or export "
                            f"it again into {prior_host.get('out')}, or pass --replace to make this one replace it")
    hub = f"wss://{master.server_name}:{master.port('hub')}/Hub"  # mutual TLS (quanta.hub)
    merged = dict(master.ports) | (ports or {}) | {"https": https_port, "switch": switch_port}
    rows = switch_layout(server_name, switch_port, switches, prefix=f"{server_name}-")
    if role == "response":
        if is_sqlite(mdd.master_url(master)):
            raise TopologyError("a remote Response Stack shares the Master's databases: initialise the Master "
                                "with --database-url postgresql://... first")
        settings = Settings(server_name=server_name, role="response", ports=merged,
                            database_url=mdd.master_url(master), responses_database_url=mdd.responses_url(master),
                            hub_url=hub, switches=switches)
    else:
        if not response_url:
            raise TopologyError("a DMZ server needs --response-url https://<response stack>:<https port>")
        if not response_url.startswith("https://"):
            raise TopologyError(f"--response-url {response_url!r}: give https://<response stack>:<https port>")
        core_link = response_url.replace("https://", "wss://", 1).rstrip("/") + "/Core/Switch"
        settings = Settings(server_name=server_name, role="dmz", ports=merged, hub_url=hub,
                            crl_url=f"http://{master.server_name}:{master.port('http')}/crl.pem",
                            switch_core_url=core_link, local_switches=rows, switches=switches)
    if reuse:
        settings = load_settings(out)
    mine = listens(settings)
    others = [(n, f"{h.get('role', '?')} host", h.get("listens") or {}) for n, h in hosts.items() if n != server_name]
    # the Master as it is once told (--update-master): a Master runs no Core and no Switch
    as_master = master.model_copy(update={"role": "master"})
    others.append((master.server_name, "the Master", listens(as_master)))
    for name, other_role, theirs in others:
        clash = _port_clash(mine, {str(k): int(v) for k, v in theirs.items()})
        if clash is not None and same_machine(server_name, name):
            what, their_what, port = clash
            raise TopologyError(f"{server_name} would listen on port {port} ({what}), which {other_role} {name} "
                                f"on the same machine already uses ({their_what}): give this host other ports "
                                "(--https-port, --switch-port, --port core=...)")
    plan = ExportPlan(master_root, out, role, server_name, settings, rows, reuse_out=reuse,
                      drop_secret=reuse and (out / "pki" / "internal.secret").exists())
    with make_engine(mdd.master_url(master)).connect() as c:
        existing = [dict(r._mapping) for r in c.execute(switch_configuration.select())]
    plan.replaced_rows = sorted(r["Name"] for r in existing if r["Host"] == server_name)
    if master.role == "single":
        plan.master_changes["role"] = "master"
        plan.drop_master_switches = sorted(r["Name"] for r in existing if r["Host"] == master.server_name)
    if role == "response":
        # the Master sends each instruction to one Core; the other stacks' Cores follow it from the
        # shared database (quanta.core.stacks). The first stack stays that Core unless it is re-exported.
        current = master.core_url
        primary = f"https://{server_name}:{https_port}"
        keep = (current is not None and current.startswith("https://") and current != primary
                and _url_host(current) != server_name and _url_host(current) in hosts)
        if not keep:
            plan.master_changes["core_url"] = primary
    else:
        wanted = sorted(set(master.replicate_to) | {f"https://{server_name}:{https_port}"})
        if wanted != sorted(master.replicate_to):
            plan.master_changes["replicate_to"] = wanted
    return plan


def _url_host(url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(url).hostname or ""


def write_host_dir(plan: ExportPlan) -> None:
    """The exported host's data directory (certificates issued by the Master's CA), recorded in
    the Master's ``hosts.json``."""
    _record_host(plan)
    if plan.reuse_out:
        if plan.drop_secret:  # exported before hosts were given only their hops' credentials
            write_credentials(plan)
        return
    mdd = DataDir(plan.master_root)
    out = plan.out
    make_private_dir(out)
    pki_out = out / "pki"
    make_private_dir(pki_out)
    src = Pki(mdd.pki)
    for f in ("ca.crt", "crl.pem", "signing.pub"):
        shutil.copy(mdd.pki / f, pki_out / f)
    write_credentials(plan)
    src.issue(plan.server_name, pki_out / "server.crt", pki_out / "server.key", purpose=Purpose.SERVER,
              san=[plan.server_name, "localhost", "127.0.0.1"])
    # its identity towards the Master hub (mutual TLS): a host certificate, not a server or device one
    src.issue(plan.server_name, pki_out / "host.crt", pki_out / "host.key", purpose=Purpose.HOST)
    save_settings(out, plan.settings)
    tighten(out)  # the exported directory holds internal credentials and a server key: owner only


def write_credentials(plan: ExportPlan) -> None:
    """The host's ``pki/internal.credentials`` (0600): its role's hops only; an installation secret
    an earlier export left there is removed."""
    pki_out = plan.out / "pki"
    text = Credentials.of(plan.master_root).file_text(ROLE_HOPS[plan.role])
    write_private(pki_out / CREDENTIALS_FILE, text.encode())
    (pki_out / "internal.secret").unlink(missing_ok=True)


def update_master(plan: ExportPlan) -> None:
    """Tell the Master about the host: SwitchConfiguration rows and quanta.toml, as planned."""
    master = load_settings(plan.master_root)
    engine = make_engine(DataDir(plan.master_root).master_url(master))
    with engine.begin() as c:
        c.execute(switch_configuration.delete().where(switch_configuration.c.Host == plan.server_name))
        c.execute(switch_configuration.insert(), plan.rows)
        if plan.drop_master_switches:
            c.execute(switch_configuration.delete().where(switch_configuration.c.Host == master.server_name,
                                                         switch_configuration.c.Name.in_(plan.drop_master_switches)))
    if plan.master_changes:
        save_settings(plan.master_root, master.model_copy(update=plan.master_changes))


def apply_export(plan: ExportPlan, *, update: bool) -> None:
    write_host_dir(plan)
    if update:
        update_master(plan)


def export_host(master_root: Path, out: Path, *, role: str, server_name: str, https_port: int,
                switch_port: int, switches: int = 1, ports: dict[str, int] | None = None,
                response_url: str | None = None, update: bool = False, replace: bool = False) -> Settings:
    """Plan and apply in one call (the Master is changed only with ``update``); the host's settings."""
    plan = plan_export(master_root, out, role=role, server_name=server_name, https_port=https_port,
                       switch_port=switch_port, switches=switches, ports=ports, response_url=response_url,
                       replace=replace)
    apply_export(plan, update=update)
    return plan.settings
