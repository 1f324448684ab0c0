"""SCALE module Agent: the agent itself."""

from __future__ import annotations

import os
import platform
import socket
import sys

import psutil

from ..spec import ColumnSpec as C
from ..spec import MethodEnv, method
from ._common import env_tmp, iso, os_type


@method(
    "Agent", "GetSummary", "Summary of the running agent: version, device name, process and directories.",
    columns=(
        C("AgentVersion", "string"), C("DeviceName", "string"), C("OperatingSystemType", "string"),
        C("ProcessId", "integer"), C("StartTime", "datetime"), C("PythonVersion", "string"),
        C("DataRootDirectory", "string"), C("Executable", "string"),
    ),
    quick=True,
)
def get_summary(env: MethodEnv, args: dict[str, object]):
    ctx = env.context
    proc = psutil.Process()
    return [[
        ctx.agent_version, socket.gethostname(), os_type(), os.getpid(), iso(proc.create_time()),
        platform.python_version(), str(ctx.data_dir), ctx.executable or sys.executable,
    ]]


@method(
    "Agent", "GetKeyFiles", "Paths of the agent's key files and directories.",
    columns=(
        C("Configuration", "string", "full path of the agent configuration file"),
        C("Executable", "string"), C("Log", "string"), C("DataRootDirectory", "string"),
        C("TemporaryDirectory", "string"),
    ),
    quick=True,
)
def get_key_files(env: MethodEnv, args: dict[str, object]):
    ctx = env.context
    return [[
        str(ctx.config_path) if ctx.config_path else None,
        ctx.executable or sys.executable,
        str(ctx.log_path) if ctx.log_path else None,
        str(ctx.data_dir),
        env_tmp(),
    ]]
