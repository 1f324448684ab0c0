"""The CLI's cached API token: reused, replaced when expired or refused, readable by its owner only."""

from __future__ import annotations

import json
import stat
import time

import pytest

from conftest import Server, quanta
from quanta.client import TOKEN_FILE, ApiError, ConsumerClient

pytestmark = pytest.mark.slow


def test_token_is_cached_reused_and_replaced(server: Server) -> None:
    path = server.root / TOKEN_FILE
    assert not path.exists()
    with ConsumerClient.for_data_dir(server.root) as api:
        assert not api.token_from_cache
        first = api.token
        assert api.devices() == []
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    cached = json.loads(path.read_text())
    assert cached["token"] == first and cached["username"] == "admin" and cached["expires_at"] > time.time()

    # reused: no second password login
    with ConsumerClient.for_data_dir(server.root) as api:
        assert api.token_from_cache and api.token == first
        assert api.devices() == []

    # expired: a fresh login, and the file holds the new token
    path.write_text(json.dumps(cached | {"expires_at": time.time() - 1}))
    with ConsumerClient.for_data_dir(server.root) as api:
        assert not api.token_from_cache and api.token != first
        second = api.token
    assert json.loads(path.read_text())["token"] == second
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    # refused by the server (revoked, or from another installation): log in again and repeat the call
    path.write_text(json.dumps(cached | {"token": "not-a-token", "expires_at": time.time() + 3600}))
    with ConsumerClient.for_data_dir(server.root) as api:
        assert api.token_from_cache
        assert api.devices() == []
        assert not api.token_from_cache and api.token not in ("not-a-token", first, second)
        third = api.token
    assert json.loads(path.read_text())["token"] == third

    # the CLI uses the same cache; the token never appears in its output
    r = quanta("ask", str(server.root), "@x = Agent.GetSummary();", "--json", "--wait", "3", check=False)
    assert r.returncode == 4  # nothing targeted (quanta.ask.EXIT_NOTHING_TARGETED)
    assert json.loads(r.stdout)["targeted"] == 0 and third not in r.stdout + r.stderr
    assert json.loads(path.read_text())["token"] == third

    # an explicit user's login is not cached, and a wrong password still fails
    with pytest.raises(ApiError) as e:
        ConsumerClient.for_data_dir(server.root, "admin", "wrong password")
    assert e.value.status == 401
    assert json.loads(path.read_text())["token"] == third
