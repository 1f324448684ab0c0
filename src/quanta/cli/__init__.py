"""The ``quanta`` command: one module per command group.

* :mod:`quanta.cli.common` -- the typer app, consoles, one-line errors, tables (table, csv, json)
* :mod:`quanta.cli.components` -- ``server``, ``core``, ``switch``, ``switch-host``, ``coordinator``,
  ``hub``, ``hub-client``, ``web``, ``agent``, ``prompt``, ``demo``, ``systemd``
* :mod:`quanta.cli.provisioning` -- ``init``, ``enroll``, ``revoke`` (the work: :mod:`quanta.provisioning`)
* :mod:`quanta.cli.client_cmds` -- ``login``, ``ask``, ``devices``, ``approve``, ``reject``, ``cancel``,
  ``approval-code``, ``results``, ``history``, ``export`` (from a data directory or a login profile)
* :mod:`quanta.cli.accounts` -- ``user ...``, ``audit``, ``role ...``, ``group ...``, ``smtp``
* :mod:`quanta.cli.packs` -- ``pack ...``
* :mod:`quanta.cli.host` -- ``host export``
* :mod:`quanta.cli.status` -- ``status``
* :mod:`quanta.cli.backup` -- ``backup``
* :mod:`quanta.cli.migrate` -- ``migrate``

``quanta ask`` and ``quanta agent`` are dispatched by :mod:`quanta.entry` before this package is
imported; ``quanta ask``'s arguments are defined once, in :mod:`quanta.ask`.
"""

from __future__ import annotations

from typing import Annotated

import typer

from quanta.cli.common import _fail, _run_component, app, console, out  # noqa: F401  (used by component CLIs)
from quanta.cli import components, provisioning, client_cmds, accounts, packs, host, status, backup, migrate  # noqa: E402,F401  (register)


def _version(value: bool) -> None:
    if value:
        from quanta.entry import version

        print(f"quanta {version()}")
        raise typer.Exit(0)


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", "-V", callback=_version, is_eager=True,
                                                help="print the version and exit")] = False) -> None:
    """Quanta: ask every device a question and get the answers in seconds."""


COMMAND_MODULES = ("quanta.ports.cli", "quanta.simulate.cli", "quanta.catalog.cli", "quanta.integrate.cli")


def _register_component_commands() -> None:
    import importlib
    import importlib.util

    from quanta.scale.cli import app as scale_app
    from quanta.scale.cli import methods_command

    app.add_typer(scale_app, name="scale", help="Author and run SCALE payloads locally (no server).")

    @app.command()
    def methods(json_output: Annotated[bool, typer.Option("--json")] = False) -> None:
        """Print the SCALE method reference."""
        methods_command(json_output)

    for name in COMMAND_MODULES:
        package = name.rsplit(".", 1)[0]
        # a component not installed is skipped; one that is installed but broken fails loudly
        if importlib.util.find_spec(package) is not None and importlib.util.find_spec(name) is not None:
            importlib.import_module(name).register(app)


_register_component_commands()




def main() -> None:
    app()


if __name__ == "__main__":
    main()
