"""Validation at the boundary: bounded lengths, no control characters."""

from __future__ import annotations

import ipaddress
import re
import unicodedata

from .errors import Invalid

NAME_MAX = 128
EMAIL_MAX = 254
PASSWORD_MAX = 1024
SOURCE_MAX = 64
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]*")
_EMAIL = re.compile(r"[^@\s]{1,64}@[^@\s]{1,189}")


def has_control(s: str) -> bool:
    return any(unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn") for ch in s)


def username(name: object) -> str:
    """A name for a new user: 1-128 of letters, digits and ``. _ @ + -``, starting with a letter or digit."""
    if not isinstance(name, str) or not name:
        raise Invalid("a user name is required")
    if len(name) > NAME_MAX:
        raise Invalid(f"a user name is at most {NAME_MAX} characters")
    if not _NAME.fullmatch(name):
        raise Invalid("a user name may hold letters, digits and . _ @ + - only, and starts with a letter or digit")
    return name


def login_name(name: object) -> str | None:
    """The name given at login, or None when no user could ever have it (checked loosely, so that
    a user created before names were validated can still sign in)."""
    if not isinstance(name, str) or not 1 <= len(name) <= NAME_MAX or has_control(name):
        return None
    return name


def email(value: object) -> str | None:
    """An e-mail address, or None (an empty string clears it)."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > EMAIL_MAX or has_control(value) or not _EMAIL.fullmatch(value):
        raise Invalid(f"not an e-mail address (name@domain, at most {EMAIL_MAX} characters)")
    return value


def password(value: object, min_length: int, username: str | None = None) -> str:
    if not isinstance(value, str):
        raise Invalid("a password is required")
    if len(value) < min_length:
        raise Invalid(f"a password has at least {min_length} characters")
    if len(value) > PASSWORD_MAX:
        raise Invalid(f"a password has at most {PASSWORD_MAX} characters")
    if has_control(value):
        raise Invalid("a password may not hold control characters")
    if username is not None and value.casefold() == username.casefold():
        raise Invalid("a password may not be the user name")
    return value


def login_password(value: object) -> str | None:
    """The password given at login, or None when no password could ever be it."""
    if not isinstance(value, str) or not 1 <= len(value) <= PASSWORD_MAX or has_control(value):
        return None
    return value


def source(address: object) -> str:
    """A source address for counting and the audit log: an IP address as written by Python, or
    the given text bounded and stripped of control characters (``local``, ``cli:root``)."""
    if not isinstance(address, str) or not address:
        return "unknown"
    try:
        return str(ipaddress.ip_address(address.split("%", 1)[0]))
    except ValueError:
        cleaned = "".join(ch if not has_control(ch) else "?" for ch in address)
        return cleaned[:SOURCE_MAX]


def bounded_int(value: object, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise Invalid(f"{name} must be an integer from {lo} to {hi}")
    return value
