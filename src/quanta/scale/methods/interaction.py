"""SCALE module Interaction: needs an interactive user session, which the Quanta agent does not have."""

from __future__ import annotations

from ..spec import ColumnSpec as C
from ..spec import MethodEnv, MethodError, method
from ..spec import ParamSpec as P

_NO_SESSION = "not supported: no interactive user session"


@method(
    "Interaction", "ShowQuestion",
    "Ask the logged-on user a yes/no question. Declared for compatibility; the agent has no interactive user session, so it fails at run time.",
    params=(P("Description", "string", required=True), P("Title", "string", default=None), P("Async", "boolean", default=False)),
    columns=(C("Response", "string", "Yes, No or TimedOut"),),
    is_action=True,
)
def show_question(env: MethodEnv, args: dict[str, object]):
    raise MethodError(_NO_SESSION)


@method(
    "Interaction", "ShowAnnouncement",
    "Show an announcement to the logged-on user. Declared for compatibility; fails at run time (no interactive user session).",
    params=(
        P("Description", "string", required=True), P("Name", "string", default=None), P("Async", "boolean", default=False),
        P("Topic", "string", default=None), P("TimeoutSeconds", "integer", default=None), P("Link", "string", default=None),
        P("ShowDefaultButtons", "boolean", default=True), P("Footer", "string", default=None),
    ),
    columns=(C("Response", "string"),),
    is_action=True,
)
def show_announcement(env: MethodEnv, args: dict[str, object]):
    raise MethodError(_NO_SESSION)
