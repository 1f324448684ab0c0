"""The simulator's pure parts at scale: the handshake window that follows the achieved rate, and
the plan check that refuses a fleet some process or source address cannot carry."""

from __future__ import annotations

import pytest

from quanta.simulate.fleet import ConnectWindow
from quanta.simulate.runner import PlanError, check_plan, default_processes, source_addresses


def drive(w: ConnectWindow, service, seconds: float, dt: float = 0.01) -> list[int]:  # type: ignore[no-untyped-def]
    """Run the window against a server: ``service(in_flight)`` is how many handshakes complete per
    second with that many in flight. Returns the window every simulated second."""
    now, seen, carry = 0.0, [], 0.0
    while now < seconds:
        while w.may_start():
            w.started(now)
        carry += service(w.in_flight) * dt
        while carry >= 1 and w.in_flight:
            carry -= 1
            w.finished(True, now)
        now += dt
        if abs(now - round(now)) < dt / 2:
            seen.append(w.limit)
    return seen


def test_a_saturated_server_gets_about_rate_times_target_in_flight() -> None:
    # The server completes 300 handshakes a second, however many wait: the window settles near
    # 300 x 1 s, not at the maximum, so each handshake waits about the target, not 512 / 300 s.
    w = ConnectWindow(2000, target=1.0)
    seen = drive(w, lambda inflight: 300.0 if inflight else 0.0, 30)
    assert all(240 <= x <= 360 for x in seen[10:]), seen


def test_a_fast_server_lets_the_window_grow_to_its_maximum() -> None:
    # Each handshake takes 20 ms whatever the load (rate = in flight / 0.02 s): nothing is saturated.
    w = ConnectWindow(256, target=1.0)
    seen = drive(w, lambda inflight: inflight / 0.02, 10)
    assert seen[-1] == 256 and w.limit == 256, seen


def test_a_slower_server_shrinks_the_window_and_failures_do_not_count() -> None:
    w = ConnectWindow(1000, target=1.0)
    drive(w, lambda inflight: 400.0 if inflight else 0.0, 10)
    big = w.limit
    drive(w, lambda inflight: 50.0 if inflight else 0.0, 20)
    assert w.limit < big / 4 and 30 <= w.limit <= 70, (big, w.limit)
    # only failures for a while: no completion, the window falls to its minimum
    now = 100.0
    for _ in range(500):
        w.started(now)
        w.finished(False, now)
        w.started(now)  # keep the busy period going (in flight never reaches 0)
        now += 0.01
        w.finished(False, now)
        w.started(now)
    assert w.limit == w.minimum


def test_the_window_stays_within_its_bounds_and_starts_small() -> None:
    w = ConnectWindow(4)
    assert w.limit == 4 and w.minimum == 4  # a maximum below the usual minimum wins
    w = ConnectWindow(256)
    assert w.limit == 64 and w.rate(0.0) is None  # no history yet
    for _ in range(64):
        w.started(0.0)
    assert not w.may_start()


def test_default_processes_follow_the_descriptor_and_port_limits() -> None:
    assert default_processes(100_000, nofile=20_000) == 9  # 12,000 per process
    assert default_processes(100_000, nofile=5_000) == 23  # 4,500 per process
    # one source address per process: a process may hold no more than 90 % of the port range
    assert default_processes(100_000, source_ip="127.0.0.2", nofile=1 << 20, ports=10_000) == 12
    assert default_processes(10, nofile=20_000) == 1


def test_plan_refuses_more_devices_than_source_addresses_can_carry() -> None:
    check_plan(100_000, 9, 8, "127.0.0.2", nofile=20_000, ports=28_232)  # the 100k run: fits
    with pytest.raises(PlanError, match=r"exceed 9000 ports .* use --processes 12 or more"):
        check_plan(100_000, 10, 8, "127.0.0.2", nofile=1 << 20, ports=10_000)
    with pytest.raises(PlanError, match="open-file limit"):
        check_plan(100_000, 2, 8, "127.0.0.2", nofile=20_000, ports=28_232)
    # no --source-ip: every process shares one address, the limit is per Switch port
    check_plan(50_000, 5, 3, None, nofile=20_000, ports=28_232)
    with pytest.raises(PlanError, match="pass --source-ip 127.0.0.2"):
        check_plan(100_000, 9, 2, None, nofile=20_000, ports=28_232)
    with pytest.raises(PlanError, match="nothing to simulate"):
        check_plan(0, 1, 1, None, nofile=20_000, ports=28_232)


def test_source_addresses_stay_valid() -> None:
    assert source_addresses("127.0.0.254", 3) == ["127.0.0.254", "127.0.0.255", "127.0.1.0"]
    assert source_addresses(None, 3) is None
    with pytest.raises(PlanError, match="outside the loopback network"):
        source_addresses("127.255.255.254", 3)
    with pytest.raises(PlanError, match="runs past"):
        source_addresses("255.255.255.255", 2)
