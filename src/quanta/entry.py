"""Entry point of the ``quanta`` command.

``quanta agent`` is dispatched before the full CLI is imported: the agent runs on every device
and must stay small (the server-side CLI pulls in the web framework and the SQL toolkit).
"""

from __future__ import annotations

import sys


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "agent":
        from quanta.agent.main import cli_main

        raise SystemExit(cli_main(sys.argv[2:]))
    from quanta.cli import main as cli

    cli()


if __name__ == "__main__":
    main()
