"""A remote host is given only the internal credentials of the hops its role uses, never the
installation secret (from which every hop's could be derived); the Core's pokes are MACed with
the poke hop's own key.

Real exports (``quanta host export``) of a Master's data directory, real component processes
refusing a missing hop, and a real Core poking a Switch over a TCP socket."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

from conftest import free_port, quanta
from quanta import protocol as p
from quanta.core.service import Core, SwitchLink
from quanta.db import make_engine
from quanta.internal import (CREDENTIALS_FILE, HOPS, HUB_PEER, POKE, ROLE_HOPS, SWITCH_TO_CORE, Credentials,
                            MissingCredential, credential, hop_name, host_credentials, parse_credentials, poke_key)
from quanta.pki import Pki
from quanta.settings import DataDir, load_settings, poke_port
from quanta.switch.main import local_switch_rows
from quanta.switch.service import Switch

OTHER_SECRET = bytes(range(32))


def _ports(*names: str) -> list[str]:
    return [x for n in names for x in ("--port", f"{n}={free_port()}")]


def _master(tmp_path: Path, *extra: str) -> Path:
    m = tmp_path / "master"
    quanta("init", str(m), "--server-name", "127.0.0.1", "--https-port", str(free_port()),
           "--switch-port", str(free_port(pair=True)), *_ports("core", "http", "hub", "coordinator", "integrate",
                                                               "interaction"), *extra)
    return m


def _export(m: Path, out: Path, role: str, *extra: str) -> str:
    args = ["host", "export", str(m), "--role", role, "--server-name", "127.0.0.3" if role == "dmz" else "127.0.0.2",
            "--out", str(out), "--https-port", str(free_port()), "--switch-port", str(free_port(pair=True)), *extra]
    if role == "dmz":
        args += ["--response-url", "https://127.0.0.2:4443"]
    return quanta(*args).stdout


@pytest.fixture
def master(tmp_path: Path) -> Path:
    return _master(tmp_path)


@pytest.fixture
def dmz(master: Path, tmp_path: Path) -> Path:
    d = tmp_path / "dmz"
    _export(master, d, "dmz")
    return d


def _check_export(m: Path, out: Path, role: str) -> None:
    secret = DataDir(m).internal_secret()
    pki = out / "pki"
    assert not (pki / "internal.secret").exists()
    f = pki / CREDENTIALS_FILE
    assert stat.S_IMODE(f.stat().st_mode) == 0o600 and stat.S_IMODE(pki.stat().st_mode) == 0o700
    given = parse_credentials(f.read_text(), str(f))
    assert set(given) == set(ROLE_HOPS[role])
    assert all(given[h] == credential(secret, h) for h in given)  # the Master's own, derived
    # neither the secret nor any hop credential the role does not use is anywhere in the directory
    unused = [credential(secret, h) for h in HOPS if h not in ROLE_HOPS[role]]
    assert unused
    for path in out.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert secret.hex().encode() not in data and secret not in data, path
            assert not any(token.encode() in data for token in unused), path


def test_a_dmz_host_is_given_only_its_hops(master: Path, dmz: Path) -> None:
    _check_export(master, dmz, "dmz")
    assert {hop_name(h) for h in ROLE_HOPS["dmz"]} == {"core/switch", "switch/poke", "background/replicate",
                                                        "hub/peer"}
    # what each DMZ component needs, it has
    host_credentials(dmz, SWITCH_TO_CORE, POKE, HUB_PEER)
    # the Master's own hops it cannot produce: a clear refusal naming the hop
    from quanta.internal import CONSUMER_TO_COORDINATOR, CONSUMER_TO_CORE

    for hop in (CONSUMER_TO_CORE, CONSUMER_TO_COORDINATOR):
        with pytest.raises(MissingCredential, match=f"not given the internal credential of hop {hop_name(hop)} "):
            credential(host_credentials(dmz), hop)


def test_a_response_stack_is_given_only_its_hops(tmp_path: Path, pg_url: str) -> None:
    m = _master(tmp_path, "--database-url", pg_url)
    r = tmp_path / "response"
    _export(m, r, "response")
    _check_export(m, r, "response")
    assert {hop_name(h) for h in ROLE_HOPS["response"]} == {"core/switch", "core/consumer", "core/coordinator",
                                                             "switch/poke", "hub/peer"}


def _switch_process(d: Path) -> tuple[int, str]:
    name = local_switch_rows(d)[0]["Name"]
    r = quanta("switch", str(d), "--name", name, check=False, timeout=60)
    return r.returncode, r.stderr


def test_a_component_whose_hop_was_not_given_refuses_in_one_line(dmz: Path) -> None:
    f = dmz / "pki" / CREDENTIALS_FILE
    full = f.read_text()
    f.write_text("".join(line + "\n" for line in full.splitlines() if not line.startswith("switch/poke")))
    rc, err = _switch_process(dmz)
    assert rc == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: this host was not given the internal credential of hop "
                                                   "switch/poke"), err
    # no credentials at all (the file lost, the secret never given)
    f.unlink()
    rc, err = _switch_process(dmz)
    assert rc == 2 and err.strip().startswith("error: neither ") and "has no internal credentials" in err, err
    assert len(err.strip().splitlines()) == 1
    # and the hub client, with a file missing its hop
    f.write_text("".join(line + "\n" for line in full.splitlines() if not line.startswith("hub/peer")))
    r = quanta("hub-client", str(dmz), check=False, timeout=60)
    assert r.returncode == 2 and r.stderr.strip().startswith(
        "error: this host was not given the internal credential of hop hub/peer"), r.stderr


@pytest.mark.parametrize("text, why", [
    ("core/switch = " + "a" * 63 + "\n", "line 1: expected"),                          # too short
    ("# ok\n\ncore/switch = " + "g" * 64 + "\n", "line 3: expected"),                  # not hex
    ("core/switch = " + "A" * 64 + "\n", "line 1: expected"),                          # hex, but not as written
    ("core/everything = " + "a" * 64 + "\n", "line 1: expected .* known hop"),         # unknown hop
    ("core/switch " + "a" * 64 + "\n", "line 1: expected"),                            # no '='
    ("core/switch = " + "a" * 64 + "\ncore/switch = " + "b" * 64 + "\n", "line 2: hop core/switch given twice"),
    (b"\x00\xff\xfe not UTF-8\n", "line 1: expected"),
    (b"core/switch = " + b"a" * 63 + b"\xe9\n", "line 1: expected"),
])
def test_a_malformed_credentials_file_is_refused_with_its_line(dmz: Path, text: str | bytes, why: str) -> None:
    f = dmz / "pki" / CREDENTIALS_FILE
    f.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(MissingCredential, match=why) as refused:
        host_credentials(dmz)
    assert "a" * 16 not in str(refused.value) and "b" * 16 not in str(refused.value)  # no credential echoed


def test_an_old_export_holding_the_secret_still_works_and_a_re_export_replaces_it(master: Path, dmz: Path) -> None:
    secret = DataDir(master).internal_secret()
    pki = dmz / "pki"
    # as exported before: the installation secret, no credentials file
    (pki / CREDENTIALS_FILE).unlink()
    (pki / "internal.secret").write_text(secret.hex() + "\n")
    old = host_credentials(dmz, SWITCH_TO_CORE, POKE, HUB_PEER)
    assert credential(old, SWITCH_TO_CORE) == credential(secret, SWITCH_TO_CORE)
    assert poke_key(old) == poke_key(secret)
    # the same export again, into the same directory: the secret is replaced by the role's credentials
    settings = load_settings(dmz)
    out = quanta("host", "export", str(master), "--role", "dmz", "--server-name", settings.server_name,
                 "--out", str(dmz), "--https-port", str(settings.port("https")),
                 "--switch-port", str(settings.port("switch")), "--response-url", "https://127.0.0.2:4443",
                 env={**os.environ, "COLUMNS": "1000"}).stderr  # the changes, one a line, unwrapped
    assert f"replace {pki / 'internal.secret'} (the installation secret) with {CREDENTIALS_FILE}" in out
    _check_export(master, dmz, "dmz")


def test_pokes_use_their_own_hop_key(master: Path, dmz: Path) -> None:
    """A real Core (the Master's secret) pokes a Switch holding only a DMZ host's credentials over
    TCP, and it is accepted; pokes MACed with the raw secret (the old scheme), with any other hop's
    credential or with another installation's poke key are refused."""
    secret = DataDir(master).internal_secret()
    engine = make_engine(DataDir(master).master_url(load_settings(master)))

    async def main() -> None:
        port = free_port(pair=True)
        sw = Switch(name="s", host="127.0.0.1", port=port, bind_host="127.0.0.1", pki=Pki(dmz / "pki"),
                    core_url="ws://127.0.0.1:9/Core/Switch", secret=host_credentials(dmz, SWITCH_TO_CORE, POKE),
                    max_message_bytes=1 << 20)
        listener = await asyncio.start_server(sw._on_poke, "127.0.0.1", poke_port(port))
        try:
            core = Core(engine, engine, host_credentials(master))

            async def push(*_: object) -> None:
                raise AssertionError("the poke failed: the Core fell back to pushing over the link")

            link = SwitchLink(name="s", host="127.0.0.1", port=port, incarnation="i", send=push)
            await core.poke(link)
            await asyncio.wait_for(sw._fetch.wait(), 10)
        finally:
            listener.close()
            await listener.wait_closed()
        refused = {"the raw secret": secret, "another installation's poke key": poke_key(OTHER_SECRET)}
        refused |= {hop_name(h): bytes.fromhex(credential(secret, h)) for h in HOPS if h != POKE}
        for what, key in refused.items():
            reader = asyncio.StreamReader()
            reader.feed_data(p.make_poke(key))
            reader.feed_eof()
            assert await sw._read_poke(reader) == "bad MAC", what
        good = asyncio.StreamReader()
        good.feed_data(p.make_poke(poke_key(secret)))
        good.feed_eof()
        assert await sw._read_poke(good) is None

    asyncio.run(main())


def test_a_poke_credential_opens_no_bearer_hop(master: Path) -> None:
    """The poke hop is one of HOPS: its credential differs from every other hop's (the receivers'
    refusal of other hops' credentials is enumerated by test_internal_trust)."""
    secret = DataDir(master).internal_secret()
    tokens = {h: credential(secret, h) for h in HOPS}
    assert POKE in tokens and len(set(tokens.values())) == len(HOPS)
    assert Credentials(given={POKE: tokens[POKE]})[POKE] == tokens[POKE]
