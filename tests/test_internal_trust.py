"""Internal trust: one credential per internal hop, and internal services answer nothing without it.

Every receiver is asked with every hop's credential (and with the raw installation secret, the
token every hop shared before, a credential of another installation and none): only its own
hops' credentials open it. Every route of the Core's and the Coordinator's apps (health, the
OpenAPI document and unknown paths included) is refused without a credential.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi.routing import APIRoute, APIWebSocketRoute
from starlette.routing import Route
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.exceptions import InvalidStatus

from quanta.background.auth import HOST_HEADERS, sign_request
from quanta.core.app import create_app as core_app
from quanta.core.service import Core
from quanta.coordinator.app import create_app as coordinator_app
from quanta.coordinator.service import Coordinator
from quanta.hub import Hub, server_tls
from quanta.internal import (BACKGROUND_REPLICATION, CONSUMER_TO_CORE, CONSUMER_TO_COORDINATOR, COORDINATOR_TO_CORE,
                             HOPS, HUB_PEER, SWITCH_TO_CORE, credential, credentials_ok)
from quanta.pki import Pki, Purpose, Signer, client_context
from quanta.settings import DataDir, load_settings
from quanta.web import build_app

from conftest import free_port, quanta

OTHER_SECRET = bytes(32)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    r = tmp_path_factory.mktemp("trust") / "server"
    quanta("init", str(r), "--server-name", "localhost", "--port", f"core={free_port()}")
    return r


def _candidates(secret: bytes) -> dict[str, str | None]:
    """Every credential an attacker might hold: each hop's, the old shared token, the secret itself,
    another installation's credential for the right hop, and none."""
    c: dict[str, str | None] = {f"{h.service}/{h.purpose}": credential(secret, h) for h in HOPS}
    c["legacy shared token"] = hmac.new(secret, b"quanta-core-internal", hashlib.sha256).hexdigest()
    c["raw secret"] = secret.hex()
    c.update({f"other installation {h.service}/{h.purpose}": credential(OTHER_SECRET, h) for h in HOPS})
    c["none"] = None
    return c


def _headers(token: str | None) -> dict[str, str]:
    return {} if token is None else {"Authorization": f"Bearer {token}"}


def _matrix(secret: bytes, accepted: set[object], opens: Callable[[str | None], bool]) -> None:
    own = {f"{h.service}/{h.purpose}" for h in HOPS if h in accepted}
    got = {name for name, token in _candidates(secret).items() if opens(token)}
    assert got == own, f"opened by {sorted(got)}, expected exactly {sorted(own)}"


def test_credentials_are_distinct_and_derived_per_purpose() -> None:
    secret = bytes(range(32))
    tokens = [credential(secret, h) for h in HOPS]
    assert len(set(tokens)) == len(HOPS) and all(len(t) == 64 for t in tokens)
    assert credential(secret, SWITCH_TO_CORE) == hmac.new(secret, b"quanta/core/switch", hashlib.sha256).hexdigest()
    assert not credentials_ok(None, tokens) and not credentials_ok("Bearer ", tokens)
    assert credentials_ok(f"Bearer {tokens[3]}", tokens) and not credentials_ok(f"Bearer {tokens[3]}x", tokens)


@pytest.fixture(scope="module")
def secret(root: Path) -> bytes:
    return DataDir(root).internal_secret()


@pytest.fixture(scope="module")
def core_client(root: Path, secret: bytes) -> Iterator[TestClient]:
    engine = sa.create_engine(f"sqlite:///{root / 'master.db'}")
    yield TestClient(core_app(Core(engine, engine, secret), secret))  # no lifespan: nothing is started
    engine.dispose()


@pytest.fixture(scope="module")
def coordinator_client(root: Path, secret: bytes) -> Iterator[TestClient]:
    engine = sa.create_engine(f"sqlite:///{root / 'master.db'}")
    dd = DataDir(root)
    coord = Coordinator(engine, Signer.from_file(dd.pki / "signing.key"), "http://127.0.0.1:9", "x")
    yield TestClient(coordinator_app(coord, secret))
    engine.dispose()


@pytest.fixture(scope="module")
def web_client(root: Path) -> TestClient:
    return TestClient(build_app(root, load_settings(root)))


def test_core_http_opens_only_for_the_consumer_api_and_the_coordinator(core_client: TestClient, secret: bytes) -> None:
    _matrix(secret, {CONSUMER_TO_CORE, COORDINATOR_TO_CORE},
            lambda t: core_client.get("/Core/health", headers=_headers(t)).status_code == 200)
    _matrix(secret, {CONSUMER_TO_CORE, COORDINATOR_TO_CORE},
            lambda t: core_client.post("/Core/Instructions/1/Wait?timeout=0", headers=_headers(t)).status_code == 200)


def test_core_switch_link_opens_only_for_a_switch(core_client: TestClient, secret: bytes) -> None:
    def opens(token: str | None) -> bool:
        try:
            with core_client.websocket_connect("/Core/Switch", headers=_headers(token)) as ws:
                ws.close()
            return True
        except WebSocketDisconnect as e:
            assert e.code == 1008
            return False

    _matrix(secret, {SWITCH_TO_CORE}, opens)


def test_coordinator_opens_only_for_the_consumer_api(coordinator_client: TestClient, secret: bytes) -> None:
    _matrix(secret, {CONSUMER_TO_COORDINATOR},
            lambda t: coordinator_client.get("/Coordinator/health", headers=_headers(t)).status_code == 200)


def test_core_relay_on_the_public_port_opens_only_for_the_cores_http_callers(web_client: TestClient, root: Path,
                                                                               secret: bytes) -> None:
    # nothing listens on the Core port: a relayed request is a 502, a refused one a 401
    signed = _host(root, "POST", "/Core/Instructions/1/Wait")
    _matrix(secret, {CONSUMER_TO_CORE, COORDINATOR_TO_CORE},
            lambda t: web_client.post("/Core/Instructions/1/Wait",
                                      headers={**signed, **_headers(t)}).status_code == 502)

    def switch_opens(token: str | None) -> bool:
        try:
            with web_client.websocket_connect("/Core/Switch",
                                              headers={**_host(root, "GET", "/Core/Switch"), **_headers(token)}):
                pass
        except WebSocketDisconnect as e:
            return e.code != 1008  # 1011: authenticated, but the Core behind it is down
        return True

    _matrix(secret, {SWITCH_TO_CORE}, switch_opens)


def test_background_replication_opens_only_for_the_master(web_client: TestClient, root: Path, secret: bytes) -> None:
    data = b"replicated content"
    digest = hashlib.sha256(data).hexdigest()
    signed = _host(root, "PUT", f"/Background/{digest}")
    _matrix(secret, {BACKGROUND_REPLICATION},
            lambda t: web_client.put(f"/Background/{digest}", content=data,
                                     headers={**signed, **_headers(t)}).status_code == 201)


def _host(root: Path, method: str, path: str, pki_dir: Path | None = None, now: float | None = None) -> dict[str, str]:
    """The host-certificate proof a remote host adds on a cross-host link."""
    d = pki_dir or DataDir(root).pki
    return sign_request(method, path, (d / "host.crt").read_bytes(), (d / "host.key").read_bytes(), now=now,
                        names=HOST_HEADERS)


@pytest.fixture(scope="module")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    r = tmp_path_factory.mktemp("stranger") / "server"
    quanta("init", str(r), "--server-name", "localhost", "--port", f"core={free_port()}")
    return r


def test_cross_host_links_refuse_a_peer_without_a_host_certificate_of_the_installation(
        web_client: TestClient, root: Path, stranger: Path, secret: bytes, tmp_path: Path) -> None:
    """The /Core relay (HTTP and the Switch link) and replication want the right credential AND a
    fresh signature by a host certificate of this installation's CA, for this method and path."""
    pki = Pki(DataDir(root).pki)
    pki.issue("dev-x", tmp_path / "device.crt", tmp_path / "device.key")  # a device of this installation
    data = b"payload"
    digest = hashlib.sha256(data).hexdigest()
    links = [("POST", "/Core/Instructions/1/Wait", credential(secret, CONSUMER_TO_CORE), 502),
             ("PUT", f"/Background/{digest}", credential(secret, BACKGROUND_REPLICATION), 201),
             ("WS", "/Core/Switch", credential(secret, SWITCH_TO_CORE), None)]
    for method, path, token, ok_status in links:
        verb = "GET" if method == "WS" else method
        proofs = {
            "none": {},
            "a device certificate": sign_request(verb, path, (tmp_path / "device.crt").read_bytes(),
                                                 (tmp_path / "device.key").read_bytes(), names=HOST_HEADERS),
            "another installation's host": _host(root, verb, path, pki_dir=DataDir(stranger).pki),
            "signed for another path": _host(root, verb, "/Core/Instructions/2/Issue"),
            "signed for another method": _host(root, "DELETE", path),
            "stale": _host(root, verb, path, now=time.time() - 3600),
            "garbage": {HOST_HEADERS[0]: "!!", HOST_HEADERS[1]: "1", HOST_HEADERS[2]: "x"},
        }
        for what, proof in {**proofs, "good": _host(root, verb, path)}.items():
            headers = {**proof, **_headers(token)}
            if method == "WS":
                try:
                    with web_client.websocket_connect(path, headers=headers):
                        pass
                    code = None
                except WebSocketDisconnect as e:
                    code = e.code
                assert (code != 1008) == (what == "good"), (path, what, code)
            else:
                r = web_client.request(method, path, headers=headers, content=data)
                want = ok_status if what == "good" else 403
                assert r.status_code == want, (path, what, r.status_code, r.text)


def test_hub_opens_only_for_a_peer_host(root: Path, secret: bytes, tmp_path: Path) -> None:
    hub = Hub(root)
    pki = Pki(DataDir(root).pki)
    pki.issue("dmz1", tmp_path / "host.crt", tmp_path / "host.key", purpose=Purpose.HOST)
    tls = client_context(pki.ca_crt, tmp_path / "host.crt", tmp_path / "host.key")

    async def handler(conn) -> None:  # type: ignore[no-untyped-def]
        await conn.close()

    async def run() -> None:
        async with serve(handler, "127.0.0.1", 0, ssl=server_tls(pki), process_request=hub._authorise) as server:
            port = server.sockets[0].getsockname()[1]

            async def opens(token: str | None) -> bool:
                try:
                    async with connect(f"wss://localhost:{port}/Hub", ssl=tls, additional_headers=_headers(token)):
                        return True
                except InvalidStatus as e:
                    assert e.response.status_code == 401
                    return False

            results = {name: await opens(t) for name, t in _candidates(secret).items()}
            assert {n for n, ok in results.items() if ok} == {f"{HUB_PEER.service}/{HUB_PEER.purpose}"}

    asyncio.run(run())


# ------------------------------------------------------------------ nothing without a credential
def _routes(client: TestClient) -> list[tuple[str, str]]:
    app = client.app.fastapi  # type: ignore[attr-defined]
    out = []
    for r in app.routes:
        if isinstance(r, APIWebSocketRoute):
            out.append(("WS", r.path))
        elif isinstance(r, (APIRoute, Route)):
            out += [(m, r.path) for m in sorted(r.methods or ()) if m != "HEAD"]
    return out


@pytest.mark.parametrize("which", ["core", "coordinator"])
def test_every_internal_route_refuses_a_request_without_its_credential(which: str, request: pytest.FixtureRequest,
                                                                        secret: bytes) -> None:
    client: TestClient = request.getfixturevalue(f"{which}_client")
    routes = _routes(client)
    paths = {p for _, p in routes}
    assert {f"/{which.title()}/openapi.json", f"/{which.title()}/health"} <= paths  # the enumeration sees them
    wrong = credential(secret, SWITCH_TO_CORE if which == "coordinator" else CONSUMER_TO_COORDINATOR)
    for method, path in routes + [("GET", "/"), ("GET", "/docs"), ("GET", "/nothing/here"), ("POST", "/openapi.json")]:
        concrete = path.replace("{instruction_id}", "1").replace("{iid}", "1")
        for headers in ({}, _headers(wrong), {"Authorization": "Basic " + credential(secret, CONSUMER_TO_CORE)}):
            if method == "WS":
                with pytest.raises(WebSocketDisconnect) as ei:
                    with client.websocket_connect(concrete, headers=headers):
                        pass
                assert ei.value.code == 1008, (path, headers)
            else:
                r = client.request(method, concrete, headers=headers)
                assert r.status_code == 401, (method, path, headers, r.status_code)
                assert r.json() == {"detail": "missing or wrong internal credential"}


def test_the_public_port_serves_no_core_health_or_openapi(web_client: TestClient, root: Path, secret: bytes) -> None:
    assert web_client.get("/Consumer/health").status_code == 200
    token = _headers(credential(secret, CONSUMER_TO_CORE))
    for path in ("/Core/health", "/Core/openapi.json", "/Core/docs", "/Core/Instructions/1/Issue/../../health"):
        assert web_client.get(path).status_code == 401, path
        assert web_client.get(path, headers=token).status_code == 403, path  # no host proof
        good = {**token, **_host(root, "GET", web_client.build_request("GET", path).url.path)}
        assert web_client.get(path, headers=good).status_code == 404, path  # and even with it: not relayed
    for method, path in (("POST", "/Core/health"), ("POST", "/Core/Instructions/99999999999999999999/Issue"),
                         ("GET", "/Core/Instructions/1/Issue"), ("POST", "/Core/Instructions/-1/Issue")):
        good = {**token, **_host(root, method, path)}
        assert web_client.request(method, path, headers=good).status_code == 404, path


def test_no_credential_is_logged_when_one_is_refused(core_client: TestClient, secret: bytes,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    wrong = credential(secret, HUB_PEER)
    with caplog.at_level("WARNING"):
        assert core_client.get("/Core/health", headers=_headers(wrong)).status_code == 401
    assert "refused" in caplog.text and wrong not in caplog.text and secret.hex() not in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):  # a hostile path cannot forge a log line
        assert core_client.get("/Core/x%0A2026-01-01 INFO core: forged").status_code == 401
    assert len(caplog.records) == 1 and "\n" not in caplog.records[0].getMessage()

