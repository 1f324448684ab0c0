"""quanta.accounts on SQLite and PostgreSQL: sessions, lockout, user administration, the audit log.

Hostile and careless input first: guessing, unknown names, huge and control-character input,
forged and stale tokens, racing requests, an operator about to remove the last administrator.
"""

from __future__ import annotations

import secrets
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa

from quanta import accounts as acc
from quanta.accounts import (Accounts, Actor, BadCredentials, Conflict, Forbidden, Invalid, Locked, NotFound,
                             Policy, audit)
from quanta.accounts import service as service_module
from quanta.db import make_engine, migrate, store, tables

ADMIN_PW = "correct horse battery staple"
BOB_PW = "a long enough password"
ROOT = Actor.local("test", source="cli:test")


class Clock:
    """The service's clock, moved by the test instead of sleeping."""

    def __init__(self) -> None:
        self.t = time.time()

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture
def engine(db_url):
    migrate(db_url, "master")
    e = make_engine(db_url)
    yield e
    e.dispose()


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(service_module, "_now", c)
    return c


@pytest.fixture
def a(engine):
    accounts = Accounts(engine)
    accounts.create_user(ROOT, "admin", ADMIN_PW, "Full Administrator")
    accounts.create_user(ROOT, "bob", BOB_PW, "Viewer", email="bob@example.com")
    return accounts


def actions(engine, **kw):
    return [(e.action, e.object) for e in audit.query(engine, limit=1000, **kw).items]


# ------------------------------------------------------------------ guessing and lockout
def test_twelve_wrong_passwords_then_the_right_one_is_locked_and_audited(a, engine):
    answers = []
    for _ in range(12):
        with pytest.raises((BadCredentials, Locked)) as e:
            a.login("bob", "wrong password!!", "192.0.2.7")
        answers.append(type(e.value))
    assert answers[:4] == [BadCredentials] * 4  # five failures in the window lock the account
    assert set(answers[4:]) == {Locked}
    with pytest.raises(Locked) as e:
        a.login("bob", BOB_PW, "192.0.2.7")  # the right password too
    assert 0 < e.value.retry_after <= 15 * 60
    with pytest.raises(Locked):
        a.login("bob", BOB_PW, "198.51.100.1")  # from another address too: the account is locked
    rows = actions(engine, object="bob")
    assert rows.count(("login_failed", "bob")) == 5
    assert rows.count(("login_locked", "bob")) == 7 + 2
    assert ("lockout", "user:bob") in actions(engine, action="lockout")
    assert all(e.source == "192.0.2.7" for e in audit.query(engine, action="login_failed").items)
    locks = a.list_locks(ROOT)
    assert [(lk.kind, lk.subject) for lk in locks] == [("user", "bob")]
    # an administrator lifts it; the right password works again, and the lift is audited
    assert a.unlock(ROOT, "bob") is True
    assert a.login("bob", BOB_PW, "192.0.2.7").user.username == "bob"
    assert ("unlock", "user:bob") in actions(engine, action="unlock")
    assert a.list_locks(ROOT) == []


def test_a_lock_expires_and_a_good_login_forgives_the_failures(a, clock):
    for _ in range(4):
        with pytest.raises(BadCredentials):
            a.login("bob", "wrong password!!", "192.0.2.7")
    a.login("bob", BOB_PW, "192.0.2.7")  # forgiven: four more failures are allowed
    for _ in range(4):
        with pytest.raises(BadCredentials):
            a.login("bob", "wrong password!!", "192.0.2.7")
    with pytest.raises(Locked) as e:
        a.login("bob", "wrong password!!", "192.0.2.7")
    clock.advance(e.value.retry_after - 5)
    with pytest.raises(Locked) as e:
        a.login("bob", BOB_PW, "192.0.2.7")
    assert e.value.retry_after <= 5
    clock.advance(6)
    assert a.login("bob", BOB_PW, "192.0.2.7").user.username == "bob"


def test_an_unknown_user_is_answered_like_a_known_one(a, engine):
    def run(name):
        out, took = [], []
        for _ in range(7):
            # CPU time of this process, not wall time: other processes loading the machine do not count
            t0 = time.process_time()
            try:
                a.login(name, "wrong password!!", f"203.0.113.{len(name)}")
            except (BadCredentials, Locked) as e:
                out.append(type(e))
            took.append(time.process_time() - t0)
        return out, statistics.median(took[:4])

    known, t_known = run("bob")
    unknown, t_unknown = run("nobody")
    assert known == unknown == [BadCredentials] * 4 + [Locked] * 3
    # the unknown name costs an Argon2 verification too (within a wide margin, not a benchmark)
    assert t_unknown > 0.4 * t_known
    assert ("lockout", "user:nobody") in actions(engine, action="lockout")


def test_one_source_guessing_many_names_is_locked(engine):
    a = Accounts(engine, Policy(login_source_max_failures=8))
    a.create_user(ROOT, "bob", BOB_PW, "Viewer")
    for i in range(7):
        with pytest.raises(BadCredentials):
            a.login(f"user{i}", "wrong password!!", "192.0.2.99")
    with pytest.raises(Locked):
        a.login("user7", "wrong password!!", "192.0.2.99")
    with pytest.raises(Locked):
        a.login("bob", BOB_PW, "192.0.2.99")  # every login from that source
    assert a.login("bob", BOB_PW, "192.0.2.100").user.username == "bob"  # another source is not locked
    assert ("source", "192.0.2.99") in [(lk.kind, lk.subject) for lk in a.list_locks(ROOT)]
    assert a.unlock(ROOT, "192.0.2.99", kind="source")
    assert a.login("bob", BOB_PW, "192.0.2.99").user.username == "bob"


def test_concurrent_guesses_cannot_exceed_the_allowance(a, engine):
    def guess(_):
        try:
            a.login("bob", "wrong password!!", "192.0.2.50")
        except BadCredentials:
            return "bad"
        except Locked:
            return "locked"
        return "in"

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(guess, range(24)))
    assert "in" not in results
    assert results.count("bad") <= 4  # at most max_failures - 1 answered as a plain wrong password
    assert results.count("locked") >= 20
    # attempts refused for arriving all at once were never checked, so they do not count: the burst
    # recorded at most the allowance less one, and the next wrong guess reaches it, whatever the race
    try:
        a.login("bob", "wrong password!!", "192.0.2.50")
    except (BadCredentials, Locked):
        pass
    with pytest.raises(Locked):
        a.login("bob", BOB_PW, "192.0.2.50")


def test_concurrent_good_logins_each_get_their_own_session_and_lock_nothing(a):
    def login(i):
        try:
            return a.login("bob", BOB_PW, f"192.0.2.{i}")
        except Locked as e:  # more at once than the allowance: "retry in 1 s", no lock is set
            return e

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(login, range(12)))
    refused = [r for r in results if isinstance(r, Locked)]
    assert all(r.retry_after == 1 for r in refused)
    assert a.list_locks(ROOT) == []
    sessions = [r for r in results if not isinstance(r, Locked)] + [login(i) for i in range(len(refused))]
    tokens = {s.token for s in sessions}
    assert len(tokens) == 12
    assert all(a.authenticate(t).username == "bob" for t in tokens)


@pytest.mark.parametrize("name", ["", "x" * 129, "x" * 1_000_000, "bo\x00b", "bob\n", "\u202ebob", None, 42,
                                  ["bob"], "bob\x1b[2J"])
def test_hostile_login_names_are_plain_bad_credentials(a, engine, name):
    with pytest.raises(BadCredentials):
        a.login(name, BOB_PW, "192.0.2.1")
    rows = audit.query(engine, action="login_failed").items
    assert rows and len(rows[0].object) <= 255 and "\x00" not in rows[0].object


@pytest.mark.parametrize("password", ["", "p" * 1_000_000, BOB_PW + "\x00", "\x00" + BOB_PW, None, b"bytes"])
def test_hostile_login_passwords_are_plain_bad_credentials(a, password):
    with pytest.raises(BadCredentials):
        a.login("bob", password, "192.0.2.1")


@pytest.mark.parametrize("source", ["", "x" * 10_000, "1.2.3.4\x00", None, "::ffff:1.2.3.4", "fe80::1%eth0"])
def test_hostile_source_addresses_are_bounded(a, engine, source):
    with pytest.raises(BadCredentials):
        a.login("bob", "wrong password!!", source)
    row = audit.query(engine, action="login_failed").items[0]
    assert len(row.source) <= 64 and "\x00" not in row.source


# ------------------------------------------------------------------ tokens
def test_forged_huge_and_odd_tokens_are_refused(a):
    real = a.login("bob", BOB_PW, "192.0.2.1").token
    for token in ["", "x", secrets.token_urlsafe(32), real[:-1], real + "A", real.upper() if real != real.upper()
                  else real.lower(), "A" * 10_000, real + "\x00", "\ud800" * 20, None, 12345]:
        assert a.authenticate(token) is None
        assert a.logout(token) is False
    assert a.authenticate(real).username == "bob"


def test_tokens_are_stored_only_as_hashes(a, engine):
    s = a.login("bob", BOB_PW, "192.0.2.1")
    with engine.connect() as c:
        stored = c.execute(sa.select(tables.sessions)).all()
    assert [r.token_hash for r in stored] == [acc.token_hash(s.token)]
    assert all(s.token not in str(tuple(r)) for r in stored)
    assert s.token not in repr(s)


def test_logout_ends_the_token_at_once(a, engine):
    s = a.login("bob", BOB_PW, "192.0.2.1")
    other = a.login("bob", BOB_PW, "192.0.2.2")
    assert a.logout(s.token, "192.0.2.1") is True
    assert a.authenticate(s.token) is None
    assert a.logout(s.token, "192.0.2.1") is False  # twice: nothing more
    assert a.authenticate(other.token).username == "bob"  # only that session
    assert ("logout", "bob") in actions(engine, action="logout")


def test_sliding_expiry_and_the_absolute_maximum(engine, clock):
    a = Accounts(engine, Policy(session_ttl=900, session_max_age=3600, session_renew_interval=60))
    a.create_user(ROOT, "bob", BOB_PW, "Viewer")
    s = a.login("bob", BOB_PW, "192.0.2.1")
    clock.advance(899)
    assert a.authenticate(s.token) is not None  # used: renewed for another 15 minutes
    clock.advance(899)
    assert a.authenticate(s.token) is not None
    idle = a.login("bob", BOB_PW, "192.0.2.1")
    clock.advance(901)
    assert a.authenticate(idle.token) is None  # not used for 15 minutes: expired
    assert a.authenticate(s.token) is None  # nor was this one since its last renewal
    s = a.login("bob", BOB_PW, "192.0.2.1")
    for _ in range(12):  # in use all along, yet no longer than the absolute maximum
        clock.advance(300)
        alive = a.authenticate(s.token) is not None
    assert not alive and clock.t - time.time() > 3600


def test_renewal_writes_at_most_once_a_minute(a, engine, clock):
    s = a.login("bob", BOB_PW, "192.0.2.1")

    def last_used():
        with engine.connect() as c:
            return c.execute(sa.select(tables.sessions.c.last_used_at)).scalar_one()

    first = last_used()
    for _ in range(20):
        clock.advance(2)
        assert a.authenticate(s.token) is not None
    assert last_used() == first  # 40 s of requests: no write
    clock.advance(30)
    a.authenticate(s.token)
    assert last_used() == clock.t


def test_disabling_a_user_ends_a_live_session_immediately(a, engine):
    s = a.login("bob", BOB_PW, "192.0.2.1")
    assert a.authenticate(s.token).username == "bob"
    a.update_user(ROOT, "bob", disabled=True)
    assert a.authenticate(s.token) is None
    with pytest.raises(BadCredentials):  # the same answer as a wrong password
        a.login("bob", BOB_PW, "192.0.2.1")
    a.update_user(ROOT, "bob", disabled=False)
    assert a.authenticate(s.token) is None  # enabling again does not bring the session back
    assert a.login("bob", BOB_PW, "192.0.2.1")
    assert [x for x, _ in actions(engine, object="bob")][:3] == ["login", "user_enable", "login_failed"]


def test_a_reset_or_a_password_change_ends_every_session(a, engine):
    s1, s2 = a.login("bob", BOB_PW, "192.0.2.1"), a.login("bob", BOB_PW, "192.0.2.2")
    assert a.reset_password(ROOT, "bob", "a brand new password") == 2
    assert a.authenticate(s1.token) is None and a.authenticate(s2.token) is None
    with pytest.raises(BadCredentials):
        a.login("bob", BOB_PW, "192.0.2.1")
    s3 = a.login("bob", "a brand new password", "192.0.2.1")
    with pytest.raises(BadCredentials):
        a.change_password("bob", "not the old one!", "another new password", "192.0.2.1")
    assert a.authenticate(s3.token) is not None  # a failed change ends nothing
    with pytest.raises(Invalid):
        a.change_password("bob", "a brand new password", "short", "192.0.2.1")
    fresh = a.change_password("bob", "a brand new password", "another new password", "192.0.2.1")
    assert a.authenticate(s3.token) is None
    assert a.authenticate(fresh.token).username == "bob"
    assert a.login("bob", "another new password", "192.0.2.1")
    acts = [x for x, _ in actions(engine, object="bob")]
    assert {"password_reset", "password_change", "password_change_failed"} <= set(acts)
    assert "a brand new password" not in str(audit.query(engine, limit=1000))


def test_wrong_old_passwords_count_towards_the_lock(a):
    for _ in range(4):
        with pytest.raises(BadCredentials):
            a.change_password("bob", "wrong password!!", "another new password", "192.0.2.1")
    with pytest.raises(Locked):
        a.change_password("bob", "wrong password!!", "another new password", "192.0.2.1")
    with pytest.raises(Locked):
        a.change_password("bob", BOB_PW, "another new password", "192.0.2.1")


# ------------------------------------------------------------------ password hashes
def test_existing_hashes_verify_and_weak_ones_are_rehashed(engine):
    from argon2 import PasswordHasher

    from quanta.consumer_api import hash_password as legacy_hash

    with engine.begin() as c:
        c.execute(tables.users.insert().values(username="old", password_hash=legacy_hash(BOB_PW), role="Viewer",
                                               created_at=time.time()))
        c.execute(tables.users.insert().values(
            username="weak", password_hash=PasswordHasher(time_cost=1, memory_cost=8, parallelism=1).hash(BOB_PW),
            role="Viewer", created_at=time.time()))
    a = Accounts(engine)
    assert a.login("old", BOB_PW, "192.0.2.1").user.username == "old"
    assert a.login("weak", BOB_PW, "192.0.2.1").user.username == "weak"
    with engine.connect() as c:
        stored = c.execute(sa.select(tables.users.c.password_hash).where(tables.users.c.username == "weak")).scalar()
    assert not PasswordHasher().check_needs_rehash(stored)
    assert a.login("weak", BOB_PW, "192.0.2.1")  # and the new hash verifies


# ------------------------------------------------------------------ user administration
@pytest.mark.parametrize("name", ["", "x" * 129, "bo b", "bob\x00", "-bob", "bob\n", "ｂｏｂ", "bob;drop", None])
def test_bad_new_user_names_are_refused(a, name):
    with pytest.raises(Invalid):
        a.create_user(ROOT, name, BOB_PW, "Viewer")


@pytest.mark.parametrize("password", ["short", "", "p" * 1025, "a long enough\x00password", "tab\tinside password",
                                      "carol", None])
def test_bad_new_passwords_are_refused(a, password):
    with pytest.raises(Invalid):
        a.create_user(ROOT, "carol", password if password != "carol" else "Carol", "Viewer")
    with pytest.raises(Invalid):
        a.reset_password(ROOT, "bob", password)


@pytest.mark.parametrize("email", ["no-at-sign", "a@b@c", "x" * 300 + "@example.com", "bob@exa mple.com",
                                   "bob@example.com\r\nBcc: all@example.com", 5])
def test_bad_emails_are_refused(a, email):
    with pytest.raises(Invalid):
        a.update_user(ROOT, "bob", email=email)


def test_create_list_show_update_delete_with_audit(a, engine):
    from quanta import rbac

    rbac.set_group(engine, "paris", {"devices": ["dev1"]})
    with pytest.raises(Conflict):
        a.create_user(ROOT, "bob", BOB_PW, "Viewer")
    with pytest.raises(Invalid):
        a.create_user(ROOT, "carol", BOB_PW, "Emperor")
    with pytest.raises(Invalid):
        a.create_user(ROOT, "carol", BOB_PW, "Viewer", groups=["nowhere"])
    carol = a.create_user(ROOT, "carol", BOB_PW, "Questioner", groups=["paris"],
                          assignments=[("Actioner", "Processes")])
    assert carol.groups == ("paris",) and carol.assignments == (("Actioner", "Processes"),)
    assert [u.username for u in a.list_users(ROOT)] == ["admin", "bob", "carol"]
    assert rbac.reachable_devices(engine, "carol") == set()  # the group holds no known device yet
    assert "act" in {p for p in ("ask", "act") if rbac.allowed(engine, "carol", p, "Processes")}
    u = a.update_user(ROOT, "carol", role="Approver", email="carol@example.com", groups=[], assignments=[])
    assert (u.role, u.email, u.groups, u.assignments) == ("Approver", "carol@example.com", (), ())
    row = audit.query(engine, action="user_update", object="carol").items[0]
    assert row.before["role"] == "Questioner" and row.after["role"] == "Approver"
    assert row.before["groups"] == ["paris"] and row.after["groups"] == []
    assert row.actor == "test" and row.source == "cli:test"
    assert "password" not in str(row.before) + str(row.after)
    s = a.login("carol", BOB_PW, "192.0.2.1")
    a.delete_user(ROOT, "carol")
    assert a.authenticate(s.token) is None
    with pytest.raises(NotFound):
        a.get_user(ROOT, "carol")
    with pytest.raises(NotFound):
        a.delete_user(ROOT, "carol")
    with pytest.raises(NotFound):
        a.update_user(ROOT, "x" * 10_000, disabled=True)
    assert ("user_delete", "carol") in actions(engine, action="user_delete")
    assert ("user_create", "carol") in actions(engine, action="user_create")


def test_only_administrators_administer(a):
    bob = a.authenticate(a.login("bob", BOB_PW, "192.0.2.1").token)
    viewer = Actor.of(bob, "192.0.2.1")
    for call in (lambda: a.list_users(viewer), lambda: a.get_user(viewer, "admin"),
                 lambda: a.create_user(viewer, "eve", BOB_PW, "Full Administrator"),
                 lambda: a.update_user(viewer, "bob", role="Full Administrator"),
                 lambda: a.delete_user(viewer, "admin"), lambda: a.reset_password(viewer, "admin", BOB_PW),
                 lambda: a.list_locks(viewer), lambda: a.unlock(viewer, "bob"),
                 lambda: a.query_audit(viewer), lambda: a.end_sessions(viewer, "admin"),
                 lambda: a.list_users("admin")):
        with pytest.raises(Forbidden):
            call()
    assert a.get_user(ROOT, "bob").role == "Viewer"


def test_the_last_full_administrator_stays(a, engine):
    for change in (lambda: a.delete_user(ROOT, "admin"), lambda: a.update_user(ROOT, "admin", disabled=True),
                   lambda: a.update_user(ROOT, "admin", role="Viewer")):
        with pytest.raises(Conflict, match="no enabled Full Administrator"):
            change()
    assert a.get_user(ROOT, "admin").role == "Full Administrator" and not a.get_user(ROOT, "admin").disabled
    a.create_user(ROOT, "root2", BOB_PW, "Full Administrator")
    a.update_user(ROOT, "admin", disabled=True)
    with pytest.raises(Conflict):
        a.delete_user(ROOT, "root2")
    admin2 = Actor.of(a.authenticate(a.login("root2", BOB_PW, "192.0.2.1").token), "192.0.2.1")
    with pytest.raises(Conflict):
        a.delete_user(admin2, "root2")  # not yourself either


def test_two_administrators_disabling_each_other_at_once_leave_one(a, engine):
    a.create_user(ROOT, "root2", BOB_PW, "Full Administrator")
    barrier = threading.Barrier(2)

    def disable(name):
        barrier.wait()
        try:
            a.update_user(ROOT, name, disabled=True)
            return "done"
        except Conflict:
            return "refused"

    with ThreadPoolExecutor(2) as pool:
        results = sorted(pool.map(disable, ["admin", "root2"]))
    assert results == ["done", "refused"]
    assert sum(not u.disabled for u in a.list_users(ROOT) if u.role == "Full Administrator") == 1


# ------------------------------------------------------------------ the audit log
def test_audit_rows_cannot_be_changed_or_deleted(a, engine):
    a.login("bob", BOB_PW, "192.0.2.1")
    assert not [n for n in dir(audit) if n.startswith(("update", "delete", "purge", "remove", "edit"))]
    with pytest.raises(sa.exc.DBAPIError, match="append-only"):
        with engine.begin() as c:
            c.execute(tables.audit_log.update().values(actor="someone else"))
    with pytest.raises(sa.exc.DBAPIError, match="append-only"):
        with engine.begin() as c:
            c.execute(tables.audit_log.delete())
    if engine.dialect.name == "postgresql":
        with pytest.raises(sa.exc.DBAPIError, match="append-only"):
            with engine.begin() as c:
                c.execute(sa.text("TRUNCATE audit_log"))
    assert ("login", "bob") in actions(engine)


def test_audit_query_filters_and_pages(a, engine):
    store.audit(engine, "quanta init", "init", "/srv/q", ports={"https": 443})  # the existing writer
    t0 = time.time()
    for i in range(7):
        audit.record(engine, "alice", "192.0.2.9", "issue", f"instruction:{i}", after={"n": i})
    page = audit.query(engine, actor="alice", limit=3, offset=2)
    assert page.total == 7 and [e.object for e in page.items] == ["instruction:4", "instruction:3", "instruction:2"]
    assert page.items[0].after == {"n": 4} and page.items[0].source == "192.0.2.9"
    assert audit.query(engine, action="init").items[0].details == {"ports": {"https": 443}}
    assert audit.query(engine, action="init").items[0].source == ""
    assert audit.query(engine, object="instruction:6").total == 1
    assert audit.query(engine, since=t0, action="issue").total == 7
    assert audit.query(engine, until=t0, action="issue").total == 0
    assert audit.query(engine, actor="nobody").items == []
    for bad in (dict(limit=0), dict(limit=10**6), dict(offset=-1), dict(offset=2**63), dict(limit=True),
                dict(actor="x" * 1000), dict(action="a\x00"), dict(since="yesterday"), dict(until=float("nan"))):
        with pytest.raises(Invalid):
            audit.query(engine, **bad)


def test_the_policy_comes_from_the_settings():
    from quanta.settings import Settings

    assert Policy.from_settings(Settings()) == Policy()
    custom = Settings(session_ttl=120, login_max_failures=3, password_min_length=16)
    p = Policy.from_settings(custom)
    assert (p.session_ttl, p.login_max_failures, p.password_min_length) == (120, 3, 16)
    with pytest.raises(ValueError):
        Settings(password_min_length=4)  # too weak to be a setting
    with pytest.raises(ValueError):
        Settings(session_ttl=0)


def test_every_error_has_its_http_answer():
    from quanta.accounts import AccountError, http_answer

    assert http_answer(Locked(12.2)) == (429, {"Retry-After": "13"})
    assert http_answer(BadCredentials())[0] == 401
    assert [http_answer(e("x"))[0] for e in (Forbidden, NotFound, Conflict, Invalid)] == [403, 404, 409, 422]
    assert http_answer(AccountError("x"))[0] == 400
    assert "password" not in str(BadCredentials()).replace("wrong username or password", "")
