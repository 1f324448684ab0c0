"""Entry point of the ``quanta`` command.

``quanta agent`` and ``quanta ask`` are dispatched before the full CLI is imported: the agent
runs on every device and must stay small, and ``quanta ask`` is timed end to end by whoever asks
(the server-side CLI pulls in the web framework and the SQL toolkit). ``quanta ask`` hands what it
does not parse itself (``--help``, usage errors) to the full CLI.
"""

from __future__ import annotations

import sys


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "agent":
        from quanta.agent.main import cli_main

        raise SystemExit(cli_main(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "ask":
        from quanta.ask import main as ask

        code = ask(sys.argv[2:])
        if code is not None:
            raise SystemExit(code)
    from quanta.cli import main as cli

    cli()


if __name__ == "__main__":
    main()
