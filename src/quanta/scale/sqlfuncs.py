"""Custom SQL functions: REGEXP and REGEXPREPLACE (ECMA-262 style ``$1`` group references)."""

from __future__ import annotations

import re
from functools import lru_cache


@lru_cache(maxsize=256)
def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def regexp(pattern: object, text: object) -> int | None:
    """``text REGEXP pattern``: 1 when the pattern matches anywhere in text."""
    if pattern is None or text is None:
        return None
    return 1 if _compile(str(pattern)).search(str(text)) else 0


_DOLLAR = re.compile(r"\$(\$|&|\d{1,2})")


def _expand(replacement: str, m: re.Match[str]) -> str:
    def sub(d: re.Match[str]) -> str:
        tok = d.group(1)
        if tok == "$":
            return "$"
        if tok == "&":
            return m.group(0)
        n = int(tok)
        if n <= (m.re.groups or 0):
            return m.group(n) or ""
        return d.group(0)

    return _DOLLAR.sub(sub, replacement)


def regexp_replace(pattern: object, text: object, replacement: object) -> str | None:
    """``REGEXPREPLACE(pattern, text, replacement)``: replace every match."""
    if pattern is None or text is None or replacement is None:
        return None
    rep = str(replacement)
    return _compile(str(pattern)).sub(lambda m: _expand(rep, m), str(text))
