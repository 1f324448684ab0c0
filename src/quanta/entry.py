"""Entry point of the ``quanta`` command.

``quanta agent``, ``quanta ask`` and ``quanta --version`` are dispatched before the full CLI is
imported: the agent runs on every device and must stay small, and ``quanta ask`` is timed end to
end by whoever asks (the server-side CLI pulls in the web framework and the SQL toolkit).
``quanta ask`` parses its own arguments (:data:`quanta.ask.OPTIONS`, the one definition the typer
command of the same name also hands its arguments to).
"""

from __future__ import annotations

import sys


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("quanta")
    except PackageNotFoundError:
        from quanta import __version__

        return __version__


def main() -> None:
    argv = sys.argv[1:]
    if argv and argv[0] == "agent":
        from quanta.agent.main import cli_main

        raise SystemExit(cli_main(argv[1:]))
    if argv and argv[0] == "ask":
        from quanta.ask import main as ask

        raise SystemExit(ask(argv[1:]))
    if argv in (["--version"], ["-V"]):
        print(f"quanta {version()}")
        raise SystemExit(0)
    from quanta.cli import main as cli

    cli()


if __name__ == "__main__":
    main()
