"""SCALE module Interaction: prompts for the logged-on user, through the agent's interaction port
(``quanta prompt AGENTDIR`` is the user session's client). Without a running interaction port
(e.g. ``quanta scale run``), the methods fail with a clear error."""

from __future__ import annotations

from ..spec import ColumnSpec as C
from ..spec import MethodEnv, MethodError, method
from ..spec import ParamSpec as P

_NO_SESSION = "not supported: no interactive user session"


@method(
    "Interaction", "ShowQuestion",
    "Ask the logged-on user a yes/no question through the agent's interaction port; waits for the answer "
    "(or TimeoutSeconds) unless Async.",
    params=(P("Description", "string", required=True), P("Title", "string", default=None), P("Async", "boolean", default=False),
            P("TimeoutSeconds", "integer", default=300)),
    columns=(C("Response", "string", "Yes, No or TimedOut"),),
    is_action=True,
)
def show_question(env: MethodEnv, args: dict[str, object]):
    return _ask(env, "question", args)


def _ask(env: MethodEnv, kind: str, args: dict[str, object]):
    if env.context.interact is None:
        raise MethodError(_NO_SESSION)
    timeout = float(args.get("TimeoutSeconds") or 300)  # type: ignore[arg-type]
    if timeout <= 0:
        raise MethodError("TimeoutSeconds must be positive")
    timeout = min(timeout, max(env.remaining() - 1, 0.1))  # never outlive the instruction's time limit
    title = str(args.get("Title") or args.get("Name") or "Quanta")
    answer = env.context.interact(kind, title, str(args["Description"]), timeout, not bool(args.get("Async")))
    return [[answer]]


@method(
    "Interaction", "ShowAnnouncement",
    "Show an announcement to the logged-on user through the agent's interaction port; waits for "
    "acknowledgement (or TimeoutSeconds) unless Async.",
    params=(
        P("Description", "string", required=True), P("Name", "string", default=None), P("Async", "boolean", default=False),
        P("Topic", "string", default=None), P("TimeoutSeconds", "integer", default=None), P("Link", "string", default=None),
        P("ShowDefaultButtons", "boolean", default=True), P("Footer", "string", default=None),
    ),
    columns=(C("Response", "string"),),
    is_action=True,
)
def show_announcement(env: MethodEnv, args: dict[str, object]):
    return _ask(env, "announcement", args)
