"""A refused or revoked agent backs off: real agent processes against a real Switch (mutual TLS),
with small retry settings in agent.conf, and their attempts counted from the agent's log (each
failed attempt logs one line with its reason, its number and the delay before the next)."""

from __future__ import annotations

import random
import re
import time
from datetime import datetime
from pathlib import Path

import pytest

from conftest import Server, free_port, quanta, wait_until
from quanta.pki import Pki
from quanta.protocol.agent_session import REVOKED_RETRY, STABLE_AFTER, Backoff, retry_delay

LO, HI = 0.2, 1.6
ATTEMPT = re.compile(r"^(\S+ \S+) \w+ .*?\((.*)\); attempt (\d+), next attempt in ([\d.]+) s$", re.M)


def _set_conf(agent_dir: Path, **changes: str) -> None:
    lines = []
    for line in (agent_dir / "agent.conf").read_text().splitlines():
        key = line.partition("=")[0]
        lines.append(f"{key}={changes.pop(key)}" if key in changes else line)
    lines += [f"{k}={v}" for k, v in changes.items()]
    (agent_dir / "agent.conf").write_text("\n".join(lines) + "\n")


def _attempts(server: Server, name: str) -> list[tuple[float, str, int, float]]:
    """(time, reason, attempt number, delay) of every failed attempt the agent logged."""
    out = []
    for stamp, reason, n, delay in ATTEMPT.findall(server.agent_log(name)):
        t = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
        out.append((t, reason, int(n), float(delay)))
    return out


def _enroll_small_retry(server: Server, name: str) -> Path:
    d = server.enroll(name)
    _set_conf(d, ConnectionRetryTimeInSecondsMin=str(LO), ConnectionRetryTimeInSecondsMax=str(HI))
    return d


def test_retry_delays_grow_with_jitter_up_to_the_max() -> None:
    rnd = random.Random(4)
    for attempt in range(12):
        cap = min(HI, LO * 2 ** attempt)
        delays = [retry_delay(attempt, LO, HI, rnd) for _ in range(200)]
        assert all(max(LO, cap / 2) <= d <= cap for d in delays), (attempt, min(delays), max(delays))
    assert len({round(retry_delay(9, LO, HI, rnd), 6) for _ in range(50)}) > 40  # jitter spreads a storm
    b = Backoff(LO, HI, rnd)
    assert [b.failed("x").attempt for _ in range(3)] == [1, 2, 3]
    assert b.lost("closed by the switch", up_for=STABLE_AFTER - 1).attempt == 4  # a short connection is a failure
    assert b.lost("connection lost", up_for=STABLE_AFTER).attempt == 1  # a stable one starts the count again
    r = b.failed("cannot connect: [SSL: SSLV3_ALERT_CERTIFICATE_REVOKED] sslv3 alert certificate revoked")
    assert r.revoked and r.delay == REVOKED_RETRY
    assert Backoff(1, 3600).failed("closed by the switch: 1008 certificate revoked").delay == 3600


def _assert_backed_off(attempts: list[tuple[float, str, int, float]], window: float) -> None:
    """The logged attempts follow the configured back-off: numbered 1, 2, 3, ...; each delay within
    [max(lo, cap/2), cap], cap = min(max, min * 2**k); each next attempt no sooner than that."""
    assert len(attempts) >= 4, attempts
    assert [a[2] for a in attempts] == list(range(1, len(attempts) + 1)), attempts
    for k, (_, _, _, delay) in enumerate(attempts):
        cap = min(HI, LO * 2 ** k)
        assert max(LO, cap / 2) - 0.05 <= delay <= cap + 0.05, (k, delay, attempts)
    for (t0, _, _, d0), (t1, _, _, _) in zip(attempts, attempts[1:], strict=False):
        assert t1 - t0 >= d0 - 0.01, (t0, d0, t1, attempts)
    # At least the floor of every delay between attempts: no more than this many fit in the window
    # (retrying every LO seconds, as before, would make window / LO attempts).
    floors, total = 0, 0.0
    while total <= window:
        total += max(LO, min(HI, LO * 2 ** floors) / 2)
        floors += 1
    span = attempts[-1][0] - attempts[0][0]
    assert len(attempts) <= floors + 1, (len(attempts), floors, span, attempts)
    assert attempts[-1][3] > HI / 2 - 0.05, attempts  # it reached the top of the range


def _observe(server: Server, name: str, window: float) -> list[tuple[float, str, int, float]]:
    wait_until(lambda: len(_attempts(server, name)) >= 1, 30, f"{name}'s first failed attempt", server)
    first = _attempts(server, name)[0][0]
    wait_until(lambda: time.time() > first + window + 0.5, window + 5, "the window")
    return [a for a in _attempts(server, name) if a[0] <= first + window]


@pytest.mark.parametrize("case", ["refused port", "foreign CA", "hello refused"])
def test_a_refused_agent_backs_off_up_to_the_configured_max(server: Server, tmp_path: Path, case: str) -> None:
    name = f"refused-{case.split()[0]}"
    d = _enroll_small_retry(server, name)
    if case == "refused port":
        _set_conf(d, Switch=f"localhost:{free_port()}")  # nothing listens there
        expect: tuple[str, ...] = ("Connect call failed",)
    elif case == "foreign CA":  # a certificate the Switch's CA did not issue: a TLS alert
        other = Pki(tmp_path / "other")
        other.create("localhost")
        other.issue(name, d / "device.crt", d / "device.key")
        # the alert's name is learnt by a second, plain handshake (picows does not report it); on a
        # loaded machine that probe can time out, and the attempt then says only how it ended
        expect = ("TLS alert from the switch: unknown ca", "closed during the WebSocket upgrade")
    else:  # the certificate names another device than the hello: closed right after connecting
        _set_conf(d, DeviceName="someone-else")  # (now and then the Switch drops it before the upgrade's answer)
        expect = ("hello names device 'someone-else'", "closed during the WebSocket upgrade")
    server.start_agent(name)
    window = 8.0
    attempts = _observe(server, name, window)
    assert all(any(e in a[1] for e in expect) for a in attempts), attempts
    assert any(expect[0] in a[1] for a in attempts), attempts  # the agent can tell why
    _assert_backed_off(attempts, window)
    assert server.agents[name].poll() is None  # still running, still trying


def test_a_revoked_agent_learns_it_at_the_handshake_and_waits_long(server: Server) -> None:
    name = "revoked-tls"
    _enroll_small_retry(server, name)
    quanta("revoke", str(server.root), "--device", name)
    wait_until(lambda: "CRL loaded: 2 revoked" in server.log_text(), 20, "the Switch loaded the CRL (the device and its interaction-port certificate)", server)
    server.start_agent(name)
    wait_until(lambda: "as revoked" in server.agent_log(name), 30, "the agent learnt it is revoked", server)
    t0 = time.monotonic()
    attempts = _attempts(server, name)
    wait_until(lambda: time.monotonic() - t0 > 6, 10, "a window of 6 s")
    after = _attempts(server, name)
    # it learns why on its first attempt, or (when the probe handshake that names the alert times
    # out on a loaded machine) within a few ordinary back-offs; from then on, one long wait
    assert after == attempts and len(after) <= 5, after
    *earlier, (_, reason, n, delay) = after
    assert "certificate revoked" in reason and n == len(after) and delay == REVOKED_RETRY, after
    assert all(a[3] < REVOKED_RETRY for a in earlier), after
    assert f"next attempt in {REVOKED_RETRY:.0f} s" in server.agent_log(name)


def test_an_agent_revoked_while_connected_is_closed_once_and_waits_long(server: Server) -> None:
    """A connected agent's TLS session is resumed on reconnect (no CRL check in the handshake);
    the Switch then closes it with "certificate revoked" right after connecting. Before, the agent
    reconnected every second; now it backs off for REVOKED_RETRY."""
    name = "revoked-live"
    _enroll_small_retry(server, name)
    server.start_agent(name)
    server.wait_online({name})
    quanta("revoke", str(server.root), "--device", name)
    wait_until(lambda: "as revoked" in server.agent_log(name), 30, "the agent learnt it is revoked", server)
    t0 = time.monotonic()
    wait_until(lambda: time.monotonic() - t0 > 6, 10, "a window of 6 s")
    # closed (the Switch logs closes once per interval with a count, so its log cannot count them);
    # the agent's own log shows it never dialled again in the window
    assert f"device {name}: certificate revoked" in server.log_text()
    attempts = _attempts(server, name)
    assert len(attempts) == 1 and "certificate revoked" in attempts[0][1] and attempts[0][3] == REVOKED_RETRY


@pytest.mark.parametrize("lo,hi", [("0", "60"), ("-1", "60"), ("5", "1"), ("nan", "60"), ("1", "inf"), ("x", "60")])
def test_a_careless_retry_setting_is_refused_with_a_clear_error(tmp_path: Path, lo: str, hi: str) -> None:
    """Min=0 would dial again at once after every failure: the agent refuses to start with it."""
    from quanta.agent.config import AgentConfigError, load_agent_config, write_conf

    write_conf(tmp_path, device_name="d", switches="localhost:4000", background_url="")
    _set_conf(tmp_path, ConnectionRetryTimeInSecondsMin=lo, ConnectionRetryTimeInSecondsMax=hi)
    with pytest.raises(AgentConfigError, match="ConnectionRetryTimeInSecondsM"):
        load_agent_config(tmp_path)
    assert retry_delay(0, 0.0, 0.0, random.Random(1)) > 0  # and the delay itself never drops to 0
