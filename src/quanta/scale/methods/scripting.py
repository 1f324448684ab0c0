"""SCALE module Scripting: run script text with bash or PowerShell."""

from __future__ import annotations

import os
import shutil
import tempfile

from ..spec import MethodEnv, MethodError, method
from ..spec import ParamSpec as P
from .nativeservices import COMMON_PARAMS, PROCESS_OUTPUT
from ._process import run_process


def _interpreter(language: object) -> tuple[str, str]:
    lang = str(language).lower()
    if lang == "bash":
        interpreter, suffix = shutil.which("bash"), ".sh"
    elif lang == "powershell":
        interpreter, suffix = shutil.which("pwsh") or shutil.which("powershell"), ".ps1"
    else:
        raise MethodError(f"Unsupported Language '{language}': use bash or PowerShell")
    if interpreter is None:
        raise MethodError(f"{language} is not supported on this platform (interpreter not found)")
    return interpreter, suffix


def _argv(interpreter: str, suffix: str, path: str) -> list[str]:
    return [interpreter, path] if suffix == ".sh" else [interpreter, "-NoProfile", "-NonInteractive", "-File", path]


@method(
    "Scripting", "Run",
    "Run a script file with bash or PowerShell: a local ScriptPath, or a Resource from the Background "
    "Channel named by its SHA-256 (the hash is part of the signed instruction, and the agent verifies the "
    "download against it). Output columns as NativeServices.RunCommand.",
    params=(
        P("Language", "string", required=True, description='"bash" or "PowerShell" (case-insensitive)'),
        P("ScriptPath", "string", default=None, aliases=("Script",), description="full path of a local script"),
        P("Resource", "string", default=None, description="SHA-256 of a Background Channel resource"),
        P("LanguageVersion", "string", default=None, description="accepted and ignored"),
    ) + COMMON_PARAMS,
    columns=PROCESS_OUTPUT, is_action=True, dynamic_columns=True,
)
def run_script(env: MethodEnv, args: dict[str, object]):
    interpreter, suffix = _interpreter(args["Language"])
    path, resource = args.get("ScriptPath"), args.get("Resource")
    if (path is None) == (resource is None):
        raise MethodError("give exactly one of ScriptPath or Resource")
    if resource is not None:
        if env.context.fetch_resource is None:
            raise MethodError("no Background Channel is configured for this agent")
        local = str(env.context.fetch_resource(str(resource)))
    else:
        local = str(path)
        if not os.path.isfile(local):
            raise MethodError(f"ScriptPath '{local}' is not a file")
    return run_process(env, _argv(interpreter, suffix, local), args)


@method(
    "Scripting", "RunText",
    "Run script text with bash or PowerShell (pwsh). Output columns as NativeServices.RunCommand.",
    params=(
        P("Language", "string", required=True, description='"bash" or "PowerShell" (case-insensitive)'),
        P("Text", "string", required=True, description="the script (LF line endings for bash)"),
        P("LanguageVersion", "string", default=None, description="accepted and ignored"),
    ) + COMMON_PARAMS,
    columns=PROCESS_OUTPUT, is_action=True, dynamic_columns=True,
)
def run_text(env: MethodEnv, args: dict[str, object]):
    interpreter, suffix = _interpreter(args["Language"])
    fd, path = tempfile.mkstemp(prefix="quanta-scale-", suffix=suffix)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(str(args["Text"]).replace("\r\n", "\n"))
        return run_process(env, _argv(interpreter, suffix, path), args)
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
