"""SCALE module Inventory: the Activity Record's capture settings, read and changed by instructions."""

from __future__ import annotations

import psutil

from ..spec import ColumnSpec as C
from ..spec import MethodEnv, MethodError, method
from ..spec import ParamSpec as P


def _conf(env: MethodEnv):
    if env.context.config_path is None:
        raise MethodError("This agent has no agent.conf")
    return env.context.config_path


@method(
    "Inventory", "GetSettings",
    "The Activity Record's settings (Module.Inventory.* in agent.conf) as the agent's parser reads them: every "
    "setting with its value and default. The agent reads them when it starts: PendingRestart is true when agent.conf "
    "changed since, so the running agent may still use the older values.",
    columns=(
        C("Name", "string"), C("Value", "string"), C("Default", "string"),
        C("Configured", "boolean", "agent.conf sets it (else the default applies)"),
        C("PendingRestart", "boolean", "agent.conf changed after the agent started"),
    ),
)
def get_settings(env: MethodEnv, args: dict[str, object]):
    from quanta.agent.inventory.conf_access import SettingsAccessError, settings_rows

    try:
        started = psutil.Process().create_time()
    except psutil.Error:
        started = None
    try:
        return [env.take(r) for r in settings_rows(_conf(env), started)]
    except SettingsAccessError as e:
        raise MethodError(str(e)) from None


@method(
    "Inventory", "SetSetting",
    "Change one Module.Inventory.* setting in agent.conf (the name is case-insensitive). The new value is checked "
    "by the agent's own parser with the rest of the file, and the file is replaced atomically (mode 0600); a refused "
    "value changes nothing. Takes effect when the agent next starts (RestartRequired).",
    params=(P("Name", "string", required=True, description="e.g. Module.Inventory.Process.PollIntervalSeconds"),
            P("Value", "string", required=True)),
    columns=(C("Name", "string"), C("OldValue", "string"), C("NewValue", "string"), C("RestartRequired", "boolean")),
    is_action=True,
)
def set_setting(env: MethodEnv, args: dict[str, object]):
    from quanta.agent.inventory.conf_access import SettingsAccessError, change_setting

    try:
        name, old, new = change_setting(_conf(env), str(args["Name"]), str(args["Value"]))
    except SettingsAccessError as e:
        raise MethodError(str(e)) from None
    return [[name, old, new, old != new]]
