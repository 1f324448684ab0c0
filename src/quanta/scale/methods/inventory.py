"""SCALE module Inventory: the Activity Record's capture settings, read and changed by instructions."""

from __future__ import annotations

from ..spec import ColumnSpec as C
from ..spec import MethodEnv, MethodError, method
from ..spec import ParamSpec as P


def _conf(env: MethodEnv):
    if env.context.config_path is None:
        raise MethodError("This agent has no agent.conf")
    return env.context.config_path


def _in_force(conf) -> dict[str, str] | None:
    """The values the running agent's capture uses, after applying agent.conf if it just changed."""
    from quanta.agent.activity import switch_for

    switch = switch_for(conf)
    if switch is None:
        return None
    switch.check()
    return switch.in_force()


@method(
    "Inventory", "GetSettings",
    "The Activity Record's settings (Module.Inventory.* in agent.conf) as the agent's parser reads them: every "
    "setting with its value and default. The running agent applies agent.conf's changes without a restart; Applied "
    "is true when its capture uses the value (false when capture is off, or outside a running agent).",
    columns=(
        C("Name", "string"), C("Value", "string"), C("Default", "string"),
        C("Configured", "boolean", "agent.conf sets it (else the default applies)"),
        C("Applied", "boolean", "the running agent's capture uses this value"),
    ),
)
def get_settings(env: MethodEnv, args: dict[str, object]):
    from quanta.agent.inventory.conf_access import SettingsAccessError, settings_rows

    conf = _conf(env)
    try:
        return [env.take(r) for r in settings_rows(conf, _in_force(conf))]
    except SettingsAccessError as e:
        raise MethodError(str(e)) from None


@method(
    "Inventory", "SetSetting",
    "Change one Module.Inventory.* setting in agent.conf (the name is case-insensitive). The new value is checked "
    "by the agent's own parser with the rest of the file, and the file is replaced atomically (mode 0600); a refused "
    "value changes nothing. The running agent applies it before the action returns, without a restart: a source "
    "switched off stops capturing, one switched on starts, intervals and retention change (Applied).",
    params=(P("Name", "string", required=True, description="e.g. Module.Inventory.Process.PollIntervalSeconds"),
            P("Value", "string", required=True)),
    columns=(C("Name", "string"), C("OldValue", "string"), C("NewValue", "string"),
             C("Applied", "boolean", "the running agent uses the new value (false when capture is off, or outside a "
                                     "running agent)")),
    is_action=True,
)
def set_setting(env: MethodEnv, args: dict[str, object]):
    from quanta.agent.inventory.conf_access import SettingsAccessError, change_setting

    conf = _conf(env)
    try:
        name, old, new = change_setting(conf, str(args["Name"]), str(args["Value"]))
    except SettingsAccessError as e:
        raise MethodError(str(e)) from None
    force = _in_force(conf) or {}
    return [[name, old, new, force.get(name) == new]]
