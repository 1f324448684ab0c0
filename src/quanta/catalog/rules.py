"""Catalog rules: the rule file format, its validation, version normalisation and matching (sans-I/O).

A rule file is TOML::

    format = 1                      # required
    name = "quanta-seed"            # rule set name, shown in the UI
    version = "2025.1"              # rule set version

    [[rule]]
    id = "openssl"                  # unique, [A-Za-z0-9_.-]
    match = "regex"                 # "exact" (case-insensitive equality) or "regex" (case-insensitive fullmatch)
    title = '(lib)?openssl[0-9.]*'  # matched against the raw title
    publisher = '.*'                # optional; matched against the raw publisher the same way
    vendor = "OpenSSL Project"
    product = "OpenSSL"
    category = "Security"
    priority = 100                  # optional, default 0; the highest priority wins
    version_pattern = '...'         # optional regex whose first group is the version

Among matching rules the highest ``priority`` wins; on a tie an exact rule beats a regex rule,
then the earlier rule in the file wins. Errors name the line of the offending rule or key.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

FORMAT = 1
MAX_FILE_BYTES = 16 * 1024 * 1024
MAX_RULES = 100_000
MAX_FIELD = 512  # raw publisher/title/version are cut to this many characters

Category = str


class RuleFileError(ValueError):
    """A rule file was refused. ``line`` is 1-based (0 when unknown)."""

    def __init__(self, line: int, reason: str) -> None:
        self.line = line
        self.reason = reason
        super().__init__(f"line {line}: {reason}" if line else reason)


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$")
    match: Literal["exact", "regex"]
    title: str = Field(min_length=1, max_length=1024)
    publisher: str | None = Field(default=None, max_length=1024)
    vendor: str = Field(min_length=1, max_length=255)
    product: str = Field(min_length=1, max_length=255)
    category: str = Field(min_length=1, max_length=128)
    priority: int = Field(default=0, ge=-1_000_000, le=1_000_000)
    version_pattern: str | None = Field(default=None, max_length=1024)

    @model_validator(mode="after")
    def _regexes_compile(self) -> Rule:
        fields = ["version_pattern"] + (["title", "publisher"] if self.match == "regex" else [])
        for name in fields:
            value = getattr(self, name)
            if value is None:
                continue
            try:
                rx = re.compile(value, re.IGNORECASE)
            except re.error as e:
                raise ValueError(f"{name}: invalid regular expression {value!r}: {e}") from None
            if name == "version_pattern" and rx.groups < 1:
                raise ValueError(f"version_pattern {value!r} needs a capture group holding the version")
        return self


class RuleFile(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    format: Literal[1]
    name: str = Field(min_length=1, max_length=128)
    version: str = Field(min_length=1, max_length=64)
    rule: list[Rule] = Field(default_factory=list, max_length=MAX_RULES)

    @field_validator("rule")
    @classmethod
    def _unique_ids(cls, v: list[Rule]) -> list[Rule]:
        seen: set[str] = set()
        for i, r in enumerate(v):
            if r.id in seen:
                raise _DuplicateId(i, r.id)
            seen.add(r.id)
        return v


class _DuplicateId(ValueError):
    def __init__(self, index: int, rule_id: str) -> None:
        self.index = index
        super().__init__(f"duplicate rule id {rule_id!r}")


_RULE_HEADER = re.compile(r"^\s*\[\[\s*rule\s*\]\]\s*(#.*)?$")


def _locate(text: str, loc: tuple[Any, ...]) -> int:
    """The line of a pydantic error location ('rule', index, key) or (key,) in the TOML text."""
    lines = text.splitlines()
    headers = [i for i, ln in enumerate(lines) if _RULE_HEADER.match(ln)]
    start, end = 0, (headers[0] if headers else len(lines))
    key = loc[0] if loc else None
    if len(loc) >= 2 and loc[0] == "rule" and isinstance(loc[1], int):
        if loc[1] >= len(headers):
            return 0
        start = headers[loc[1]]
        end = headers[loc[1] + 1] if loc[1] + 1 < len(headers) else len(lines)
        key = loc[2] if len(loc) > 2 else None
        if key is None:
            return start + 1
    if isinstance(key, str):
        rx = re.compile(rf"^\s*{re.escape(key)}\s*=")
        for i in range(start, end):
            if rx.match(lines[i]):
                return i + 1
    return start + 1 if start or headers else 0


def parse_rule_file(data: bytes) -> RuleFile:
    """Parse and validate a rule file, or raise :class:`RuleFileError` with the line and the reason."""
    if len(data) > MAX_FILE_BYTES:
        raise RuleFileError(0, f"file is {len(data)} bytes; the limit is {MAX_FILE_BYTES}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise RuleFileError(line, "not valid UTF-8") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"\(at line (\d+), column (\d+)\)", str(e))
        line = int(m.group(1)) if m else (len(text.splitlines()) if "end of document" in str(e) else 0)
        reason = re.sub(r"\s*\((at line \d+, column \d+|at end of document)\)", "", str(e))
        raise RuleFileError(line, f"TOML syntax: {reason}") from None
    try:
        return RuleFile.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = tuple(err["loc"])
        ctx_err = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_err, _DuplicateId):
            loc = ("rule", ctx_err.index, "id")
        where = ".".join(str(x) for x in loc)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            msg = "missing required key"
        elif err["type"] == "extra_forbidden":
            msg = "unknown key"
        reason = f"{where}: {msg}" if where else msg
        if len(e.errors()) > 1:
            reason += f" (and {len(e.errors()) - 1} more error(s))"
        raise RuleFileError(_locate(text, loc), reason) from None


# ---------------------------------------------------------------------------- versions
_EPOCH = re.compile(r"^\d+:")
_VERSION = re.compile(r"\d+(?:\.\d+)*(?:[a-z](?![a-z0-9]))?", re.IGNORECASE)


def normalize_version(raw: str, pattern: re.Pattern[str] | None = None) -> str:
    """The upstream version: no epoch, packaging revision or distribution suffix.

    ``1:3.0.11-1~deb12u2`` -> ``3.0.11``; ``3.0.7-27.el9`` -> ``3.0.7``; ``2.40.1+dfsg-1`` -> ``2.40.1``;
    ``5.2.15(1)-release`` -> ``5.2.15``; ``1.0.2k-fips`` -> ``1.0.2k``; ``v1.4`` -> ``1.4``. A version with no
    digits is returned trimmed. ``pattern``'s first group wins when it matches.
    """
    v = raw.strip()[:MAX_FIELD]
    if pattern is not None:
        m = pattern.search(v)
        if m and m.group(1):
            return m.group(1)
    v = _EPOCH.sub("", v)
    m = _VERSION.search(v)
    return m.group(0) if m else v


# ---------------------------------------------------------------------------- matching
@dataclass(frozen=True, slots=True)
class RawEntry:
    publisher: str
    title: str
    version: str


@dataclass(frozen=True, slots=True)
class Normalized:
    raw: RawEntry
    matched: bool
    rule_id: str | None
    vendor: str | None
    product: str | None
    version: str
    category: str | None


@dataclass(slots=True)
class _Compiled:
    rule: Rule
    order: int
    title_rx: re.Pattern[str] | None
    publisher_rx: re.Pattern[str] | None
    version_rx: re.Pattern[str] | None

    def key(self) -> tuple[int, int, int]:
        return (self.rule.priority, 1 if self.rule.match == "exact" else 0, -self.order)


class Matcher:
    """Normalises raw entries with a rule list (in file order)."""

    def __init__(self, rules: list[Rule]) -> None:
        self._exact: dict[str, list[_Compiled]] = {}
        self._regex: list[_Compiled] = []
        for i, r in enumerate(rules):
            c = _Compiled(
                r, i,
                re.compile(r.title, re.IGNORECASE) if r.match == "regex" else None,
                re.compile(r.publisher, re.IGNORECASE) if r.match == "regex" and r.publisher is not None else None,
                re.compile(r.version_pattern, re.IGNORECASE) if r.version_pattern else None)
            if r.match == "exact":
                self._exact.setdefault(r.title.casefold(), []).append(c)
            else:
                self._regex.append(c)
        self._regex.sort(key=lambda c: c.key(), reverse=True)
        self.count = len(rules)

    def best(self, e: RawEntry) -> _Compiled | None:
        best: _Compiled | None = None
        pub = e.publisher.casefold()
        for c in self._exact.get(e.title.casefold(), ()):
            if c.rule.publisher is not None and c.rule.publisher.casefold() != pub:
                continue
            if best is None or c.key() > best.key():
                best = c
        for c in self._regex:  # sorted best first: the first match is the best regex match
            if best is not None and c.key() < best.key():
                break
            assert c.title_rx is not None
            if c.title_rx.fullmatch(e.title) and (c.publisher_rx is None or c.publisher_rx.fullmatch(e.publisher)):
                if best is None or c.key() > best.key():
                    best = c
                break
        return best

    def normalize(self, e: RawEntry) -> Normalized:
        e = RawEntry(e.publisher.strip()[:MAX_FIELD], e.title.strip()[:MAX_FIELD], e.version.strip()[:MAX_FIELD])
        c = self.best(e)
        if c is None:
            return Normalized(e, False, None, None, None, normalize_version(e.version), None)
        r = c.rule
        return Normalized(e, True, r.id, r.vendor, r.product, normalize_version(e.version, c.version_rx), r.category)
