"""The Consumer API fuzzed from its own OpenAPI document (schemathesis, on Hypothesis), against a real
server process over real TLS, as a Full Administrator and as a Viewer limited to one device.

Every operation of the document gets a bounded number of generated requests (valid and invalid:
out-of-range integers, wrong types, missing fields, odd strings). Two properties hold for each:
- no answer is a server error (5xx); an out-of-range integer is a 422, not a 500;
- the Viewer, whose management group holds only ``fuzz-inside``, never receives anything naming
  ``fuzz-outside``, the other device of the server, whatever it asks.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is a test dependency (pip install -e '.[test]')")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402

from conftest import Server, make_server, quanta  # noqa: E402
from quanta.settings import DataDir  # noqa: E402

pytestmark = pytest.mark.slow

INSIDE, OUTSIDE = "fuzz-inside", "fuzz-outside"
EXAMPLES = int(os.environ.get("QUANTA_FUZZ_EXAMPLES", "25"))  # per operation and role: bounded for CI
SUMMARY = "@s = Device.GetSummary(); SELECT * FROM @s;"
ENDS_SESSION = ("/Consumer/Authentication/Logout", "/Consumer/Authentication/Password")


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    tmp = tmp_path_factory.mktemp("fuzz")
    s: Server = make_server(tmp)
    s.start()
    try:
        for name in (INSIDE, OUTSIDE):
            s.enroll(name)
            s.start_agent(name)
        s.wait_online({INSIDE, OUTSIDE}, 60)
        # one finished question, so that results, aggregates and software have rows to leak
        r = quanta("ask", str(s.root), SUMMARY, "--json", "--wait", "60")
        asked = json.loads(r.stdout)
        assert {row["device"] for row in asked["responses"]} == {INSIDE, OUTSIDE}
        pw = tmp / "viewer.pw"
        pw.write_text("viewer-password-1\n")
        quanta("user", "add", str(s.root), "--username", "vera", "--role", "Viewer", "--password-file", str(pw))
        quanta("group", "set", str(s.root), "--name", "inside-only", "--device", INSIDE)
        quanta("group", "add-member", str(s.root), "--name", "inside-only", "--username", "vera")
        ca = str(s.root / "pki" / "ca.crt")
        base = f"https://localhost:{s.https}"
        creds = dict(line.split("=", 1) for line in DataDir(s.root).admin_credentials.read_text().split())

        def token(user: str, password: str) -> str:
            t = httpx.post(f"{base}/Consumer/Authentication/Token", json={"username": user, "password": password},
                           verify=ca, timeout=30)
            assert t.status_code == 200, t.text
            return t.json()["token"]

        logins = {"admin": (creds["username"], creds["password"]), "viewer": ("vera", "viewer-password-1")}
        yield {"server": s, "base": base, "ca": ca, "instruction": asked["instruction_id"],
               "admin": token(*logins["admin"]), "viewer": token(*logins["viewer"]),
               # sessions of their own for the operations that end the caller's session, taken
               # now: fuzzing the sign-in soon locks this address out
               "own": {(role, path): token(*logins[role]) for role in logins for path in ENDS_SESSION}}
    finally:
        s.stop()


def _call(case, fuzz_server: dict[str, object], role: str, token: str | None = None):  # type: ignore[no-untyped-def]
    resp = case.call(headers={"Authorization": f"Bearer {token or fuzz_server[role]}"}, verify=fuzz_server["ca"],
                     timeout=30)
    body = resp.text
    assert resp.status_code < 500, f"{case.method} {case.formatted_path} as {role}: {resp.status_code} {body[:500]}"
    if role == "viewer":
        assert OUTSIDE not in body, (f"{case.method} {case.formatted_path} showed a Viewer of {INSIDE} data of "
                                     f"{OUTSIDE}: {body[:500]}")


FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])


@pytest.mark.parametrize("role", ["admin", "viewer"])
def test_fuzz_every_operation(fuzz_server: dict[str, object], role: str) -> None:
    # schemathesis as a Hypothesis strategy per operation (its pytest loader, from_fixture, relies on
    # pytest internals that pytest 9 removed); every operation runs, and all failures are reported together
    schema = schemathesis.openapi.from_url(f"{fuzz_server['base']}/Consumer/openapi.json",
                                           verify=fuzz_server["ca"])
    operations = [r.ok() for r in schema.get_all_operations()]
    assert len(operations) >= 20, [f"{o.method} {o.path}" for o in operations]  # the whole document was read
    # the operations that end the caller's own session (logout, a password change) get a session
    # of their own, so that the shared token stays live for every other operation and test
    failures: list[str] = []
    for op in operations:
        own = fuzz_server["own"].get((role, op.path))  # type: ignore[attr-defined]

        @given(case=op.as_strategy())
        @FUZZ
        def run(case) -> None:  # type: ignore[no-untyped-def]
            _call(case, fuzz_server, role, own)

        try:
            run()
        except AssertionError as e:
            failures.append(str(e).splitlines()[0])
    assert not failures, "\n".join(failures)


def test_out_of_range_integers_are_422(fuzz_server: dict[str, object]) -> None:
    """The named cases of the issue, by hand: integers past 2^63 in a path and in a query."""
    h = {"Authorization": f"Bearer {fuzz_server['admin']}"}
    iid = fuzz_server["instruction"]
    for url in (f"/Consumer/Instructions/99999999999999999999",
                f"/Consumer/Instructions/{iid}/Responses?offset=9223372036854775808",
                f"/Consumer/Instructions/{iid}/Responses?limit=-1",
                f"/Consumer/Instructions?offset=9223372036854775808"):
        r = httpx.get(f"{fuzz_server['base']}{url}", headers=h, verify=fuzz_server["ca"], timeout=30)
        assert r.status_code == 422, (url, r.status_code, r.text[:300])
