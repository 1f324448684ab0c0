"""SCALE module Users: logged-on users, local accounts and group membership."""

from __future__ import annotations

import sys

import psutil

from ..spec import ColumnSpec as C
from ..spec import MethodEnv, MethodError, method
from ..spec import ParamSpec as P
from ._common import iso


@method(
    "Users", "GetLoggedOnUsers", "Users with a login session (utmp on POSIX).",
    columns=(C("UserName", "string"), C("Terminal", "string"), C("Host", "string"), C("LoginTime", "datetime"), C("ProcessId", "integer")),
)
def get_logged_on_users(env: MethodEnv, args: dict[str, object]):
    return [[u.name, u.terminal, u.host or None, iso(u.started), getattr(u, "pid", None)] for u in psutil.users()]


@method(
    "Users", "GetLocalUsers", "Local user accounts (the passwd database).",
    columns=(C("UserName", "string"), C("UserId", "integer"), C("GroupId", "integer"), C("FullName", "string"), C("HomeDirectory", "string"), C("Shell", "string")),
    platforms=("linux", "macos"),
)
def get_local_users(env: MethodEnv, args: dict[str, object]):
    import pwd

    return [[p.pw_name, p.pw_uid, p.pw_gid, p.pw_gecos.split(",")[0] or None, p.pw_dir, p.pw_shell] for p in pwd.getpwall()]


@method(
    "Users", "GetLocalGroupMembers", "Members of a local group: listed members and users whose primary group it is.",
    params=(P("GroupName", "string", required=True, description="the local group to query"),),
    columns=(C("GroupName", "string"), C("GroupId", "integer"), C("UserName", "string"), C("IsPrimaryGroup", "boolean")),
    platforms=("linux", "macos"),
)
def get_local_group_members(env: MethodEnv, args: dict[str, object]):
    if sys.platform.startswith("win"):  # pragma: no cover
        raise MethodError("not supported on this platform")
    import grp
    import pwd

    name = str(args["GroupName"])
    try:
        g = grp.getgrnam(name)
    except KeyError:
        return []
    rows = [[g.gr_name, g.gr_gid, m, False] for m in g.gr_mem]
    listed = set(g.gr_mem)
    for p in pwd.getpwall():
        if p.pw_gid == g.gr_gid:
            if p.pw_name in listed:
                for r in rows:
                    if r[2] == p.pw_name:
                        r[3] = True
            else:
                rows.append([g.gr_name, g.gr_gid, p.pw_name, True])
    return rows
