"""The one internal-auth check and the pooled HTTP client of each process."""

from __future__ import annotations

import asyncio

import pytest

from quanta.internal import bearer, bearer_ok, http_client, tls_context


@pytest.mark.parametrize("header,ok", [
    ("Bearer right", True), ("bearer right", True), ("BEARER  right ", True),
    ("Bearer wrong", False), ("Bearer right2", False), ("Bearer", False), ("", False), (None, False),
    ("Basic right", False), ("right", False), (b"Bearer right", True), ("Bearer r\u00efght", False),
])
def test_bearer_ok(header, ok) -> None:  # type: ignore[no-untyped-def]
    assert bearer_ok(header, "right") is ok


def test_bearer_round_trips() -> None:
    assert bearer_ok(bearer("t0k3n")["Authorization"], "t0k3n")


def test_one_pooled_client_per_loop_and_verification() -> None:
    async def clients() -> tuple[object, ...]:
        return http_client(), http_client(True), http_client(None), http_client(False), http_client(False)

    a, b, c, d, e = asyncio.run(clients())
    assert a is b is c and d is e and a is not d  # None and True: the system store
    f, *_ = asyncio.run(clients())
    assert f is not a  # a new event loop gets its own client (an AsyncClient belongs to one loop)
    assert tls_context(True) is tls_context(True) and tls_context(False) is False
