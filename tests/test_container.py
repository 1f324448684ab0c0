"""The container image, checked without a container engine (the test machine runs none; docker/smoke.sh
builds and runs the image where one runs, docs/operations.md "Container"): compose.yaml parses and wires
the Dockerfile, the database and the ports; the Dockerfile copies what exists and runs as a non-root user; the entrypoint passes ``bash -n`` and, run directly on this
machine against a real PostgreSQL, initialises a data directory once, is a no-op the second time, starts a
real server that the HEALTHCHECK script finds healthy, and stops it on SIGTERM."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import free_port, quanta, wait_until
from quanta.settings import PORTS_BY_NAME

REPO = Path(__file__).resolve().parent.parent
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
HEALTHCHECK = REPO / "docker" / "healthcheck.py"
SMOKE = REPO / "docker" / "smoke.sh"


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of each Dockerfile instruction, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_compose_parses_and_wires_the_image_the_database_and_the_ports() -> None:
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "quanta"}
    q, pg = services["quanta"], services["postgres"]
    assert (REPO / q["build"]["context"] / q["build"]["dockerfile"]).resolve() == REPO / "Dockerfile"
    assert q["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    url = q["environment"]["QUANTA_DATABASE_URL"]
    assert url.startswith("postgresql://quanta:${QUANTA_PG_PASSWORD:?") and url.endswith("@postgres:5432/quanta")
    assert pg["environment"]["POSTGRES_PASSWORD"].startswith("${QUANTA_PG_PASSWORD:?")  # no password in the file
    published = {int(p.split(":")[0]): int(p.split(":")[1]) for p in q["ports"]}
    wanted = {PORTS_BY_NAME[n].default for n in ("https", "http", "switch")}  # docs/ports.md, single server
    assert published == {p: p for p in wanted}
    data = next(v for v in q["volumes"] if v.endswith(":/var/lib/quanta"))
    assert data.split(":")[0] in compose["volumes"] and "pgdata" in compose["volumes"]
    assert int(str(q["stop_grace_period"]).rstrip("s")) >= 30


def test_the_dockerfile_copies_what_exists_and_runs_unprivileged() -> None:
    steps = dockerfile()
    # python:3.11-slim unless the builder names another base (a local one where Docker Hub is out of reach)
    assert steps[:2] == [("ARG", "BASE_IMAGE=python:3.11-slim"), ("FROM", "${BASE_IMAGE}")]
    for word, args in steps:
        if word == "COPY":
            *sources, _dest = args.split()
            for s in sources:
                assert (REPO / s).exists(), f"COPY {s}: not in the repository"
    users = [a for w, a in steps if w == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert ("VOLUME", '["/var/lib/quanta"]') in steps and any("QUANTA_DATA=/var/lib/quanta" in a for w, a in steps if w == "ENV")
    [health] = [a for w, a in steps if w == "HEALTHCHECK"]
    assert "/usr/local/lib/quanta/healthcheck.py" in health
    assert any(w == "COPY" and a.startswith("docker/healthcheck.py /usr/local/lib/quanta/healthcheck.py") for w, a in steps)
    assert ("ENTRYPOINT", '["/usr/local/bin/quanta-entrypoint"]') in steps and ("CMD", '["server"]') in steps
    assert any(w == "RUN" and "pip install \".[postgres]\"" in a for w, a in steps)
    for name in ("https", "http", "switch"):
        assert str(PORTS_BY_NAME[name].default) in dict(steps)["EXPOSE"].split()


@pytest.mark.parametrize("script", [ENTRYPOINT, SMOKE], ids=["entrypoint", "smoke"])
def test_the_scripts_are_valid_bash_and_executable(script: Path) -> None:
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    assert script.stat().st_mode & stat.S_IXUSR
    if shutil.which("shellcheck"):
        r = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout


# ------------------------------------------------------------------------ the entrypoint, run on this machine
def entrypoint(data: Path, *args: str, url: str | None, init_args: str = "", **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(ENTRYPOINT), *args], env=_env(data, url, init_args), capture_output=True,
                          text=True, timeout=180, **kw)


def _env(data: Path, url: str | None, init_args: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUANTA_")}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}"  # this checkout's quanta
    env.update(QUANTA_DATA=str(data), QUANTA_SERVER_NAME="localhost", QUANTA_INIT_ARGS=init_args)
    if url:
        env["QUANTA_DATABASE_URL"] = url
    return env


def _init_args() -> tuple[str, int]:
    https = free_port()
    others = " ".join(f"--port {n}={free_port()}" for n in ("http", "hub", "coordinator", "integrate", "interaction",
                                                             "core"))
    return f"--https-port {https} --switch-port {free_port(pair=True)} {others}", https


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_entrypoint_refuses_a_first_start_without_a_database_url(tmp_path: Path) -> None:
    r = entrypoint(tmp_path / "data", "prepare", url=None)
    assert r.returncode == 2 and "QUANTA_DATABASE_URL is not set" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "data" / "quanta.toml").exists()


@pytest.mark.postgres
def test_the_entrypoint_initialises_once_then_is_a_no_op(tmp_path: Path, pg_url: str) -> None:
    data = tmp_path / "data"
    init_args, _https = _init_args()
    first = entrypoint(data, "prepare", url=pg_url, init_args=init_args)
    assert first.returncode == 0, first.stderr
    said = "".join(first.stdout.split("\n"))  # the console wraps long lines
    assert f"initialised {data}:" in said and "database PostgreSQL" in said, first.stdout
    marker = data / ".container-initialised"
    assert stat.S_IMODE(marker.stat().st_mode) == 0o600 and stat.S_IMODE(data.stat().st_mode) == 0o700
    assert quanta("status", str(data), check=False).returncode == 3  # initialised, never started
    before = snapshot(data)

    again = entrypoint(data, "prepare", url=pg_url, init_args=init_args)
    assert again.returncode == 0 and "is initialised; not initialising again" in again.stderr, again.stderr
    assert again.stdout == "" and snapshot(data) == before  # nothing written: same settings, keys, password

    # an initialisation that stopped half-way (settings written, no marker) is started over, not trusted
    marker.unlink()
    redo = entrypoint(data, "prepare", url=pg_url, init_args=init_args)
    assert redo.returncode == 0 and "did not finish; starting it over" in redo.stderr, redo.stderr
    assert marker.exists() and (data / "pki" / "ca.crt").read_bytes() != before.get("pki/ca.crt")


@pytest.mark.postgres
@pytest.mark.slow
def test_the_entrypoint_runs_a_server_the_healthcheck_finds_healthy(tmp_path: Path, pg_url: str) -> None:
    data = tmp_path / "data"
    init_args, https = _init_args()
    log = open(tmp_path / "container.log", "wb")
    proc = subprocess.Popen(["bash", str(ENTRYPOINT)], env=_env(data, pg_url, init_args), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    health = [sys.executable, str(HEALTHCHECK), str(data)]
    try:
        wait_until(lambda: subprocess.run(health, capture_output=True).returncode == 0, 120,
                   "the HEALTHCHECK script healthy")
        assert quanta("status", str(data), check=False).returncode == 0
        proc.send_signal(signal.SIGTERM)  # what 'docker stop' sends: the entrypoint exec'd the supervisor
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    text = (tmp_path / "container.log").read_text(errors="replace")
    assert "all components stopped" in text
    r = subprocess.run(health, capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.startswith(f"unhealthy: https://127.0.0.1:{https}/Consumer/health"), r.stderr
    assert quanta("status", str(data), check=False).returncode == 3
