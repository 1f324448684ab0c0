"""SCALE module Tagging: name/value tags persisted in the agent's data directory (tags.json).

The agent reports its tags to the server in its hello and, after each action it runs (these
methods are actions), on its live connection when they changed (a ``TagReport``; see
``quanta.protocol.agent_session.AgentSession.tags``), so the server sees a change within about a
second. Tags are what a device says of itself; server-assigned attributes are not set here."""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path

from ..spec import ColumnSpec as C
from ..spec import MethodEnv, MethodError, method
from ..spec import ParamSpec as P
from ._common import read_system_file

MAX_NAME = 32
MAX_SCOPABLE_STORE = 510  # characters of "name=value|name=value..." across scopable tags
MAX_TAGS_FILE = 64 * 1024 * 1024  # tags.json is read whole: a regular file up to this size
_LOCK = threading.Lock()
_COLUMNS = (C("Name", "string"), C("Value", "string"), C("Scopable", "boolean"))


def tags_path(data_dir: Path) -> Path:
    return Path(data_dir) / "tags.json"


def load_tags(data_dir: Path) -> dict[str, dict]:
    """{name: {"value": str, "scopable": bool}}; empty when absent or unreadable."""
    data = read_system_file(tags_path(data_dir), MAX_TAGS_FILE)
    try:
        raw = json.loads(data.decode("utf-8")) if data is not None else {}
    except ValueError:
        return {}
    if not isinstance(raw, dict):
        return {}
    out = {}
    for k, v in raw.items():
        if isinstance(k, str) and isinstance(v, dict) and isinstance(v.get("value"), str):
            out[k] = {"value": v["value"], "scopable": bool(v.get("scopable", False))}
    return out


def save_tags(data_dir: Path, tags: dict[str, dict]) -> None:
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=data_dir, prefix=".tags-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(tags, f, ensure_ascii=False, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, tags_path(data_dir))
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _check_name(name: str) -> None:
    if not name or len(name) > MAX_NAME:
        raise MethodError(f"Tag name must be 1 to {MAX_NAME} characters")
    if any(c in name for c in "=|") or not name.isprintable():
        raise MethodError("Tag name must not contain '=', '|' or control characters")


@method(
    "Tagging", "Set", f"Set a tag (name up to {MAX_NAME} characters). Scopable tags share a {MAX_SCOPABLE_STORE}-character store. "
    "The server sees the change at once (the agent reports it on its live connection).",
    params=(P("Name", "string", required=True), P("Value", "string", required=True), P("Scopable", "boolean", default=False)),
    columns=_COLUMNS, is_action=True,
)
def set_tag(env: MethodEnv, args: dict[str, object]):
    name, value, scopable = str(args["Name"]), str(args["Value"]), bool(args["Scopable"])
    _check_name(name)
    if scopable and "|" in value:
        raise MethodError("A scopable tag value must not contain '|'")
    with _LOCK:
        tags = load_tags(env.context.data_dir)
        tags[name] = {"value": value, "scopable": scopable}
        store = "|".join(f"{k}={v['value']}" for k, v in sorted(tags.items()) if v["scopable"])
        if len(store) > MAX_SCOPABLE_STORE:
            raise MethodError(f"Scopable tags exceed the {MAX_SCOPABLE_STORE}-character store")
        save_tags(env.context.data_dir, tags)
    return [[name, value, scopable]]


@method("Tagging", "Get", "One tag by name (empty table when not set).", params=(P("Name", "string", required=True),), columns=_COLUMNS,
        quick=True)
def get_tag(env: MethodEnv, args: dict[str, object]):
    t = load_tags(env.context.data_dir).get(str(args["Name"]))
    return [[str(args["Name"]), t["value"], t["scopable"]]] if t else []


@method(
    "Tagging", "GetAll", "All tags, optionally only scopable (true) or non-scopable (false) ones.",
    params=(P("Scopable", "boolean", default=None),), columns=_COLUMNS,
    quick=True,
)
def get_all(env: MethodEnv, args: dict[str, object]):
    want = args.get("Scopable")
    return [[k, v["value"], v["scopable"]] for k, v in sorted(load_tags(env.context.data_dir).items()) if want is None or v["scopable"] == want]


def _delete(env: MethodEnv, name: str) -> bool:
    _check_name(name)
    with _LOCK:
        tags = load_tags(env.context.data_dir)
        existed = tags.pop(name, None) is not None
        if existed:
            save_tags(env.context.data_dir, tags)
    return existed


@method(
    "Tagging", "Clear",
    "Remove one tag by Name; without a Name, remove every tag of one kind: the non-scopable ones, or the "
    "scopable ones with Scopable: true. One row per tag looked at.",
    params=(P("Name", "string", default=None, description="the tag to remove; omitted: all tags of the kind"),
            P("Scopable", "boolean", default=False, description="with no Name: clear scopable (true) or non-scopable (false) tags")),
    columns=(C("Name", "string"), C("Cleared", "boolean", "false when the tag was not set")), is_action=True,
)
def clear_tag(env: MethodEnv, args: dict[str, object]):
    if args.get("Name") is not None:
        name = str(args["Name"])
        return [[name, _delete(env, name)]]
    scopable = bool(args["Scopable"])
    with _LOCK:
        tags = load_tags(env.context.data_dir)
        gone = sorted(k for k, v in tags.items() if v["scopable"] == scopable)
        for k in gone:
            del tags[k]
        if gone:
            save_tags(env.context.data_dir, tags)
    return [env.take([k, True]) for k in gone]


@method(
    "Tagging", "Delete", "Remove one tag by name (the same as Tagging.Clear with a Name).",
    params=(P("Name", "string", required=True),),
    columns=(C("Name", "string"), C("Deleted", "boolean", "false when the tag was not set")), is_action=True,
)
def delete_tag(env: MethodEnv, args: dict[str, object]):
    name = str(args["Name"])
    return [[name, _delete(env, name)]]


@method(
    "Tagging", "Check",
    "Whether a tag is set: with a Value, whether it is set to that value (compared case-insensitively). "
    "Always one row.",
    params=(P("Name", "string", required=True), P("Value", "string", default=None)),
    columns=(C("Name", "string"), C("Value", "string", "the tag's value, empty when not set"),
             C("Exists", "boolean", "true when set (and equal to Value when one is given)")),
    quick=True,
)
def check_tag(env: MethodEnv, args: dict[str, object]):
    name = str(args["Name"])
    t = load_tags(env.context.data_dir).get(name)
    value = t["value"] if t else ""
    want = args.get("Value")
    exists = t is not None and (want is None or str(want).casefold() == value.casefold())
    return [[name, value, exists]]


@method(
    "Tagging", "Count", "How many tags are set, optionally only scopable (true) or non-scopable (false) ones.",
    params=(P("Scopable", "boolean", default=None),),
    columns=(C("Count", "integer"),),
    quick=True,
)
def count_tags(env: MethodEnv, args: dict[str, object]):
    want = args.get("Scopable")
    return [[sum(1 for v in load_tags(env.context.data_dir).values() if want is None or v["scopable"] == want)]]
