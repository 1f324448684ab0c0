"""Run a child process with a timeout and bounded output (for RunCommand and RunText)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import IO

from ..spec import MethodEnv, MethodError, stop_message

POLL_SECONDS = 0.1  # how often a running child's output size, cancellation and deadline are checked

PROCESS_COLUMNS = ["ExitCode", "Output"]


def run_process(env: MethodEnv, argv: list[str] | str, args: dict[str, object], cwd: str | None = None):
    timeout_secs = int(args.get("TimeoutSecs", 3600))  # type: ignore[arg-type]
    if timeout_secs < 0:
        raise MethodError("TimeoutSecs must not be negative")
    split = bool(args.get("SplitLines", False))
    as_json = bool(args.get("InterpretAsJson", False))
    if split and as_json:
        raise MethodError("SplitLines and InterpretAsJson cannot both be true")
    trim = bool(args.get("TrimTrailingWhitespace", True))
    ignore_exit = bool(args.get("IgnoreExitCode", False))
    timeout_kill = bool(args.get("TimeoutKill", False))
    if cwd is not None and not os.path.isdir(cwd):
        raise MethodError(f"WorkingDirectory '{cwd}' does not exist")
    remaining = env.remaining()
    if remaining <= 0:
        env.check_time()
    limit = min(float(timeout_secs) if timeout_secs else float("inf"), remaining)
    max_bytes = env.max_bytes
    with tempfile.TemporaryFile() as out:
        kwargs: dict = {}
        if sys.platform.startswith("win"):
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP  # type: ignore[attr-defined]
        else:
            kwargs["start_new_session"] = True
        try:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd, **kwargs)
        except FileNotFoundError:
            raise MethodError(f"Command not found: {argv[0] if isinstance(argv, list) else argv}") from None
        except OSError as e:
            raise MethodError(f"Cannot start command: {e}") from None
        code = _wait(proc, out, env, limit, max_bytes)
        if code is None:
            instruction_limit = limit >= remaining
            if timeout_kill or instruction_limit:
                _kill_tree(proc)
            if instruction_limit:
                env.check_time()
                env.deadline = 0  # force the time-limit error
                env.check_time()
            raise MethodError(
                f"Command timed out after {timeout_secs} seconds" + (" and was killed" if timeout_kill else " (left running)")
            )
        out.seek(0)
        text = out.read().decode("utf-8", errors="replace")
    if code != 0 and not ignore_exit:
        tail = text.strip().splitlines()[-1:] or [""]
        raise MethodError(f"Command exited with code {code}" + (f": {tail[0][:200]}" if tail[0] else ""))
    if as_json:
        return _json_table(text)
    if split:
        lines = text.replace("\r\n", "\n").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        if trim:
            lines = [ln.rstrip() for ln in lines]
        return [[code, ln] for ln in lines]
    return [[code, text.rstrip() if trim else text]]


def _wait(proc: subprocess.Popen, out: IO[bytes], env: MethodEnv, limit: float, max_bytes: int) -> int | None:
    """The child's exit code, or None when ``limit`` seconds passed first.

    While it runs, its output may not pass ``max_bytes`` and the instruction may be cancelled
    or stopped: then the child's process group is killed and MethodError raised.
    """
    end = time.monotonic() + limit
    step = 0.005  # short first, so a quick command returns quickly
    while True:
        try:
            code: int | None = proc.wait(timeout=max(0.0, min(step, end - time.monotonic())))
        except subprocess.TimeoutExpired:
            code = None
        size = os.fstat(out.fileno()).st_size
        if size > max_bytes:
            _kill_tree(proc)
            raise MethodError(f"Command output of {size} bytes exceeds the memory limit of {max_bytes} bytes")
        if code is not None:
            return code
        reason = env.stop_reason()
        if reason is not None and reason != "time":
            _kill_tree(proc)
            raise MethodError(stop_message(reason, env.limits.timeout_seconds))
        if time.monotonic() >= end:
            return None
        step = min(step * 2, POLL_SECONDS)


def _kill_tree(proc: subprocess.Popen) -> None:
    try:
        if sys.platform.startswith("win"):
            proc.kill()
        else:
            os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, OSError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _json_table(text: str):
    try:
        data = json.loads(text) if text.strip() else []
    except ValueError as e:
        raise MethodError(f"Output is not valid JSON: {e}") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        return (["Value"], [[_cell(data)]])
    columns: list[str] = []
    for item in data:
        if isinstance(item, dict):
            for k in item:
                if str(k) not in columns:
                    columns.append(str(k))
    if not columns:
        return (["Value"], [[_cell(x)] for x in data])
    rows = [[_cell(item.get(c)) if isinstance(item, dict) else None for c in columns] for item in data]
    return (columns, rows)


def _cell(v: object) -> object:
    if isinstance(v, (dict, list)):
        return json.dumps(v, ensure_ascii=False)
    return v
