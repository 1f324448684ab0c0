"""Sans-I/O lexer for SCALE.

Outside a ``SELECT`` the lexer produces ordinary tokens. A ``SELECT`` (or ``WITH``) at the
start of a statement is read up to its terminating ``;`` as one ``SQL`` token whose text is
split into parts: code, strings, ``@table`` and ``$Builtin`` references and ``%param%``
references. Comments (``//``, ``--`` and ``/* */``) are dropped, so a quote inside a comment
never matters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .ast import Pos, SqlBuiltin, SqlCode, SqlParam, SqlPart, SqlString, SqlVar
from .errors import ScaleError

_IDENT_START = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_IDENT_CHARS = _IDENT_START | set("0123456789")
_PUNCT = set("=;(),:.")
# After these tokens a SELECT/WITH starts an SQL statement.
_SQL_AFTER_KEYWORDS = {"DO", "ELSE", "ENDIF", "DONE"}


@dataclass(slots=True)
class Token:
    kind: str  # VAR IDENT NUMBER STRING PARAM PUNCT SQL EOF
    value: object
    pos: Pos
    parts: list[SqlPart] = field(default_factory=list)


class _Cursor:
    __slots__ = ("text", "i", "line", "col")

    def __init__(self, text: str) -> None:
        self.text = text
        self.i = 0
        self.line = 1
        self.col = 1

    def pos(self) -> Pos:
        return Pos(self.line, self.col)

    def peek(self, k: int = 0) -> str:
        j = self.i + k
        return self.text[j] if j < len(self.text) else ""

    def advance(self, n: int = 1) -> str:
        out = self.text[self.i : self.i + n]
        for ch in out:
            if ch == "\n":
                self.line += 1
                self.col = 1
            else:
                self.col += 1
        self.i += n
        return out

    def at_end(self) -> bool:
        return self.i >= len(self.text)


def _skip_block_comment(c: _Cursor) -> None:
    start = c.pos()
    c.advance(2)
    while not c.at_end():
        if c.peek() == "*" and c.peek(1) == "/":
            c.advance(2)
            return
        c.advance()
    raise ScaleError("Unterminated comment", start.line, start.column)


def _skip_line_comment(c: _Cursor) -> None:
    while not c.at_end() and c.peek() != "\n":
        c.advance()


def _read_name(c: _Cursor) -> str:
    j = c.i
    while j < len(c.text) and c.text[j] in _IDENT_CHARS:
        j += 1
    return c.advance(j - c.i)


def _read_dq_string(c: _Cursor) -> str:
    """A double-quoted SCALE string with ``\\\\`` and ``\\"`` escapes (and ``""`` as SQL does)."""
    start = c.pos()
    c.advance()
    out: list[str] = []
    while True:
        if c.at_end():
            raise ScaleError("Unterminated string literal", start.line, start.column)
        ch = c.peek()
        if ch == "\\" and c.peek(1) in ('"', "\\"):
            out.append(c.peek(1))
            c.advance(2)
        elif ch == '"':
            if c.peek(1) == '"':
                out.append('"')
                c.advance(2)
            else:
                c.advance()
                return "".join(out)
        else:
            out.append(c.advance())


def _read_sq_string(c: _Cursor, what: str = "string literal") -> str:
    start = c.pos()
    c.advance()
    out: list[str] = []
    while True:
        if c.at_end():
            raise ScaleError(f"Unterminated {what}", start.line, start.column)
        ch = c.advance()
        if ch == "'":
            if c.peek() == "'":
                c.advance()
                out.append("'")
            else:
                return "".join(out)
        else:
            out.append(ch)


def _param_name_at(c: _Cursor) -> str | None:
    """If the cursor is at ``%name%``, return name (without consuming)."""
    j = c.i + 1
    text = c.text
    if j >= len(text) or text[j] not in _IDENT_START:
        return None
    k = j
    while k < len(text) and text[k] in _IDENT_CHARS:
        k += 1
    if k < len(text) and text[k] == "%":
        return text[j:k]
    return None


def _read_sql(c: _Cursor, start: Pos) -> Token:
    parts: list[SqlPart] = []
    code: list[str] = []

    def flush() -> None:
        if code:
            parts.append(SqlCode("".join(code)))
            code.clear()

    while True:
        if c.at_end():
            raise ScaleError("Missing ';' at the end of the SELECT statement", start.line, start.column)
        ch = c.peek()
        nxt = c.peek(1)
        if ch == ";":
            c.advance()
            flush()
            return Token("SQL", None, start, parts)
        if (ch == "-" and nxt == "-") or (ch == "/" and nxt == "/"):
            _skip_line_comment(c)
            code.append(" ")
        elif ch == "/" and nxt == "*":
            _skip_block_comment(c)
            code.append(" ")
        elif ch == "'":
            flush()
            parts.append(SqlString(_read_sq_string(c, "SQL string literal")))
        elif ch == '"':
            flush()
            parts.append(SqlString(_read_dq_string(c)))
        elif ch == "[":
            p = c.pos()
            j = c.text.find("]", c.i + 1)
            if j < 0:
                raise ScaleError("Unterminated [identifier]", p.line, p.column)
            code.append('"' + c.text[c.i + 1 : j].replace('"', '""') + '"')
            c.advance(j + 1 - c.i)
        elif ch == "`":
            p = c.pos()
            j = c.text.find("`", c.i + 1)
            if j < 0:
                raise ScaleError("Unterminated `identifier`", p.line, p.column)
            code.append('"' + c.text[c.i + 1 : j].replace('"', '""') + '"')
            c.advance(j + 1 - c.i)
        elif ch == "@" and nxt in _IDENT_START:
            flush()
            p = c.pos()
            c.advance()
            parts.append(SqlVar(_read_name(c), p))
        elif ch == "$" and nxt in _IDENT_START:
            flush()
            p = c.pos()
            c.advance()
            parts.append(SqlBuiltin(_read_name(c), p))
        elif ch == "%" and (name := _param_name_at(c)) is not None:
            flush()
            p = c.pos()
            c.advance(len(name) + 2)
            parts.append(SqlParam(name, p))
        elif ch in _IDENT_CHARS:
            code.append(_read_name(c))
        else:
            code.append(c.advance())


def _read_number(c: _Cursor) -> int | float:
    j = c.i
    text = c.text
    if text[j] == "-":
        j += 1
    while j < len(text) and text[j].isdigit():
        j += 1
    is_float = False
    if j < len(text) and text[j] == "." and j + 1 < len(text) and text[j + 1].isdigit():
        is_float = True
        j += 1
        while j < len(text) and text[j].isdigit():
            j += 1
    raw = c.advance(j - c.i)
    return float(raw) if is_float else int(raw)


def tokenize(text: str) -> list[Token]:
    """Split a payload into tokens. Raises ScaleError on a lexical error."""
    c = _Cursor(text)
    tokens: list[Token] = []
    while True:
        # whitespace and comments
        while not c.at_end():
            ch = c.peek()
            if ch.isspace():
                c.advance()
            elif ch == "/" and c.peek(1) == "/":
                _skip_line_comment(c)
            elif ch == "/" and c.peek(1) == "*":
                _skip_block_comment(c)
            else:
                break
        if c.at_end():
            tokens.append(Token("EOF", None, c.pos()))
            return tokens
        p = c.pos()
        ch = c.peek()
        if ch in _IDENT_START:
            name = _read_name(c)
            upper = name.upper()
            prev = tokens[-1] if tokens else None
            if upper in ("SELECT", "WITH") and (
                prev is None
                or prev.kind == "SQL"
                or (prev.kind == "PUNCT" and prev.value in (";", "=", ")"))
                or (prev.kind == "IDENT" and str(prev.value).upper() in _SQL_AFTER_KEYWORDS)
            ):
                tok = _read_sql(c, p)
                tok.parts.insert(0, SqlCode(name))
                tokens.append(tok)
            else:
                tokens.append(Token("IDENT", name, p))
        elif ch == "@":
            c.advance()
            if c.peek() not in _IDENT_START:
                raise ScaleError("Expected a table name after '@'", p.line, p.column)
            tokens.append(Token("VAR", _read_name(c), p))
        elif ch == "%":
            name = _param_name_at(c)
            if name is None:
                raise ScaleError("Unexpected character '%'", p.line, p.column)
            c.advance(len(name) + 2)
            tokens.append(Token("PARAM", name, p))
        elif ch.isdigit() or (ch == "-" and c.peek(1).isdigit()):
            tokens.append(Token("NUMBER", _read_number(c), p))
        elif ch == '"':
            tokens.append(Token("STRING", _read_dq_string(c), p))
        elif ch == "'":
            tokens.append(Token("STRING", _read_sq_string(c), p))
        elif ch in _PUNCT:
            c.advance()
            tokens.append(Token("PUNCT", ch, p))
        else:
            raise ScaleError(f"Unexpected character {ch!r}", p.line, p.column)
