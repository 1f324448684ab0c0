"""Sans-I/O recursive-descent parser: tokens -> :class:`~quanta.scale.ast.Script`."""

from __future__ import annotations

from . import ast as A
from .errors import ScaleError
from .lexer import Token, tokenize

_TRUE = "true"
_FALSE = "false"
KEYWORDS = {
    "FOREACH", "IN", "DO", "DONE", "IF", "NOT", "ELSE", "ENDIF",
    "EVALUATE", "NOCONTENT", "ERROR", "NOTIMPLEMENTED", "RETURN",
}


def _describe(tok: Token) -> str:
    if tok.kind == "EOF":
        return "end of payload"
    if tok.kind == "VAR":
        return f"@{tok.value}"
    if tok.kind == "STRING":
        return "a string"
    if tok.kind == "NUMBER":
        return f"number {tok.value}"
    if tok.kind == "PARAM":
        return f"%{tok.value}%"
    if tok.kind == "SQL":
        return "SELECT"
    return f"'{tok.value}'"


class Parser:
    def __init__(self, tokens: list[Token]) -> None:
        self.toks = tokens
        self.i = 0

    # -- helpers -------------------------------------------------------------------------
    @property
    def tok(self) -> Token:
        return self.toks[self.i]

    def peek(self, k: int = 1) -> Token:
        j = min(self.i + k, len(self.toks) - 1)
        return self.toks[j]

    def next(self) -> Token:
        t = self.toks[self.i]
        if t.kind != "EOF":
            self.i += 1
        return t

    def error(self, message: str, tok: Token | None = None) -> ScaleError:
        t = tok or self.tok
        return ScaleError(message, t.pos.line, t.pos.column)

    def is_punct(self, ch: str, tok: Token | None = None) -> bool:
        t = tok or self.tok
        return t.kind == "PUNCT" and t.value == ch

    def keyword(self, tok: Token | None = None) -> str | None:
        """The keyword this token is, if it is one (an identifier followed by '.' is not)."""
        t = tok or self.tok
        if t.kind != "IDENT":
            return None
        up = str(t.value).upper()
        if up not in KEYWORDS:
            return None
        j = self.toks.index(t) + 1 if tok is not None else self.i + 1
        if j < len(self.toks) and self.is_punct(".", self.toks[j]):
            return None
        return up

    def expect_punct(self, ch: str, context: str) -> Token:
        if not self.is_punct(ch):
            raise self.error(f"Expected '{ch}' {context}, found {_describe(self.tok)}")
        return self.next()

    def expect_keyword(self, kw: str, context: str) -> Token:
        if self.keyword() != kw:
            raise self.error(f"Expected {kw} {context}, found {_describe(self.tok)}")
        return self.next()

    def expect_var(self, context: str) -> Token:
        if self.tok.kind != "VAR":
            raise self.error(f"Expected a @table {context}, found {_describe(self.tok)}")
        return self.next()

    # -- grammar -------------------------------------------------------------------------
    def parse_script(self) -> A.Script:
        stmts = self.parse_block(terminators=())
        return A.Script(stmts)

    def parse_block(self, terminators: tuple[str, ...]) -> list[A.Statement]:
        stmts: list[A.Statement] = []
        while True:
            t = self.tok
            if t.kind == "EOF":
                return stmts
            kw = self.keyword()
            if kw in ("DONE", "ENDIF", "ELSE"):
                if kw in terminators:
                    return stmts
                raise self.error(f"Unexpected {kw}")
            stmts.append(self.parse_statement())

    def parse_statement(self) -> A.Statement:
        t = self.tok
        if t.kind == "SQL":
            self.next()
            return A.Select(list(t.parts), t.pos)
        if t.kind == "VAR":
            if self.is_punct("=", self.peek()):
                return self.parse_assign()
            raise self.error(f"Expected '=' after @{t.value}, found {_describe(self.peek())}", self.peek())
        kw = self.keyword()
        if kw == "FOREACH":
            return self.parse_foreach()
        if kw == "IF":
            return self.parse_if()
        if kw == "EVALUATE":
            self.next()
            self.expect_punct(";", "after EVALUATE")
            return A.Evaluate(t.pos)
        if kw in ("NOCONTENT", "ERROR", "NOTIMPLEMENTED"):
            self.next()
            message = None
            if self.tok.kind == "STRING":
                message = str(self.next().value)
            elif kw == "ERROR" and not self.is_punct(";"):
                raise self.error(f"Expected a message string after ERROR, found {_describe(self.tok)}")
            self.expect_punct(";", f"after {kw}")
            return A.Exit(kw, message, None, t.pos)
        if kw == "RETURN":
            self.next()
            var = None
            var_pos = None
            if self.tok.kind == "VAR":
                vt = self.next()
                var, var_pos = str(vt.value), vt.pos
            self.expect_punct(";", "after RETURN")
            return A.Exit("RETURN", None, var, t.pos, var_pos)
        if kw is not None:
            raise self.error(f"Unexpected {kw}")
        if t.kind == "IDENT":
            call = self.parse_call()
            self.expect_punct(";", "after method call")
            return call
        raise self.error(f"Expected a statement, found {_describe(t)}")

    def parse_assign(self) -> A.Assign:
        vt = self.next()
        self.next()  # '='
        t = self.tok
        value: object
        if t.kind == "SQL":
            self.next()
            return A.Assign(str(vt.value), A.Select(list(t.parts), t.pos), vt.pos)
        kw = self.keyword()
        if kw == "FOREACH":
            return A.Assign(str(vt.value), self.parse_foreach(), vt.pos)
        if kw == "IF":
            return A.Assign(str(vt.value), self.parse_if(), vt.pos)
        if t.kind in ("STRING", "NUMBER", "PARAM") or (
            t.kind == "IDENT" and str(t.value).lower() in (_TRUE, _FALSE) and not self.is_punct(".", self.peek())
        ):
            value = self.parse_value(allow_column=False)
            self.expect_punct(";", "after value")
            return A.Assign(str(vt.value), value, vt.pos)  # type: ignore[arg-type]
        if t.kind == "IDENT" and kw is None:
            call = self.parse_call()
            self.expect_punct(";", "after method call")
            return A.Assign(str(vt.value), call, vt.pos)
        raise self.error(
            f"Expected a method call, SELECT, value, FOREACH or IF after '=', found {_describe(t)}"
        )

    def parse_call(self) -> A.Call:
        mt = self.next()
        if not self.is_punct("."):
            raise self.error(f"Expected '.' after module name '{mt.value}', found {_describe(self.tok)}")
        self.next()
        if self.tok.kind != "IDENT":
            raise self.error(f"Expected a method name after '{mt.value}.', found {_describe(self.tok)}")
        me = self.next()
        self.expect_punct("(", f"after {mt.value}.{me.value}")
        args: list[A.Arg] = []
        if not self.is_punct(")"):
            while True:
                if self.tok.kind != "IDENT":
                    raise self.error(f"Expected a parameter name, found {_describe(self.tok)}")
                nt = self.next()
                self.expect_punct(":", f"after parameter name '{nt.value}'")
                value = self.parse_value(allow_column=True)
                args.append(A.Arg(str(nt.value), value, nt.pos))
                if self.is_punct(","):
                    self.next()
                    continue
                break
        self.expect_punct(")", f"to close the call to {mt.value}.{me.value}")
        return A.Call(str(mt.value), str(me.value), args, mt.pos, me.pos)

    def parse_value(self, allow_column: bool) -> A.Value:
        t = self.tok
        if t.kind == "STRING":
            self.next()
            return A.Literal(t.value, t.pos)
        if t.kind == "NUMBER":
            self.next()
            return A.Literal(t.value, t.pos)
        if t.kind == "PARAM":
            self.next()
            return A.ParamRef(str(t.value), t.pos)
        if t.kind == "IDENT" and str(t.value).lower() in (_TRUE, _FALSE):
            self.next()
            return A.Literal(str(t.value).lower() == _TRUE, t.pos)
        if t.kind == "VAR" and allow_column:
            self.next()
            if not self.is_punct("."):
                return A.TableRef(str(t.value), t.pos)  # a whole table: only a "table" parameter takes one
            self.next()
            if self.tok.kind != "IDENT":
                raise self.error(f"Expected a column name after @{t.value}., found {_describe(self.tok)}")
            col = self.next()
            return A.ColumnRef(str(t.value), str(col.value), t.pos)
        raise self.error(f"Expected a value, found {_describe(t)}")

    def parse_foreach(self) -> A.Foreach:
        ft = self.next()
        row = self.expect_var("after FOREACH")
        self.expect_keyword("IN", "after FOREACH @" + str(row.value))
        table = self.expect_var("after IN")
        self.expect_keyword("DO", f"after FOREACH @{row.value} IN @{table.value}")
        body = self.parse_block(terminators=("DONE", "ENDIF", "ELSE"))
        kw = self.keyword()
        if kw is None:  # EOF
            raise ScaleError(
                "FOREACH is not closed with DONE", ft.pos.line, ft.pos.column
            )
        if kw != "DONE":
            raise self.error(
                f"FOREACH opened at line {ft.pos.line}, column {ft.pos.column} must be closed with DONE, found {kw}"
            )
        self.next()
        self.expect_punct(";", "after DONE")
        return A.Foreach(str(row.value), str(table.value), body, ft.pos, table.pos)

    def parse_if(self) -> A.If:
        it = self.next()
        negate = False
        if self.keyword() == "NOT":
            self.next()
            negate = True
        self.expect_punct("(", "after IF")
        if self.keyword() == "NOT":
            self.next()
            negate = not negate
        var = self.expect_var("as the IF condition (a condition is a table name)")
        self.expect_punct(")", "after the IF condition")
        then = self.parse_block(terminators=("ENDIF", "ELSE", "DONE"))
        otherwise = None
        if self.keyword() == "ELSE":
            self.next()
            otherwise = self.parse_block(terminators=("ENDIF", "ELSE", "DONE"))
            if self.keyword() == "ELSE":
                raise self.error("Unexpected second ELSE")
        kw = self.keyword()
        if kw is None:
            raise ScaleError("IF is not closed with ENDIF", it.pos.line, it.pos.column)
        if kw != "ENDIF":
            raise self.error(
                f"IF opened at line {it.pos.line}, column {it.pos.column} must be closed with ENDIF, found {kw}"
            )
        self.next()
        self.expect_punct(";", "after ENDIF")
        return A.If(negate, str(var.value), then, otherwise, it.pos, var.pos)


def parse(text: str) -> A.Script:
    """Parse a payload. Raises ScaleError with the line and column of the first problem."""
    return Parser(tokenize(text)).parse_script()
