"""``quanta enroll-batch`` and ``quanta simulate``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("enroll-batch")
    def enroll_batch_cmd(
        root: Annotated[Path, typer.Argument(help="server data directory")],
        count: Annotated[int, typer.Option(min=1, max=1_000_000, help="number of devices")],
        out_dir: Annotated[Path, typer.Option("--out", help="fleet directory to write")],
        prefix: Annotated[str, typer.Option(help="device name prefix; names are PREFIX000001...")] = "sim-",
        start: Annotated[int, typer.Option(min=0, help="first device number")] = 1,
        switch_host: Annotated[Optional[str], typer.Option(help="host the agents dial; default: server name")] = None,
        replace: Annotated[bool, typer.Option("--replace", help="re-enrol enrolled names: revoke their "
                                              "certificates and issue new ones")] = False,
    ) -> None:
        """Enrol many simulated devices at once: one certificate (own key, CN = name) per device.
        Names already enrolled are refused unless --replace."""
        from quanta.db.store import DeviceAlreadyEnrolled
        from quanta.simulate.enroll import enroll_batch

        if not prefix or any(ch in prefix for ch in "/\\\x00"):
            raise typer.BadParameter(f"invalid prefix {prefix!r}")
        try:
            fleet, seconds = enroll_batch(root, prefix, count, out_dir, start=start, switch_host=switch_host,
                                          replace=replace)
        except DeviceAlreadyEnrolled as e:
            print(f"{e}; nothing was changed. Choose another --prefix/--start, or pass --replace to revoke "
                  f"their certificates and issue new ones", file=sys.stderr)
            raise typer.Exit(2) from None
        sw = ",".join(f"{h}:{p}" for h, p in fleet.switches)
        print(f"enrolled {count} devices ({prefix}...) in {seconds:.1f}s: fleet directory {out_dir} "
              f"({len(fleet.names)} devices, Switch={sw})")

    @app.command()
    def simulate(
        fleet_dir: Annotated[Path, typer.Argument(help="fleet directory from 'quanta enroll-batch'")],
        count: Annotated[Optional[int], typer.Option(min=1, help="simulate the first COUNT devices only")] = None,
        processes: Annotated[Optional[int], typer.Option(min=1, help="worker processes; default: enough to stay under the open-file limit")] = None,
        duration: Annotated[Optional[float], typer.Option(help="stop after SECONDS; default: until Ctrl-C/SIGTERM")] = None,
        rows: Annotated[int, typer.Option(min=0, help="rows per answer")] = 1,
        row_size: Annotated[int, typer.Option(min=0, help="bytes of payload per row")] = 32,
        latency: Annotated[str, typer.Option(help="answer latency: 0, fixed:S, uniform:A:B, exp:MEAN, lognormal:MU:SIGMA")] = "0",
        failure_rate: Annotated[float, typer.Option(min=0, max=1, help="fraction of answers that are errors")] = 0.0,
        nocontent_rate: Annotated[float, typer.Option(min=0, max=1, help="fraction of answers with no rows")] = 0.0,
        churn: Annotated[float, typer.Option(min=0, help="fraction of the fleet that leaves per minute")] = 0.0,
        churn_downtime: Annotated[float, typer.Option(min=0, help="seconds a churned device stays away")] = 5.0,
        retry_min: Annotated[float, typer.Option(min=0, help="reconnect back-off minimum, seconds")] = 1.0,
        retry_max: Annotated[float, typer.Option(min=0, help="reconnect back-off maximum, seconds")] = 60.0,
        connect_concurrency: Annotated[int, typer.Option(min=1, help="the most handshakes in flight per process; below it the window follows the achieved rate (about 2 s of handshakes)")] = 256,
        resume: Annotated[bool, typer.Option(help="offer the previous TLS session on reconnect")] = True,
        seed: Annotated[Optional[int], typer.Option(help="random seed")] = None,
        source_ip: Annotated[Optional[str], typer.Option(help="bind worker W's connections to this IPv4 address + W "
                                                                "(e.g. 127.0.0.2: spares 127.0.0.1's ports)")] = None,
        status_file: Annotated[Optional[Path], typer.Option(help="keep a JSON status file updated")] = None,
        progress: Annotated[bool, typer.Option(help="show a progress bar while connecting")] = True,
        log_level: Annotated[str, typer.Option(help="worker log level")] = "WARNING",
    ) -> None:
        """Run many protocol-true simulated agents (real TLS, certificates, hello, signed instructions)."""
        from quanta.simulate.fleet import SimConfig, latency_sampler
        from quanta.simulate.runner import PlanError, run_simulation

        import random

        if source_ip is not None:
            import ipaddress

            try:
                ipaddress.IPv4Address(source_ip)
            except ValueError:
                raise typer.BadParameter(f"--source-ip {source_ip!r} is not an IPv4 address") from None
        if failure_rate + nocontent_rate > 1:
            raise typer.BadParameter("failure-rate + nocontent-rate must be at most 1")
        try:
            latency_sampler(latency, random.Random())
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
        cfg = SimConfig(rows=rows, row_size=row_size, latency=latency, failure_rate=failure_rate,
                        nocontent_rate=nocontent_rate, churn=churn, churn_downtime=churn_downtime,
                        connect_concurrency=connect_concurrency, retry_min=retry_min, retry_max=retry_max,
                        resume=resume, seed=seed, source_ip=source_ip)
        try:
            summary = run_simulation(fleet_dir, cfg, count=count, processes=processes, duration=duration,
                                     status_file=status_file, progress=progress, log_level=log_level.upper())
        except (FileNotFoundError, PlanError) as e:
            print(f"error: {e}", file=sys.stderr)
            raise typer.Exit(2) from None
        print(summary.line(), flush=True)
