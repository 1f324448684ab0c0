"""Remote hosts of the seed's topologies: a remote Response Stack and a DMZ server.

``quanta host export MASTERDIR --role response|dmz ...`` writes the data directory for such a
host: its own server certificate and host certificate (its client identity towards the Master
hub, Purpose.HOST; both issued by the installation CA, whose key stays on the Master), the CA
certificate, the CRL, the instruction-signing public key, the internal secret,
and settings that point it at the Master hub, the Core and the CRL distribution point. It also
records the host's Switches in SwitchConfiguration and, for a DMZ server, adds its Background
Channel to the Master's content replication list. Copy the directory to that host and run
``quanta server DIR`` there.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from quanta.datadir import make_private_dir, tighten
from quanta.db import is_sqlite, make_engine
from quanta.db.tables import switch_configuration
from quanta.pki import Pki, Purpose
from quanta.settings import DataDir, Settings, load_settings, save_settings, switch_layout


class TopologyError(ValueError):
    pass


def export_host(master_root: Path, out: Path, *, role: str, server_name: str, https_port: int,
                switch_port: int, switches: int = 1, ports: dict[str, int] | None = None,
                response_url: str | None = None) -> Settings:
    master = load_settings(master_root)
    mdd = DataDir(master_root)
    if role not in ("response", "dmz"):
        raise TopologyError("role must be response or dmz")
    if out.exists() and any(out.iterdir()):
        raise TopologyError(f"{out} is not empty")
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
        core_link = response_url.replace("https://", "wss://", 1).rstrip("/") + "/Core/Switch"
        settings = Settings(server_name=server_name, role="dmz", ports=merged, hub_url=hub,
                            crl_url=f"http://{master.server_name}:{master.port('http')}/crl.pem",
                            switch_core_url=core_link, local_switches=rows, switches=switches)
    make_private_dir(out)
    pki_out = out / "pki"
    make_private_dir(pki_out)
    src = Pki(mdd.pki)
    for f in ("ca.crt", "crl.pem", "signing.pub", "internal.secret"):
        shutil.copy(mdd.pki / f, pki_out / f)
    os.chmod(pki_out / "internal.secret", 0o600)
    src.issue(server_name, pki_out / "server.crt", pki_out / "server.key", purpose=Purpose.SERVER,
              san=[server_name, "localhost", "127.0.0.1"])
    # its identity towards the Master hub (mutual TLS): a host certificate, not a server or device one
    src.issue(server_name, pki_out / "host.crt", pki_out / "host.key", purpose=Purpose.HOST)
    save_settings(out, settings)
    tighten(out)  # the exported directory holds the internal secret and a server key: owner only
    # the Master learns about the new host
    engine = make_engine(mdd.master_url(master))
    with engine.begin() as c:
        c.execute(switch_configuration.delete().where(switch_configuration.c.Host == server_name))
        c.execute(switch_configuration.insert(), rows)
    changes: dict[str, object] = {}
    if master.role == "single":
        changes["role"] = "master"  # the Master now leaves Core and Switches to the remote hosts
        with engine.begin() as c:
            c.execute(switch_configuration.delete().where(switch_configuration.c.Host == master.server_name))
    if role == "response":
        changes["core_url"] = f"https://{server_name}:{https_port}"
    else:
        changes["replicate_to"] = sorted(set(master.replicate_to) | {f"https://{server_name}:{https_port}"})
    if changes:
        save_settings(master_root, master.model_copy(update=changes))
    return settings

