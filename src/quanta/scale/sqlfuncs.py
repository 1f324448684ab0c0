"""Custom SQL functions: REGEXP and REGEXPREPLACE (ECMA-262 style ``$1`` group references).

Patterns run on RE2 (``google-re2``), which matches in time linear in the text: a pattern such
as ``(a+)+$`` cannot backtrack for minutes. RE2 has no backreferences and no lookaround; such a
pattern is refused with a clear error. REGEXPREPLACE builds its result in pieces and stops as
soon as the result would exceed the connection's value limit, so a hostile replacement never
grows past it, and it checks the instruction's deadline and cancellation as it goes.

The sqlite3 module hides the exception of a user-defined function behind "user-defined function
raised exception"; :attr:`SqlFunctions.error` keeps the real reason for the evaluator.
"""

from __future__ import annotations

import re
import sqlite3
from collections import OrderedDict
from collections.abc import Callable

import re2

CACHED_PATTERNS = 16
PATTERN_MEMORY = 2 * 1024 * 1024  # RE2's budget per compiled pattern (program and DFA cache)
CHECK_EVERY = 4096  # matches between two deadline/cancel checks in REGEXPREPLACE
_DOLLAR = re.compile(rb"\$(\$|&|\d{1,2})")


class SqlFunctionError(Exception):
    """A REGEXP/REGEXPREPLACE failure with its reason (bad pattern, result too large, stopped)."""


def re2_options() -> re2.Options:
    """RE2's options wherever Quanta compiles a pattern that a user or a definition supplies."""
    opts = re2.Options()
    opts.log_errors = False  # RE2 would print every refused pattern on stderr
    opts.max_mem = PATTERN_MEMORY  # past it RE2 refuses the pattern or falls back to its (linear) NFA
    return opts


def _utf8(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode("utf-8", "surrogatepass")


class SqlFunctions:
    """REGEXP and REGEXPREPLACE for one connection.

    ``max_bytes`` bounds a REGEXPREPLACE result (the connection's SQLITE_LIMIT_LENGTH);
    ``check`` returns a reason to stop (time limit, cancellation) or None, and is called while
    a long replacement runs.
    """

    def __init__(self, max_bytes: int, check: Callable[[], str | None]) -> None:
        self.max_bytes = max_bytes
        self.check = check
        self.error: str | None = None
        self._cache: OrderedDict[bytes, re2._Regexp] = OrderedDict()
        self._options = re2_options()

    def install(self, conn: sqlite3.Connection) -> None:
        conn.create_function("REGEXP", 2, self.regexp, deterministic=True)
        conn.create_function("REGEXPREPLACE", 3, self.regexp_replace, deterministic=True)

    def _fail(self, reason: str) -> SqlFunctionError:
        self.error = reason
        return SqlFunctionError(reason)

    def compile(self, pattern: object) -> re2._Regexp:
        key = _utf8(pattern)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        try:
            compiled = re2.compile(key, self._options)
        except re2.error as e:
            reason = e.args[0].decode("utf-8", "replace") if e.args and isinstance(e.args[0], bytes) else str(e)
            shown = key[:80].decode("utf-8", "replace") + ("..." if len(key) > 80 else "")
            raise self._fail(
                f"invalid regular expression '{shown}': {reason} (RE2 syntax: no backreferences or lookaround)"
            ) from None
        self._cache[key] = compiled
        if len(self._cache) > CACHED_PATTERNS:
            self._cache.popitem(last=False)
        return compiled

    def regexp(self, pattern: object, text: object) -> int | None:
        """``text REGEXP pattern``: 1 when the pattern matches anywhere in text."""
        if pattern is None or text is None:
            return None
        return 1 if self.compile(pattern).search(_utf8(text)) else 0

    def regexp_replace(self, pattern: object, text: object, replacement: object) -> str | None:
        """``REGEXPREPLACE(pattern, text, replacement)``: replace every match."""
        if pattern is None or text is None or replacement is None:
            return None
        regex, data, rep = self.compile(pattern), _utf8(text), _utf8(replacement)
        plain = b"$" not in rep
        out: list[bytes] = []
        size = last = 0
        for n, m in enumerate(regex.finditer(data), 1):
            start, end = m.span()
            piece = rep if plain else _expand(rep, m)
            size += (start - last) + len(piece)
            if size > self.max_bytes:
                raise self._fail(f"REGEXPREPLACE result exceeds the limit of {self.max_bytes} bytes")
            out.append(data[last:start])
            out.append(piece)
            last = end
            if n % CHECK_EVERY == 0 and (reason := self.check()) is not None:
                raise self._fail(reason)
        if size + len(data) - last > self.max_bytes:
            raise self._fail(f"REGEXPREPLACE result exceeds the limit of {self.max_bytes} bytes")
        out.append(data[last:])
        return b"".join(out).decode("utf-8", "replace")


def _expand(replacement: bytes, m: re2._Match) -> bytes:
    def sub(d: re.Match[bytes]) -> bytes:
        tok = d.group(1)
        if tok == b"$":
            return b"$"
        if tok == b"&":
            return m.group(0)
        n = int(tok)
        if n <= m.re.groups:
            return m.group(n) or b""
        return d.group(0)

    return _DOLLAR.sub(sub, replacement)
