"""Roles, instruction sets and management groups.

A user's global role (``users.role``) applies to every instruction set. ``role_assignments``
add roles for one instruction set (or ``*``). Management groups limit which devices a user may
reach; a user in no group reaches every device, a Full Administrator always does.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from quanta.db.tables import devices, management_groups, role_assignments, user_groups, users

from quanta.roles import FULL_ADMIN, GRANTS, ROLES, Permission  # noqa: F401 - re-exported


def role_lookup(engine: sa.Engine, username: str) -> Callable[[str], set[str]]:
    """The user's roles per instruction set, read in one go: ``role_lookup(...)(instruction_set)``
    is the global role plus the assignments for that set and for ``*``."""
    with engine.connect() as c:
        glob = c.execute(sa.select(users.c.role).where(users.c.username == username)).scalar()
        by_set: dict[str, set[str]] = {}
        for role, iset in c.execute(sa.select(role_assignments.c.role, role_assignments.c.instruction_set)
                                    .where(role_assignments.c.username == username)):
            by_set.setdefault(iset, set()).add(role)
    everywhere = ({glob} if glob else set()) | by_set.get("*", set())
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
