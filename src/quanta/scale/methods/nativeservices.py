"""SCALE module NativeServices: run a command line."""

from __future__ import annotations

import shlex
import sys

from ..spec import ColumnSpec as C
from ..spec import MethodEnv, MethodError, method
from ..spec import ParamSpec as P
from ._process import run_process

COMMON_PARAMS = (
    P("InterpretAsJson", "boolean", default=False, description="parse the output as JSON into the result table (not with SplitLines)"),
    P("TimeoutSecs", "integer", default=3600, description="0 means no timeout (the instruction time limit still applies); negative is illegal"),
    P("TimeoutKill", "boolean", default=False, description="kill the process when TimeoutSecs elapses (otherwise it is left running)"),
    P("IgnoreExitCode", "boolean", default=False, description="a non-zero exit code is a failure unless true"),
    P("SplitLines", "boolean", default=False, description="one row per output line (not with InterpretAsJson)"),
    P("TrimTrailingWhitespace", "boolean", default=True),
)
PROCESS_OUTPUT = (C("ExitCode", "integer"), C("Output", "string", "stdout and stderr interleaved"))


@method(
    "NativeServices", "RunCommand",
    "Execute a command line (split like a POSIX shell, not run through one). Output columns are ExitCode and Output, "
    "or the JSON fields when InterpretAsJson is true.",
    params=(
        P("CommandLine", "string", required=True, description="the entire command line including arguments"),
        P("WorkingDirectory", "string", default=None),
        P("IncludeErrorOutput", "string", default="Interleaved", description="Windows only; stderr is interleaved elsewhere"),
    ) + COMMON_PARAMS,
    columns=PROCESS_OUTPUT, is_action=True, dynamic_columns=True,
)
def run_command(env: MethodEnv, args: dict[str, object]):
    line = str(args["CommandLine"])
    if sys.platform.startswith("win"):
        argv: list[str] | str = line
    else:
        try:
            argv = shlex.split(line)
        except ValueError as e:
            raise MethodError(f"Cannot parse CommandLine: {e}") from None
        if not argv:
            raise MethodError("CommandLine is empty")
    wd = args.get("WorkingDirectory")
    return run_process(env, argv, args, cwd=str(wd) if wd else None)
