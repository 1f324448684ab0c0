"""``quanta catalog ...``: registered by quanta.cli."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

DirArg = Annotated[Path, typer.Argument(help="data directory (a server's, or a Catalog server's own)")]
catalog_app = typer.Typer(help="Software catalog: normalisation rules, API keys, the Catalog server.",
                          no_args_is_help=True)
key_app = typer.Typer(help="Catalog API keys.", no_args_is_help=True)
catalog_app.add_typer(key_app, name="key")


def _fail(msg: str, code: int = 2) -> None:
    print(msg, file=sys.stderr)
    raise typer.Exit(code)


def _engine(root: Path):  # type: ignore[no-untyped-def]
    from quanta.settings import load_settings

    from .db import catalog_db_url, open_catalog

    try:
        settings = load_settings(root)
    except FileNotFoundError as e:
        _fail(f"error: {e}")
    return open_catalog(catalog_db_url(root, settings))


@catalog_app.command("import")
def import_(root: DirArg, file: Annotated[Path, typer.Argument(help="rule file (TOML, see docs/architecture.md)")],
            check: Annotated[bool, typer.Option("--check", help="validate only; change nothing")] = False) -> None:
    """Load a rule file, replacing every rule. A bad file is refused (line and reason) and changes nothing."""
    from quanta.db import store as master_store

    from .rules import RuleFileError, parse_rule_file
    from .store import import_rules

    try:
        data = file.read_bytes()
    except OSError as e:
        _fail(f"error: cannot read {file}: {e.strerror}")
        return
    try:
        if check:
            rf = parse_rule_file(data)
        else:
            engine = _engine(root)
            rf = import_rules(engine, data, str(file.resolve()))
    except RuleFileError as e:
        _fail(f"error: {file}: {e}; nothing was changed")
        return
    if check:
        print(f"{file}: valid: rule set {rf.name} {rf.version}, {len(rf.rule)} rules")
        return
    try:  # the master's audit log, when the catalog shares the master database
        from quanta.settings import DataDir, load_settings

        from quanta.db import make_engine

        s = load_settings(root)
        if s.catalog_database_url is None and (DataDir(root).master_db.exists() or s.database_url):
            master_store.audit(make_engine(DataDir(root).master_url(s)), "quanta catalog import", "catalog_import",
                               str(file), name=rf.name, version=rf.version, rules=len(rf.rule))
    except Exception:  # noqa: BLE001 - a Catalog-only host has no audit log
        pass
    print(f"imported rule set {rf.name} {rf.version}: {len(rf.rule)} rules from {file}")


@key_app.command("add")
def key_add(root: DirArg, name: Annotated[str, typer.Option(help="who uses the key, e.g. master")],
            save: Annotated[bool, typer.Option("--save", help="also write it to DIR/catalog.key (mode 0600) "
                                                              "for this host's CLI and master")] = False) -> None:
    """Create a Catalog API key. It is printed once; only its hash is stored."""
    from .app import KEY_FILE
    from .store import add_key

    if not name or len(name) > 128:
        _fail("error: --name must be 1-128 characters")
    try:
        key = add_key(_engine(root), name)
    except ValueError as e:
        _fail(f"error: {e}")
        return
    if save:
        path = root / KEY_FILE
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
        print(f"saved to {path}", file=sys.stderr)
    print(key)


@key_app.command("list")
def key_list(root: DirArg) -> None:
    """List Catalog API key names."""
    from .store import list_keys

    for k in list_keys(_engine(root)):
        print(f"{k['name']}\tcreated {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(k['created_at']))}")


@key_app.command("remove")
def key_remove(root: DirArg, name: Annotated[str, typer.Option()]) -> None:
    """Remove (revoke) a Catalog API key."""
    from .store import remove_key

    if not remove_key(_engine(root), name):
        _fail(f"error: no Catalog API key named {name!r}")
    print(f"removed Catalog API key {name}")


@catalog_app.command("init")
def init(root: DirArg,
         database_url: Annotated[Optional[str], typer.Option(help="Catalog database URL; default SQLite DIR/catalog.db")]
         = None,
         port: Annotated[Optional[int], typer.Option(help="http port to serve on (default 80)")] = None,
         force: Annotated[bool, typer.Option(help="overwrite an existing data directory")] = False) -> None:
    """Create a data directory for a Remote Catalog server (settings and database, no PKI)."""
    from quanta.settings import DataDir, Settings, default_ports, save_settings

    from .db import open_catalog

    dd = DataDir(root)
    if dd.config.exists() and not force:
        _fail(f"error: {dd.config} exists (use --force to start over)")
    ports = default_ports()
    if port is not None:
        ports["http"] = port
    url = database_url or f"sqlite:///{dd.root.resolve() / 'catalog.db'}"
    try:
        settings = Settings(ports=ports, catalog_database_url=url)
    except ValueError as e:
        _fail(f"error: invalid settings: {e}")
        return
    dd.create_private()  # 0700, the database and keys 0600
    save_settings(root, settings)
    open_catalog(url)
    print(f"initialised Catalog server directory {dd.root}: http port {settings.port('http')}; "
          f"create a key with 'quanta catalog key add {root} --name master' and start it with "
          f"'quanta catalog serve {root}'")


@catalog_app.command("serve")
def serve(root: DirArg,
          https_port: Annotated[Optional[int], typer.Option(help="also serve the Catalog UI/API over HTTPS on this "
                                                                 "port; plain HTTP then serves only the CRL and health")]
          = None,
          cert: Annotated[Optional[Path], typer.Option(help="TLS certificate (PEM); default DIR/pki/server.crt")] = None,
          key: Annotated[Optional[Path], typer.Option(help="TLS private key (PEM); default DIR/pki/server.key")] = None,
          ) -> None:
    """Run the Catalog on its own (the http tier of a Remote Catalog server: /Catalog and /health);
    with --https-port, the Catalog UI/API over HTTPS only, so its API key never travels in clear."""
    from quanta.cli import _run_component
    from quanta.http_tier import serve as http_serve

    if https_port is None:
        _run_component(http_serve(root))
        return
    from .app import serve_https

    pki = root / "pki"
    cert, key = cert or pki / "server.crt", key or pki / "server.key"
    for what, p in (("certificate", cert), ("key", key)):
        if not p.is_file():
            _fail(f"error: no TLS {what} at {p}: give --cert and --key (e.g. a server certificate issued by the "
                  "installation CA, or your own)")
    _run_component(serve_https(root, https_port, cert, key))


def _client(root: Path):  # type: ignore[no-untyped-def]
    from .app import CatalogClient, CatalogError

    try:
        return CatalogClient.for_data_dir(root)
    except (CatalogError, FileNotFoundError) as e:
        _fail(f"error: {e}")


@catalog_app.command("normalize")
def normalize(root: DirArg, title: Annotated[Optional[str], typer.Option(help="raw title (product name)")] = None,
              version: Annotated[str, typer.Option(help="raw version")] = "",
              publisher: Annotated[str, typer.Option(help="raw publisher")] = "",
              file: Annotated[Optional[Path], typer.Option(help="JSON list of {publisher, title, version}")] = None
              ) -> None:
    """Normalise raw entries through the Catalog API (at settings.catalog_url) and print JSON."""
    from .app import CatalogError

    if file is not None:
        try:
            entries = json.loads(file.read_text())
        except (OSError, ValueError) as e:
            _fail(f"error: {file}: {e}")
            return
    elif title:
        entries = [{"publisher": publisher, "title": title, "version": version}]
    else:
        _fail("error: give --title (with --version/--publisher) or --file")
        return
    with _client(root) as api:
        try:
            print(json.dumps(api.normalize(entries), indent=1))
        except CatalogError as e:
            _fail(f"error: {e}")


@catalog_app.command("unmatched")
def unmatched(root: DirArg, q: Annotated[Optional[str], typer.Option(help="filter")] = None) -> None:
    """Raw entries seen that no rule matches (through the Catalog API)."""
    from .app import CatalogError

    with _client(root) as api:
        try:
            print(json.dumps(api.unmatched(q), indent=1))
        except CatalogError as e:
            _fail(f"error: {e}")


def register(app: typer.Typer) -> None:
    app.add_typer(catalog_app, name="catalog")
