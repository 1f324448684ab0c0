"""Roles, instruction sets and management groups.

A user's global role (``users.role``) applies to every instruction set. ``role_assignments``
add roles for one instruction set (or ``*``). Management groups limit which devices a user may
reach; a user in no group reaches every device, a Full Administrator always does.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from quanta.db.tables import devices, management_groups, role_assignments, user_groups, users

from quanta.roles import FULL_ADMIN, GRANTS, ROLES, Permission  # noqa: F401 - re-exported


def _roles(engine: sa.Engine, username: str) -> tuple[set[str], dict[str, set[str]], str | None]:
    """(roles on every instruction set, roles per instruction set, global role), in one read."""
    with engine.connect() as c:
        glob = c.execute(sa.select(users.c.role).where(users.c.username == username)).scalar()
        by_set: dict[str, set[str]] = {}
        for role, iset in c.execute(sa.select(role_assignments.c.role, role_assignments.c.instruction_set)
                                    .where(role_assignments.c.username == username)):
            by_set.setdefault(iset, set()).add(role)
    return ({glob} if glob else set()) | by_set.get("*", set()), by_set, glob


def role_lookup(engine: sa.Engine, username: str) -> Callable[[str], set[str]]:
    """The user's roles per instruction set, read in one go: ``role_lookup(...)(instruction_set)``
    is the global role plus the assignments for that set and for ``*``."""
    everywhere, by_set, _ = _roles(engine, username)
    return lambda instruction_set: everywhere | by_set.get(instruction_set, set())


def roles_for(engine: sa.Engine, username: str, instruction_set: str) -> set[str]:
    return role_lookup(engine, username)(instruction_set)


def rights(engine: sa.Engine, username: str) -> Callable[[Permission, str], bool]:
    """The user's rights, read once: ``rights(...)(permission, instruction_set)``; for a request
    that checks many instruction sets (e.g. listing definitions)."""
    roles = role_lookup(engine, username)
    return lambda permission, instruction_set: any(permission in GRANTS.get(r, ()) for r in roles(instruction_set))


def allowed(engine: sa.Engine, username: str, permission: Permission, instruction_set: str) -> bool:
    return rights(engine, username)(permission, instruction_set)


def assign(engine: sa.Engine, username: str, role: str, instruction_set: str) -> None:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")
    with engine.begin() as c:
        c.execute(role_assignments.delete().where(role_assignments.c.username == username,
                                                  role_assignments.c.role == role,
                                                  role_assignments.c.instruction_set == instruction_set))
        c.execute(role_assignments.insert().values(username=username, role=role, instruction_set=instruction_set))


# ----------------------------------------------------------------- management groups
def set_group(engine: sa.Engine, name: str, rule: dict[str, Any]) -> None:
    unknown = set(rule) - {"devices", "os_like", "tags"}
    if unknown:
        raise ValueError(f"unknown rule key(s) {sorted(unknown)}; use devices, os_like, tags")
    with engine.begin() as c:
        c.execute(management_groups.delete().where(management_groups.c.name == name))
        c.execute(management_groups.insert().values(name=name, rule=rule))


def add_member(engine: sa.Engine, username: str, group: str) -> None:
    with engine.begin() as c:
        if c.execute(sa.select(management_groups.c.name).where(management_groups.c.name == group)).first() is None:
            raise ValueError(f"no management group {group!r}")
        c.execute(user_groups.delete().where(user_groups.c.username == username, user_groups.c.group_name == group))
        c.execute(user_groups.insert().values(username=username, group_name=group))


def matches(rule: dict[str, Any], device: dict[str, Any]) -> bool:
    """A device is in a group if it matches every key the rule sets."""
    if "devices" in rule and device["device_id"] not in rule["devices"]:
        return False
    if "os_like" in rule and not fnmatch.fnmatch((device.get("os") or "").lower(), str(rule["os_like"]).lower()):
        return False
    tags = device.get("tags") or {}
    return all(tags.get(k) == v for k, v in (rule.get("tags") or {}).items())


def reachable_devices(engine: sa.Engine, username: str) -> set[str] | None:
    """Device ids the user may reach, or None for every device."""
    with engine.connect() as c:
        role = c.execute(sa.select(users.c.role).where(users.c.username == username)).scalar()
        if role == FULL_ADMIN:
            return None
        rules = [r[0] for r in c.execute(sa.select(management_groups.c.rule).join(
            user_groups, user_groups.c.group_name == management_groups.c.name).where(user_groups.c.username == username))]
        if not rules:
            return None
        rows = [dict(r._mapping) for r in c.execute(sa.select(devices.c.device_id, devices.c.os, devices.c.tags))]
    return {d["device_id"] for d in rows if any(matches(rule, d) for rule in rules)}


def scope_for(engine: sa.Engine, username: str, requested: list[str] | None) -> list[str] | None:
    """Intersect a requested scope with what the user may reach (None = every device)."""
    reach = reachable_devices(engine, username)
    if reach is None:
        return requested
    if requested is None:
        return sorted(reach)
    return [d for d in requested if d in reach]


# ----------------------------------------------------------------- what a user may see
def _grants(roles: set[str], permission: Permission) -> bool:
    return any(permission in GRANTS.get(r, ()) for r in roles)


@dataclass(frozen=True)
class Access:
    """What one user may see, resolved once per request (see :func:`access_for`).

    ``devices``: the device ids of the user's management groups, or None for every device (a
    Full Administrator, or a user in no management group). ``all_sets``: the user may view every
    instruction set (and raw SCALE instructions, which have none); otherwise ``sets`` are the
    instruction sets the user holds a viewing right on."""

    username: str
    role: str
    admin: bool
    devices: frozenset[str] | None
    all_sets: bool
    sets: frozenset[str]

    @property
    def restricted(self) -> bool:
        """Whether reads must be filtered by device at all (False: the fast, unfiltered path)."""
        return self.devices is not None

    def may_view_set(self, instruction_set: str | None) -> bool:
        if self.all_sets:
            return True
        return instruction_set is not None and instruction_set in self.sets


def access_for(engine: sa.Engine, username: str) -> Access:
    """Resolve a user's reading scope. A Full Administrator costs one query (no device is read)."""
    everywhere, by_set, glob = _roles(engine, username)
    role = glob or ""
    if role == FULL_ADMIN:  # as reachable_devices: the global role, not a per-set assignment
        return Access(username, role, True, None, True, frozenset())
    all_sets = _grants(everywhere, "view")
    sets = frozenset(s for s, roles in by_set.items() if s != "*" and _grants(roles, "view"))
    reach = reachable_devices(engine, username)
    return Access(username, role, False, None if reach is None else frozenset(reach), all_sets, sets)
