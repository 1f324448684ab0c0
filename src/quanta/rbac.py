"""Roles, instruction sets and management groups.

A user's global role (``users.role``) applies to every instruction set. ``role_assignments``
add roles for one instruction set (or ``*``). Management groups limit which devices a user may
reach; a user in no group reaches every device, a Full Administrator always does.
"""

from __future__ import annotations

import fnmatch
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from quanta.db.tables import device_attributes, devices, management_groups, role_assignments, user_groups, users

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
RULE_KEYS = ("devices", "os_like", "tags", "attributes")


def set_group(engine: sa.Engine, name: str, rule: dict[str, Any]) -> None:
    """Create or replace a group. ``tags`` match what the device reports of itself (a device can
    set them); ``attributes`` match server-assigned attributes (:func:`set_attributes`), which
    only an administrator sets."""
    unknown = set(rule) - set(RULE_KEYS)
    if unknown:
        raise ValueError(f"unknown rule key(s) {sorted(unknown)}; use {', '.join(RULE_KEYS)}")
    for key in ("tags", "attributes"):
        if key in rule and not (isinstance(rule[key], dict)
                                and all(isinstance(k, str) and isinstance(v, str) for k, v in rule[key].items())):
            raise ValueError(f"{key} must map names to string values")
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
    if not all(tags.get(k) == v for k, v in (rule.get("tags") or {}).items()):
        return False
    attributes = device.get("attributes") or {}
    return all(attributes.get(k) == v for k, v in (rule.get("attributes") or {}).items())


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
        if any(rule.get("attributes") for rule in rules):  # read only when a rule uses them
            attrs: dict[str, dict[str, str]] = {}
            for dev, k, v in c.execute(sa.select(device_attributes.c.device_id, device_attributes.c.name,
                                                 device_attributes.c.value)):
                attrs.setdefault(dev, {})[k] = v
            for d in rows:
                d["attributes"] = attrs.get(d["device_id"], {})
    return {d["device_id"] for d in rows if any(matches(rule, d) for rule in rules)}


# ----------------------------------------------------------------- server-assigned attributes
ATTRIBUTE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MAX_ATTRIBUTES = 64  # per device


class UnknownDevice(KeyError):
    pass


def attributes_of(engine: sa.Engine, device_ids: list[str] | None = None) -> dict[str, dict[str, str]]:
    """device id -> its server-assigned attributes (only devices that have some)."""
    q = sa.select(device_attributes.c.device_id, device_attributes.c.name, device_attributes.c.value)
    if device_ids is not None:
        q = q.where(device_attributes.c.device_id.in_(device_ids))
    out: dict[str, dict[str, str]] = {}
    with engine.connect() as c:
        for dev, k, v in c.execute(q):
            out.setdefault(dev, {})[k] = v
    return out


def set_attributes(engine: sa.Engine, device_id: str, changes: dict[str, str | None], by: str) -> dict[str, str]:
    """Set (a string) or remove (None) server-assigned attributes of a known device; returns them
    all. Names are 1-64 of ``[A-Za-z0-9_.-]``, values at most 255 characters without NUL; at most
    :data:`MAX_ATTRIBUTES` per device. Raises :class:`UnknownDevice` or ValueError, changing nothing."""
    for k, v in changes.items():
        if not ATTRIBUTE_NAME.fullmatch(k):
            raise ValueError(f"attribute name {k[:80]!r}: 1-64 letters, digits, '_', '.', '-'")
        if v is not None and (len(v) > 255 or "\x00" in v):
            raise ValueError(f"attribute {k!r}: a value is at most 255 characters, without NUL")
    now = time.time()
    with engine.begin() as c:
        if c.execute(sa.select(devices.c.device_id).where(devices.c.device_id == device_id)).first() is None:
            raise UnknownDevice(device_id)
        current = {k: v for k, v in c.execute(sa.select(device_attributes.c.name, device_attributes.c.value)
                                               .where(device_attributes.c.device_id == device_id))}
        after = {**current, **{k: v for k, v in changes.items() if v is not None}}
        for k, v in changes.items():
            if v is None:
                after.pop(k, None)
        if len(after) > MAX_ATTRIBUTES:
            raise ValueError(f"a device has at most {MAX_ATTRIBUTES} attributes")
        c.execute(device_attributes.delete().where(device_attributes.c.device_id == device_id,
                                                   device_attributes.c.name.in_(list(changes))))
        rows = [dict(device_id=device_id, name=k, value=v, set_by=by, set_at=now)
                for k, v in changes.items() if v is not None]
        if rows:
            c.execute(device_attributes.insert(), rows)
    return after


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
