"""Login profiles of the ``quanta`` client commands, for use from a workstation.

``quanta login URL --user NAME`` stores a profile in ``$XDG_CONFIG_HOME/quanta/profiles.toml``
(``~/.config/quanta`` by default; the directory 0700, the file 0600) and caches the session token
in ``tokens/PROFILE.json`` next to it (0600). No password is ever stored: sessions are short-lived
and sliding, so once one expires the client says ``session expired: run quanta login again`` --
unless the profile names a ``password_file`` (given to ``quanta login --password-file``), which is
then read again to log in anew (the file stays where the operator keeps it, with its own
permissions). Light on purpose: ``quanta ask`` loads it (standard library only).
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

PROFILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
DEFAULT_NAME = "default"


class ProfileError(ValueError):
    pass


@dataclass(frozen=True)
class Profile:
    name: str
    url: str
    user: str
    ca: Path | None = None
    password_file: Path | None = None


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "quanta"


def profiles_path() -> Path:
    return config_dir() / "profiles.toml"


def token_path(name: str) -> Path:
    return config_dir() / "tokens" / f"{check_name(name)}.json"


def check_name(name: str) -> str:
    if not PROFILE_NAME.fullmatch(name or ""):
        raise ProfileError(f"profile name {name!r}: use letters, digits, '.', '_' or '-' (at most 64)")
    return name


def check_url(url: str) -> str:
    from urllib.parse import urlsplit

    u = urlsplit(url.strip())
    if u.scheme != "https" or not u.hostname:
        raise ProfileError(f"server URL {url!r}: give https://HOST[:PORT] (passwords never travel in clear)")
    if u.path not in ("", "/") or u.query or u.fragment or u.username or u.password:
        raise ProfileError(f"server URL {url!r}: give only https://HOST[:PORT]")
    try:
        port = u.port
    except ValueError:
        raise ProfileError(f"server URL {url!r}: bad port") from None
    host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
    return f"https://{host}" + (f":{port}" if port else "")


def _read() -> dict:
    path = profiles_path()
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ProfileError(f"{path}: {e}") from None


def _toml_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)  # a JSON string is a TOML basic string


def _write(data: dict) -> None:
    d = config_dir()
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(d, 0o700)
    lines = []
    if data.get("default"):
        lines.append(f"default = {_toml_str(data['default'])}\n")
    for name, p in sorted(data.get("profiles", {}).items()):
        lines.append(f"\n[profiles.{_toml_str(name)}]\n")
        for k in ("url", "user", "ca", "password_file"):
            if p.get(k):
                lines.append(f"{k} = {_toml_str(str(p[k]))}\n")
    path = profiles_path()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("".join(lines))
    os.replace(tmp, path)


def save(profile: Profile, make_default: bool = False) -> None:
    check_name(profile.name)
    data = _read()
    profiles = data.setdefault("profiles", {})
    profiles[profile.name] = {"url": profile.url, "user": profile.user,
                              "ca": str(profile.ca) if profile.ca else None,
                              "password_file": str(profile.password_file) if profile.password_file else None}
    if make_default or not data.get("default") or data["default"] not in profiles:
        data["default"] = profile.name
    _write(data)


def load(name: str | None = None) -> Profile:
    """The named profile, or the default one."""
    data = _read()
    profiles = data.get("profiles", {})
    if not isinstance(profiles, dict):
        raise ProfileError(f"{profiles_path()}: [profiles] is not a table")
    if name is None:
        name = data.get("default")
        if not name:
            raise ProfileError("no data directory given and no login profile: run 'quanta login https://SERVER:PORT "
                               "--user NAME' first, or give the server's data directory")
    check_name(name)
    p = profiles.get(name)
    if not isinstance(p, dict) or not isinstance(p.get("url"), str) or not isinstance(p.get("user"), str):
        known = ", ".join(sorted(profiles)) or "none"
        raise ProfileError(f"no login profile {name!r} (profiles: {known}): run 'quanta login URL --user NAME "
                           f"--profile {name}'")
    return Profile(name=name, url=check_url(p["url"]), user=p["user"],
                   ca=Path(p["ca"]) if p.get("ca") else None,
                   password_file=Path(p["password_file"]) if p.get("password_file") else None)
