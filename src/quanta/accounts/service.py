"""Sessions, login throttling and user administration over the Master database.

Synchronous SQLAlchemy, no framework: call it from a worker thread (``asyncio.to_thread``). An
:class:`Accounts` holds only the engine and its :class:`Policy`, so one instance may serve every
thread. Every event is one audit row, written in the same transaction as the change it records.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from quanta.db.tables import login_failures, login_locks, management_groups, role_assignments
from quanta.db.tables import sessions, user_groups, users
from quanta.roles import FULL_ADMIN, ROLES

from . import audit, validate
from .errors import BadCredentials, Conflict, Forbidden, Invalid, Locked, NotFound
from .passwords import burn, hash_password, needs_rehash, verify_password

TOKEN_MAX = 256  # a longer bearer token cannot be one of ours; refused before hashing


@dataclass(frozen=True, slots=True)
class Policy:
    """Session lifetimes, lockout thresholds and password rules (``quanta.toml``, see docs/configuration.md)."""

    session_ttl: float = 15 * 60  # idle: a token not used for this long expires
    session_max_age: float = 8 * 3600  # absolute: no renewal goes past this
    session_renew_interval: float = 60  # renewal writes at most this often per session
    login_max_failures: int = 5  # per user name, within the window, then it is locked
    login_source_max_failures: int = 20  # per source address, within the window, then it is locked
    login_failure_window: float = 15 * 60
    login_lock_duration: float = 15 * 60
    password_min_length: int = 12

    @classmethod
    def from_settings(cls, settings: Any) -> Policy:
        return cls(**{name: getattr(settings, name) for name in cls.__dataclass_fields__ if hasattr(settings, name)})


@dataclass(frozen=True, slots=True)
class User:
    """The signed-in user, as :meth:`Accounts.authenticate` returns it."""

    id: int
    username: str
    role: str
    email: str | None = None
    session_id: int | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == FULL_ADMIN


@dataclass(frozen=True, slots=True)
class UserRecord:
    """A user as administrators see it (never the password hash)."""

    username: str
    role: str
    email: str | None
    disabled: bool
    created_at: float
    updated_at: float | None
    password_changed_at: float | None
    assignments: tuple[tuple[str, str], ...] = ()  # (role, instruction set or "*")
    groups: tuple[str, ...] = ()
    sessions: int = 0  # live sessions
    locked_until: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(username=self.username, role=self.role, email=self.email, disabled=self.disabled,
                    created_at=self.created_at, updated_at=self.updated_at,
                    password_changed_at=self.password_changed_at,
                    assignments=[{"role": r, "instruction_set": s} for r, s in self.assignments],
                    groups=list(self.groups), sessions=self.sessions, locked_until=self.locked_until)

    def state(self) -> dict[str, Any]:
        """What the audit log records before and after a change."""
        d = self.to_dict()
        for k in ("created_at", "updated_at", "password_changed_at", "sessions", "locked_until"):
            d.pop(k)
        return d


@dataclass(frozen=True, slots=True)
class Session:
    """A new session. ``token`` is the bearer token: it exists here only, the database has its hash."""

    token: str = field(repr=False)
    expires_at: float
    absolute_expires_at: float
    user: User


@dataclass(frozen=True, slots=True)
class Lock:
    kind: str  # "user" | "source"
    subject: str
    locked_at: float
    locked_until: float
    failures: int

    def to_dict(self) -> dict[str, Any]:
        return dict(kind=self.kind, subject=self.subject, locked_at=self.locked_at,
                    locked_until=self.locked_until, failures=self.failures)


@dataclass(frozen=True, slots=True)
class Actor:
    """Who asks for a change, from where. ``admin``: a Full Administrator (or the local operator)."""

    name: str
    source: str = ""
    admin: bool = False

    @classmethod
    def of(cls, user: User, source: str) -> Actor:
        return cls(name=user.username, source=source, admin=user.is_admin)

    @classmethod
    def local(cls, name: str, source: str = "local") -> Actor:
        """The operator on the server (the CLI), who can read the databases anyway."""
        return cls(name=name, source=source, admin=True)


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def _now() -> float:
    return time.time()


class Accounts:
    def __init__(self, engine: sa.Engine, policy: Policy | None = None) -> None:
        self.engine = engine
        self.policy = policy or Policy()

    # ------------------------------------------------------------------ audit
    def record(self, actor: str, source: str, action: str, object: str = "", before: Any = None,
               after: Any = None, **details: Any) -> None:
        audit.record(self.engine, actor, source, action, object, before, after, **details)

    def query_audit(self, actor_: Actor, **filters: Any) -> audit.AuditPage:
        self._admin(actor_)
        return audit.query(self.engine, **filters)

    # ------------------------------------------------------------------ login
    def login(self, name: str, password: str, source_address: str) -> Session:
        """A new session, or :class:`Locked` (retry_after seconds) or :class:`BadCredentials`.

        The attempt is counted (pending) *before* the password is checked and forgiven when it is
        right; one that finds the allowance used up by failures and pending attempts is refused
        unchecked (``Locked``, retry after 1 s when no lock is set yet), so concurrent guesses cannot
        exceed the allowance. The lock itself is set by failures alone. An unknown name costs one
        Argon2 verification like a known one, and is counted and locked like one.
        """
        p = self.policy
        source = validate.source(source_address)
        subject = validate.login_name(name)
        given = validate.login_password(password)
        shown = subject if subject is not None else "(invalid name)"
        now = _now()
        retry = self._locked_for(subject, source, now)
        if retry:
            self.record(shown, source, "login_locked", shown, retry_after=round(retry))
            raise Locked(retry)
        attempt, n_user, n_source = self._count_attempt(subject, source, now)
        if n_user > p.login_max_failures or n_source > p.login_source_max_failures:
            # more attempts in the window (failed, or being checked right now) than are allowed:
            # refused unchecked, so concurrent guesses cannot go past the allowance
            with self.engine.begin() as c:
                c.execute(login_failures.delete().where(login_failures.c.id == attempt))
                audit.write(c, shown, source, "login_throttled", shown)
            retry = self._locked_for(subject, source, now)
            raise Locked(retry or 1)
        row = None
        if subject is not None:
            with self.engine.connect() as c:
                row = c.execute(sa.select(users).where(users.c.username == subject)).first()
        ok = False
        if given is None:
            reason = "invalid password"
        elif row is None:
            burn(given)
            reason = "unknown user" if subject is not None else "invalid name"
        else:
            ok = verify_password(row.password_hash, given)
            reason = "wrong password"
            if ok and row.disabled:
                ok, reason = False, "disabled"
        if not ok:
            with self.engine.begin() as c:
                c.execute(login_failures.update().where(login_failures.c.id == attempt).values(pending=False))
                audit.write(c, shown, source, "login_failed", shown, details=dict(reason=reason))
            f_user, f_source = self._failures(subject, source, now)
            if f_user >= p.login_max_failures or f_source >= p.login_source_max_failures:
                raise Locked(self._lock(subject, source, f_user, f_source, now))
            raise BadCredentials()
        assert row is not None and given is not None
        with self.engine.begin() as c:  # forgiven: this attempt and the user's earlier failures
            c.execute(login_failures.delete().where(sa.or_(
                login_failures.c.id == attempt,
                sa.and_(login_failures.c.username == subject, login_failures.c.pending == sa.false()))))
            if needs_rehash(row.password_hash):
                c.execute(users.update().where(users.c.id == row.id).values(password_hash=hash_password(given)))
            c.execute(sessions.delete().where(sessions.c.absolute_expires_at < now))
            session = self._new_session(c, row, source, now)
            audit.write(c, row.username, source, "login", row.username)
        return session

    def _new_session(self, c: sa.Connection, row: Any, source: str, now: float) -> Session:
        p = self.policy
        token = secrets.token_urlsafe(32)
        absolute = now + p.session_max_age
        expires = min(now + p.session_ttl, absolute)
        sid = c.execute(sessions.insert().values(
            token_hash=token_hash(token), user_id=row.id, source=source, created_at=now, last_used_at=now,
            expires_at=expires, absolute_expires_at=absolute, revoked_at=None)).inserted_primary_key[0]
        return Session(token=token, expires_at=expires, absolute_expires_at=absolute,
                       user=User(id=row.id, username=row.username, role=row.role, email=row.email, session_id=sid))

    def _locked_for(self, subject: str | None, source: str, now: float) -> float:
        """Seconds until the later of the locks on this name and this source ends (0: none)."""
        cond = [sa.and_(login_locks.c.kind == "source", login_locks.c.subject == source)]
        if subject is not None:
            cond.append(sa.and_(login_locks.c.kind == "user", login_locks.c.subject == subject))
        with self.engine.connect() as c:
            until = c.execute(sa.select(sa.func.max(login_locks.c.locked_until))
                              .where(sa.or_(*cond), login_locks.c.locked_until > now)).scalar()
        return (until - now) if until else 0.0

    def _count_attempt(self, subject: str | None, source: str, now: float) -> tuple[int, int, int]:
        """Store this attempt as pending (committed), then count the attempts in the window, failed
        or pending, this one included: (its id, per name, per source)."""
        since = now - self.policy.login_failure_window
        with self.engine.begin() as c:
            c.execute(login_failures.delete().where(login_failures.c.at < since))
            attempt = c.execute(login_failures.insert().values(at=now, username=subject, source=source,
                                                               pending=True)).inserted_primary_key[0]
        n_user, n_source = self._failures(subject, source, now, pending=True)
        return attempt, n_user, n_source

    def _failures(self, subject: str | None, source: str, now: float, pending: bool = False) -> tuple[int, int]:
        """Failed attempts in the window per name and per source (``pending``: and those being checked)."""
        since = now - self.policy.login_failure_window
        extra = [] if pending else [login_failures.c.pending == sa.false()]
        with self.engine.connect() as c:
            n_source = c.execute(sa.select(sa.func.count()).select_from(login_failures).where(
                login_failures.c.source == source, login_failures.c.at >= since, *extra)).scalar_one()
            n_user = 0
            if subject is not None:
                n_user = c.execute(sa.select(sa.func.count()).select_from(login_failures).where(
                    login_failures.c.username == subject, login_failures.c.at >= since, *extra)).scalar_one()
        return n_user, n_source

    def _lock(self, subject: str | None, source: str, n_user: int, n_source: int, now: float) -> float:
        """Lock the name and/or the source that reached their allowance; audit each new lock."""
        p = self.policy
        until = now + p.login_lock_duration
        wanted = []
        if subject is not None and n_user >= p.login_max_failures:
            wanted.append(("user", subject, n_user))
        if n_source >= p.login_source_max_failures:
            wanted.append(("source", source, n_source))
        with self.engine.begin() as c:
            c.execute(login_locks.delete().where(login_locks.c.locked_until < now))  # ended locks
            for kind, subj, n in wanted:
                held = c.execute(sa.select(login_locks.c.locked_until).where(
                    login_locks.c.kind == kind, login_locks.c.subject == subj)).scalar()
                if held is not None and held > now:  # locked already (a concurrent attempt): keep it
                    until = max(until, held)
                    continue
                c.execute(login_locks.delete().where(login_locks.c.kind == kind, login_locks.c.subject == subj))
                c.execute(login_locks.insert().values(kind=kind, subject=subj, locked_at=now,
                                                      locked_until=now + p.login_lock_duration, failures=n))
                audit.write(c, "quanta", source, "lockout", f"{kind}:{subj}",
                            details=dict(failures=n, locked_until=now + p.login_lock_duration))
        return until - now

    # ------------------------------------------------------------------ sessions
    def authenticate(self, token: str) -> User | None:
        """The user of a live session (renewing it), or None: unknown, expired, revoked, disabled user."""
        if not isinstance(token, str) or not 16 <= len(token) <= TOKEN_MAX:
            return None
        now = _now()
        with self.engine.connect() as c:
            row = c.execute(sa.select(sessions.c.id, sessions.c.expires_at, sessions.c.absolute_expires_at,
                                      sessions.c.last_used_at, sessions.c.revoked_at, users.c.id.label("uid"),
                                      users.c.username, users.c.role, users.c.email, users.c.disabled)
                            .join(users, users.c.id == sessions.c.user_id)
                            .where(sessions.c.token_hash == token_hash(token))).first()
        if (row is None or row.revoked_at is not None or row.disabled or row.expires_at <= now
                or row.absolute_expires_at <= now):
            return None
        if now - row.last_used_at >= self.policy.session_renew_interval:
            with self.engine.begin() as c:  # compare-and-set: concurrent requests renew once
                c.execute(sessions.update().where(sessions.c.id == row.id, sessions.c.revoked_at.is_(None),
                                                  sessions.c.last_used_at == row.last_used_at)
                          .values(last_used_at=now,
                                  expires_at=min(now + self.policy.session_ttl, row.absolute_expires_at)))
        return User(id=row.uid, username=row.username, role=row.role, email=row.email, session_id=row.id)

    def logout(self, token: str, source_address: str = "") -> bool:
        """End this session now. False if the token was not a live session."""
        if not isinstance(token, str) or not 16 <= len(token) <= TOKEN_MAX:
            return False
        now = _now()
        with self.engine.begin() as c:
            row = c.execute(sa.select(sessions.c.id, users.c.username).join(users, users.c.id == sessions.c.user_id)
                            .where(sessions.c.token_hash == token_hash(token), sessions.c.revoked_at.is_(None),
                                   sessions.c.expires_at > now)).first()
            if row is None:
                return False
            c.execute(sessions.update().where(sessions.c.id == row.id).values(revoked_at=now))
            audit.write(c, row.username, source_address, "logout", row.username)
        return True

    @staticmethod
    def _end_sessions(c: sa.Connection, user_id: int, now: float) -> int:
        return c.execute(sessions.update().where(sessions.c.user_id == user_id, sessions.c.revoked_at.is_(None))
                         .values(revoked_at=now)).rowcount

    def end_sessions(self, actor: Actor, name: str) -> int:
        """Sign a user out everywhere (administrators)."""
        self._admin(actor)
        now = _now()
        with self.engine.begin() as c:
            uid = self._user_id(c, name)
            n = self._end_sessions(c, uid, now)
            audit.write(c, actor.name, actor.source, "sessions_end", name, details=dict(sessions=n))
        return n

    # ------------------------------------------------------------------ locks
    def list_locks(self, actor: Actor) -> list[Lock]:
        self._admin(actor)
        with self.engine.connect() as c:
            rows = c.execute(sa.select(login_locks).where(login_locks.c.locked_until > _now())
                             .order_by(login_locks.c.locked_until.desc())).all()
        return [Lock(r.kind, r.subject, r.locked_at, r.locked_until, r.failures) for r in rows]

    def unlock(self, actor: Actor, subject: str, kind: str = "user") -> bool:
        """Lift a lock on a user name (``kind="user"``) or a source address (``"source"``) and forget its
        failures. False if there was no live lock (the failures are forgotten all the same)."""
        self._admin(actor)
        if kind not in ("user", "source"):
            raise Invalid("kind is user or source")
        subject = validate.source(subject) if kind == "source" else validate.login_name(subject)
        if subject is None:
            raise Invalid("not a user name")
        now = _now()
        col = login_failures.c.username if kind == "user" else login_failures.c.source
        with self.engine.begin() as c:
            before = c.execute(sa.select(login_locks).where(login_locks.c.kind == kind,
                                                            login_locks.c.subject == subject)).first()
            c.execute(login_locks.delete().where(login_locks.c.kind == kind, login_locks.c.subject == subject))
            c.execute(login_failures.delete().where(col == subject))
            live = before is not None and before.locked_until > now
            audit.write(c, actor.name, actor.source, "unlock", f"{kind}:{subject}",
                        before=dict(locked_until=before.locked_until) if before else None, after=None)
        return live

    # ------------------------------------------------------------------ users
    def list_users(self, actor: Actor) -> list[UserRecord]:
        self._admin(actor)
        with self.engine.connect() as c:
            return self._records(c, None)

    def get_user(self, actor: Actor, name: str) -> UserRecord:
        self._admin(actor)
        with self.engine.connect() as c:
            found = self._records(c, name)
        if not found:
            raise NotFound(f"no user {name!r}" if validate.login_name(name) else "no such user")
        return found[0]

    def create_user(self, actor: Actor, name: str, password: str, role: str, *, email: str | None = None,
                    groups: Sequence[str] = (), assignments: Sequence[tuple[str, str]] = ()) -> UserRecord:
        self._admin(actor)
        name = validate.username(name)
        password = validate.password(password, self.policy.password_min_length, name)
        role = self._role(role)
        email = validate.email(email)
        assignments = self._assignments(assignments)
        groups = self._group_names(groups)
        now = _now()
        pw_hash = hash_password(password)
        try:
            with self.engine.begin() as c:
                if c.execute(sa.select(users.c.id).where(users.c.username == name)).first():
                    raise Conflict(f"user {name!r} exists")
                self._check_groups(c, groups)
                c.execute(users.insert().values(username=name, password_hash=pw_hash, role=role, email=email,
                                                disabled=False, created_at=now, updated_at=now,
                                                password_changed_at=now))
                self._write_grants(c, name, groups, assignments)
                rec = self._records(c, name)[0]
                audit.write(c, actor.name, actor.source, "user_create", name, before=None, after=rec.state())
        except sa.exc.IntegrityError:  # a concurrent create of the same name
            raise Conflict(f"user {name!r} exists") from None
        return rec

    def update_user(self, actor: Actor, name: str, *, role: str = UNSET, email: str | None = UNSET,
                    disabled: bool = UNSET, groups: Sequence[str] = UNSET,
                    assignments: Sequence[tuple[str, str]] = UNSET) -> UserRecord:
        """Change what is given (UNSET: unchanged). ``groups`` and ``assignments`` replace the lists.
        Disabling ends the user's sessions; no change may leave no enabled Full Administrator."""
        self._admin(actor)
        values: dict[str, Any] = {}
        if role is not UNSET:
            values["role"] = self._role(role)
        if email is not UNSET:
            values["email"] = validate.email(email)
        if disabled is not UNSET:
            if not isinstance(disabled, bool):
                raise Invalid("disabled is true or false")
            values["disabled"] = disabled
        if groups is not UNSET:
            groups = self._group_names(groups)
        if assignments is not UNSET:
            assignments = self._assignments(assignments)
        now = _now()
        with self.engine.begin() as c:
            admins = self._hold_admins(c)
            uid = self._user_id(c, name)
            before = self._records(c, name)[0]
            if groups is not UNSET:
                self._check_groups(c, groups)
            if values:
                c.execute(users.update().where(users.c.id == uid).values(**values, updated_at=now))
            self._write_grants(c, name, None if groups is UNSET else groups,
                               None if assignments is UNSET else assignments)
            self._refuse_no_admin(c, admins)
            ended = self._end_sessions(c, uid, now) if values.get("disabled") else 0
            after = self._records(c, name)[0]
            if after.state() != before.state():
                action = ("user_disable" if values.get("disabled") and not before.disabled else
                          "user_enable" if values.get("disabled") is False and before.disabled else "user_update")
                audit.write(c, actor.name, actor.source, action, name, before=before.state(), after=after.state(),
                            details=dict(sessions_ended=ended) if ended else None)
        return after

    def delete_user(self, actor: Actor, name: str) -> None:
        self._admin(actor)
        if actor.name == name:
            raise Conflict("you cannot delete yourself")
        with self.engine.begin() as c:
            admins = self._hold_admins(c)
            uid = self._user_id(c, name)
            before = self._records(c, name)[0]
            c.execute(sessions.delete().where(sessions.c.user_id == uid))
            c.execute(role_assignments.delete().where(role_assignments.c.username == name))
            c.execute(user_groups.delete().where(user_groups.c.username == name))
            c.execute(users.delete().where(users.c.id == uid))
            self._refuse_no_admin(c, admins)
            audit.write(c, actor.name, actor.source, "user_delete", name, before=before.state(), after=None)

    def reset_password(self, actor: Actor, name: str, new_password: str) -> int:
        """Set a user's password (administrators); ends all of the user's sessions. Returns how many."""
        self._admin(actor)
        new_password = validate.password(new_password, self.policy.password_min_length, name)
        pw_hash = hash_password(new_password)
        now = _now()
        with self.engine.begin() as c:
            uid = self._user_id(c, name)
            c.execute(users.update().where(users.c.id == uid).values(password_hash=pw_hash, password_changed_at=now,
                                                                     updated_at=now))
            n = self._end_sessions(c, uid, now)
            c.execute(login_failures.delete().where(login_failures.c.username == name))
            audit.write(c, actor.name, actor.source, "password_reset", name, details=dict(sessions_ended=n))
        return n

    def change_password(self, name: str, old_password: str, new_password: str, source_address: str) -> Session:
        """Change your own password (the old one is required, and a wrong one counts as a failed
        login). Ends every session of the user and returns a new one for the caller."""
        source = validate.source(source_address)
        new_password = validate.password(new_password, self.policy.password_min_length, name)
        if new_password == old_password:
            raise Invalid("the new password is the old one")
        try:
            self.login(name, old_password, source)  # throttled, audited; its session is ended below
        except BadCredentials:
            self.record(str(name)[:128], source, "password_change_failed", str(name)[:128])
            raise
        pw_hash = hash_password(new_password)
        now = _now()
        with self.engine.begin() as c:
            row = c.execute(sa.select(users).where(users.c.username == name)).first()
            if row is None or row.disabled:
                raise BadCredentials()
            c.execute(users.update().where(users.c.id == row.id).values(password_hash=pw_hash,
                                                                        password_changed_at=now, updated_at=now))
            n = self._end_sessions(c, row.id, now)
            session = self._new_session(c, row, source, now)
            audit.write(c, name, source, "password_change", name, details=dict(sessions_ended=n))
        return session

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _admin(actor: Actor) -> None:
        if not isinstance(actor, Actor) or not actor.admin:
            raise Forbidden("only Full Administrators administer users")

    @staticmethod
    def _role(role: object) -> str:
        if role not in ROLES:
            raise Invalid(f"unknown role {str(role)[:64]!r}; roles: {', '.join(ROLES)}")
        return str(role)

    def _assignments(self, items: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        out = []
        for item in items:
            try:
                role, iset = item
            except (TypeError, ValueError):
                raise Invalid("an assignment is (role, instruction set)") from None
            if not isinstance(iset, str) or not 1 <= len(iset) <= 128 or validate.has_control(iset):
                raise Invalid("an instruction set name is 1-128 characters without control characters")
            out.append((self._role(role), iset))
        return sorted(set(out))

    @staticmethod
    def _group_names(groups: Iterable[str]) -> list[str]:
        if isinstance(groups, str):
            raise Invalid("groups is a list of names")
        out = []
        for g in groups:
            if not isinstance(g, str) or not 1 <= len(g) <= 128 or validate.has_control(g):
                raise Invalid("a group name is 1-128 characters without control characters")
            out.append(g)
        return sorted(set(out))

    @staticmethod
    def _check_groups(c: sa.Connection, groups: Sequence[str]) -> None:
        if not groups:
            return
        have = set(c.execute(sa.select(management_groups.c.name).where(management_groups.c.name.in_(groups))).scalars())
        missing = [g for g in groups if g not in have]
        if missing:
            raise Invalid(f"no management group {missing[0]!r}")

    @staticmethod
    def _write_grants(c: sa.Connection, name: str, groups: Sequence[str] | None,
                      assignments: Sequence[tuple[str, str]] | None) -> None:
        if groups is not None:
            c.execute(user_groups.delete().where(user_groups.c.username == name))
            if groups:
                c.execute(user_groups.insert(), [dict(username=name, group_name=g) for g in groups])
        if assignments is not None:
            c.execute(role_assignments.delete().where(role_assignments.c.username == name))
            if assignments:
                c.execute(role_assignments.insert(), [dict(username=name, role=r, instruction_set=s)
                                                      for r, s in assignments])

    @staticmethod
    def _user_id(c: sa.Connection, name: str) -> int:
        uid = c.execute(sa.select(users.c.id).where(users.c.username == name)).scalar() \
            if validate.login_name(name) else None
        if uid is None:
            raise NotFound(f"no user {name!r}" if validate.login_name(name) else "no such user")
        return uid

    @staticmethod
    def _hold_admins(c: sa.Connection) -> int:
        """Take the write lock on the Full Administrators' rows before anything is read: on
        PostgreSQL a row lock, on SQLite the database's write lock. Two administrators disabling
        each other at once then run one after the other, and the second sees the first's change.
        Returns how many enabled Full Administrators there are."""
        c.execute(users.update().where(users.c.role == FULL_ADMIN).values(role=users.c.role))
        return Accounts._admin_count(c)

    @staticmethod
    def _admin_count(c: sa.Connection) -> int:
        return c.execute(sa.select(sa.func.count()).select_from(users).where(
            users.c.role == FULL_ADMIN, users.c.disabled == sa.false())).scalar_one()

    @staticmethod
    def _refuse_no_admin(c: sa.Connection, before: int) -> None:
        if before > 0 and Accounts._admin_count(c) == 0:
            raise Conflict("refused: this would leave no enabled Full Administrator")

    @staticmethod
    def _records(c: sa.Connection, name: str | None) -> list[UserRecord]:
        q = sa.select(users).order_by(users.c.username)
        if name is not None:
            if validate.login_name(name) is None:
                return []
            q = q.where(users.c.username == name)
        rows = c.execute(q).all()
        if not rows:
            return []
        names = [r.username for r in rows]
        now = _now()
        by_name: dict[str, dict[str, Any]] = {n: {"a": [], "g": [], "s": 0, "l": None} for n in names}
        filt_a = role_assignments.c.username == name if name is not None else sa.true()
        for u, r, s in c.execute(sa.select(role_assignments.c.username, role_assignments.c.role,
                                           role_assignments.c.instruction_set).where(filt_a)):
            if u in by_name:
                by_name[u]["a"].append((r, s))
        filt_g = user_groups.c.username == name if name is not None else sa.true()
        for u, g in c.execute(sa.select(user_groups.c.username, user_groups.c.group_name).where(filt_g)):
            if u in by_name:
                by_name[u]["g"].append(g)
        ids = {r.id: r.username for r in rows}
        filt_s = sessions.c.user_id == rows[0].id if name is not None else sa.true()
        for uid, n in c.execute(sa.select(sessions.c.user_id, sa.func.count()).where(
                filt_s, sessions.c.revoked_at.is_(None), sessions.c.expires_at > now,
                sessions.c.absolute_expires_at > now).group_by(sessions.c.user_id)):
            if uid in ids:
                by_name[ids[uid]]["s"] = n
        filt_l = login_locks.c.subject == name if name is not None else sa.true()
        for subj, until in c.execute(sa.select(login_locks.c.subject, login_locks.c.locked_until).where(
                filt_l, login_locks.c.kind == "user", login_locks.c.locked_until > now)):
            if subj in by_name:
                by_name[subj]["l"] = until
        return [UserRecord(username=r.username, role=r.role, email=r.email, disabled=bool(r.disabled),
                           created_at=r.created_at, updated_at=r.updated_at, password_changed_at=r.password_changed_at,
                           assignments=tuple(sorted(by_name[r.username]["a"])),
                           groups=tuple(sorted(by_name[r.username]["g"])), sessions=by_name[r.username]["s"],
                           locked_until=by_name[r.username]["l"]) for r in rows]
