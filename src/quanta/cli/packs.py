"""``quanta pack ...``: signed product packs of instruction definitions."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from quanta.cli.common import DirArg, _fail, app, master_engine, out


pack_app = typer.Typer(help="Signed product packs of instruction definitions.", no_args_is_help=True)
app.add_typer(pack_app, name="pack")


@pack_app.command("keygen")
def pack_keygen(name: Annotated[str, typer.Option(help="publisher name")],
                out_dir: Annotated[Path, typer.Option("--out")] = Path(".")) -> None:
    """Create a publisher key pair (NAME.key stays with the publisher; NAME.pub goes to servers)."""
    from quanta.definitions import keygen

    priv, pub = keygen(out_dir, name)
    out.print(f"wrote {priv} (keep it secret) and {pub}", highlight=False)


@pack_app.command("build")
def pack_build(source: Path, key: Annotated[Path, typer.Option(help="publisher private key")],
               out_file: Annotated[Path, typer.Option("--out")]) -> None:
    """Sign a pack directory (pack.toml, definitions/, resources/) into a zip."""
    from quanta.definitions import PackError, build

    try:
        build(source, key, out_file)
    except PackError as e:
        _fail(f"error: {e}", 2)
    out.print(f"signed pack written to {out_file}", highlight=False)


@pack_app.command("trust")
def pack_trust(root: DirArg, name: Annotated[str, typer.Option(help="publisher name")],
               key: Annotated[Path, typer.Option(help="publisher public key (PEM)")]) -> None:
    """Trust a publisher: packs it signs may be imported."""
    from quanta.db import store
    from quanta.definitions import PackError, trust

    master = master_engine(root)
    try:
        trust(master, name, key.read_bytes())
    except (PackError, ValueError) as e:
        _fail(f"error: {e}", 2)
    store.audit(master, "quanta pack trust", "publisher_trust", name)
    out.print(f"trusting publisher {name}", highlight=False)


@pack_app.command("import")
def pack_import(root: DirArg, pack_file: Path) -> None:
    """Verify and import a signed pack (all or nothing)."""
    from quanta.background import ContentStore
    from quanta.db import store
    from quanta.definitions import PackError, import_pack
    from quanta.settings import DataDir

    dd = DataDir(root)
    master = master_engine(root)
    try:
        pack = import_pack(master, pack_file.read_bytes(), ContentStore(dd.content))
    except PackError as e:
        store.audit(master, "quanta pack import", "pack_refused", str(pack_file), reason=str(e))
        _fail(f"pack refused: {e}", 2)
        return
    store.audit(master, "quanta pack import", "pack_import", pack.info.name, version=pack.info.version,
                publisher=pack.info.publisher)
    out.print(f"imported {pack.info.name} {pack.info.version} from {pack.info.publisher}: "
              f"{', '.join(d.name for d in pack.definitions)}", highlight=False)


