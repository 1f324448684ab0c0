"""SCALE module Scripting: run script text with bash or PowerShell."""

from __future__ import annotations

import os
import shutil
import tempfile

from ..spec import MethodEnv, MethodError, method
from ..spec import ParamSpec as P
from .nativeservices import COMMON_PARAMS, PROCESS_OUTPUT
from ._process import run_process


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
    lang = str(args["Language"]).lower()
    if lang == "bash":
        interpreter = shutil.which("bash")
        suffix = ".sh"
    elif lang == "powershell":
        interpreter = shutil.which("pwsh") or shutil.which("powershell")
        suffix = ".ps1"
    else:
        raise MethodError(f"Unsupported Language '{args['Language']}': use bash or PowerShell")
    if interpreter is None:
        raise MethodError(f"{args['Language']} is not supported on this platform (interpreter not found)")
    fd, path = tempfile.mkstemp(prefix="quanta-scale-", suffix=suffix)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(str(args["Text"]).replace("\r\n", "\n"))
        argv = [interpreter, path] if suffix == ".sh" else [interpreter, "-NoProfile", "-NonInteractive", "-File", path]
        return run_process(env, argv, args)
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
