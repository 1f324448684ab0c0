"""SCALE module Utilities."""

from __future__ import annotations

from ..spec import ColumnSpec as C
from ..spec import MethodEnv, MethodError, method
from ..spec import ParamSpec as P


@method(
    "Utilities", "SplitLines", "Split text into rows at a delimiter (default: line breaks, LF or CRLF).",
    params=(
        P("Text", "string", required=True),
        P("Delimiter", "string", default=None, description="separator; line breaks when omitted"),
        P("RemoveEmptyEntries", "boolean", default=False, description="drop empty pieces"),
    ),
    columns=(C("Index", "integer", "0-based position"), C("Output", "string")),
)
def split_lines(env: MethodEnv, args: dict[str, object]):
    text = str(args["Text"])
    delim = args.get("Delimiter")
    if delim is None:
        pieces = text.replace("\r\n", "\n").split("\n")
    else:
        if delim == "":
            raise MethodError("Delimiter must not be empty")
        pieces = text.split(str(delim))
    if args.get("RemoveEmptyEntries"):
        pieces = [p for p in pieces if p != ""]
    if len(pieces) > env.limits.max_rows:
        raise MethodError(f"Result exceeds the row limit of {env.limits.max_rows} rows")
    return [[i, p] for i, p in enumerate(pieces)]
