"""A small process supervisor: starts child processes, restarts any that die (with back-off),
and stops them all on SIGTERM, SIGINT or SIGHUP. ``quanta server`` and ``quanta switch-host`` use it.

No orphan outlives its component, whichever level is killed:

- each child runs in its own session and process group; when a child dies, whatever is left in its
  group is killed (SIGKILL) before the child is restarted; on the supervisor's own exit every group gets
  SIGTERM, then SIGKILL after ``stop_timeout``;
- on Linux each child also gets PR_SET_PDEATHSIG = SIGKILL, so it dies with the supervisor even when the
  supervisor is SIGKILLed (and, through its own supervisor, so do the Switches of a Switch Host). Other
  systems have no parent-death signal: there the children of a SIGKILLed supervisor keep running until
  their process groups are killed by hand (``kill -- -PGID``; each start is logged with its group).

A child that exits EXIT_PORT_IN_USE on a restart (its port still held, usually by its killed
predecessor's leftover) is retried with back-off for ``port_retry_window`` seconds; on a first start the
same exit, like EXIT_CONFIGURATION at any time, is a configuration error that stops every component.

A supervisor given a :class:`quanta.status.StatusRecord` records there each child's pid, start time, state
(running, restarting, failed, stopped) and last error as they change; ``quanta status`` reads it.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil

from quanta.runtime import EXIT_CONFIGURATION, EXIT_PORT_IN_USE, SUPERVISED_ENV
from quanta.status import StatusRecord, process_start

log = logging.getLogger("quanta.supervisor")

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
"""What stops the supervisor and, gracefully, its children. The children, in sessions of their own, get
neither a terminal's Ctrl-C nor its hang-up: the supervisor passes both on as SIGTERM."""
HEALTHY_RUN = 30.0
"""A child that ran this long before dying restarts after the shortest delay again."""


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: asyncio.subprocess.Process | None = None
    restarts: int = 0
    started_at: float = 0.0


def quanta_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "quanta", *args]


def describe_exit(rc: int) -> str:
    """'exited with code 1' or 'was killed by SIGKILL' (asyncio reports a signal as -N)."""
    if rc < 0:
        try:
            return f"was killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"was killed by signal {-rc}"
    return f"exited with code {rc}"


def exit_reason(rc: int) -> str:
    """describe_exit, with what the codes of :mod:`quanta.runtime` mean (the child's log has the detail)."""
    if rc == EXIT_CONFIGURATION:
        return f"{describe_exit(rc)} (a configuration error; its log says which)"
    if rc == EXIT_PORT_IN_USE:
        return f"{describe_exit(rc)} (a port it binds is held by another process; its log names the holder)"
    return describe_exit(rc)


@functools.cache
def _prctl() -> Callable[..., int]:
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


def die_with_parent() -> Callable[[], None] | None:
    """A preexec function (run in the child between fork and exec) that has the kernel SIGKILL the child
    when the process that forks it dies; None elsewhere (only Linux has PR_SET_PDEATHSIG; FreeBSD's
    procctl(PROC_PDEATHSIG_CTL) is not used).

    Linux sends the signal when the *thread* that forked exits, so the supervisor forks from its main
    thread (``Supervisor.run`` checks). If the parent died before the setting took, the child's parent is
    already someone else and no signal would come: the child exits at once instead."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = _prctl()
    parent = os.getpid()

    def preexec() -> None:
        if prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def group_members(pgid: int) -> list[psutil.Process]:
    """The live processes of process group ``pgid``."""
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def signal_group(pgid: int, sig: signal.Signals) -> bool:
    """Send ``sig`` to process group ``pgid``; False if the group is gone."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError as e:
        log.error("cannot signal process group %d: %s", pgid, e)
        return False


def _command(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())[:120] or proc.name()
    except psutil.Error:
        return "?"


@dataclass
class _Attempts:
    """One child's restart state."""

    restart: bool  # the next start is a restart (a port still held then is a leftover, not a setting)
    delay: float  # before the next restart; doubles up to max_delay
    port_busy_since: float | None = None  # first refusal of the current run of port-in-use exits


class Supervisor:
    def __init__(self, children: list[Child], *, stop_timeout: float = 10.0, port_retry_window: float = 60.0,
                 min_delay: float = 0.5, max_delay: float = 10.0, restarted: bool | None = None,
                 status: StatusRecord | None = None) -> None:
        """``restarted``: this supervisor is itself a restarted child (default: read from SUPERVISED_ENV),
        so a port still held at its children's first start is a leftover to wait for, not a setting.
        ``status``: where to record the children's states for ``quanta status``."""
        self.children = children
        self.stop_timeout = stop_timeout
        self.port_retry_window = port_retry_window
        self.min_delay = min_delay
        self.max_delay = max_delay
        self.restarted = os.environ.get(SUPERVISED_ENV) == "restart" if restarted is None else restarted
        self.status = status
        self._stop = asyncio.Event()

    def stop(self) -> None:
        """Ask ``run`` to stop every child and return (what STOP_SIGNALS do)."""
        if not self._stop.is_set():
            self._stop.set()
            self._note(None, state="stopping")

    def _note(self, child: Child | None, **fields: Any) -> None:
        """Record a change of the supervisor (``child`` None) or of a child in the status record, if kept."""
        if self.status is None:
            return
        rec: Any = self.status.supervisor if child is None else self.status.child(child.name)
        for name, value in fields.items():
            setattr(rec, name, value)
        if child is not None:
            rec.restarts = child.restarts
        self.status.write()

    async def run(self) -> int:
        """Run until stopped (0) or until a child fails in a way restarting cannot mend (its code, 2)."""
        if threading.current_thread() is not threading.main_thread():
            log.warning("supervisor runs outside the main thread: its children get their parent-death signal "
                        "when this thread ends")
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self.stop)
        for c in self.children:
            self._note(c, state="starting", argv=c.argv)
        code = 0
        for finished in asyncio.as_completed([asyncio.create_task(self._run_child(c)) for c in self.children]):
            rc = await finished
            if rc and not code:
                code = rc
                log.error("stopping every component")
                self.stop()
        log.info("all components stopped")
        self._note(None, state="stopped", exit_code=code)
        return code

    # ------------------------------------------------------------------ one child
    async def _run_child(self, child: Child) -> int:
        """Start, watch and restart one child; return 0 once stopped, or EXIT_CONFIGURATION."""
        attempts = _Attempts(restart=self.restarted, delay=self.min_delay)
        while not self._stop.is_set():
            proc = await self._spawn(child, attempts.restart)
            if proc is None:
                return EXIT_CONFIGURATION
            rc = await self._watch(child, proc)
            if rc is None:
                break
            delay = self._restart_delay(child, rc, attempts)
            now = time.time()
            self._note(child, state="failed" if delay is None else "restarting", last_error=exit_reason(rc),
                       last_error_at=now, next_start_at=None if delay is None else now + delay)
            if delay is None:
                return EXIT_CONFIGURATION
            if await self._stopped_within(delay):
                break
            child.restarts += 1
            attempts.restart = True
        self._note(child, state="stopped", next_start_at=None)
        return 0

    def _restart_delay(self, child: Child, rc: int, attempts: _Attempts) -> float | None:
        """How long to wait before restarting a child that exited ``rc`` (None: do not restart it), logged."""
        now = time.monotonic()
        delay = attempts.delay
        attempts.delay = min(delay * 2, self.max_delay)
        if rc == EXIT_CONFIGURATION:
            log.error("%s exited with a configuration error (code %d); not restarting", child.name, rc)
            return None
        if rc != EXIT_PORT_IN_USE:
            attempts.port_busy_since = None
            if now - child.started_at > HEALTHY_RUN:
                delay, attempts.delay = self.min_delay, min(self.min_delay * 2, self.max_delay)
            log.warning("restarting %s in %.1f s (restart %d)", child.name, delay, child.restarts + 1)
            return delay
        if not attempts.restart:
            log.error("%s cannot bind a port on its first start (code %d; its message above names the port and "
                      "the holder): a configuration error; not restarting", child.name, rc)
            return None
        attempts.port_busy_since = attempts.port_busy_since or now
        if now - attempts.port_busy_since >= self.port_retry_window:
            log.error("%s: its port is still in use %.0f s after its restart (its message above names the holder); "
                      "giving up", child.name, now - attempts.port_busy_since)
            return None
        log.warning("%s: its port is still held after the restart; retrying in %.1f s (gives up %.0f s after the "
                    "first refusal)", child.name, delay, self.port_retry_window)
        return delay

    async def _spawn(self, child: Child, restart: bool) -> asyncio.subprocess.Process | None:
        env = {**os.environ, SUPERVISED_ENV: "restart" if restart else "start"}
        try:
            proc = await asyncio.create_subprocess_exec(*child.argv, env=env, start_new_session=True,
                                                        preexec_fn=die_with_parent())
        except (OSError, subprocess.SubprocessError) as e:
            log.error("%s cannot be started (%s): %s", child.name, " ".join(child.argv), e)
            self._note(child, state="failed", last_error=f"cannot be started: {e}", last_error_at=time.time())
            return None
        child.proc = proc
        child.started_at = time.monotonic()
        log.info("started %s (pid %d, process group %d)", child.name, proc.pid, proc.pid)
        self._note(child, state="running", pid=proc.pid, started=process_start(proc.pid), next_start_at=None)
        return proc

    async def _watch(self, child: Child, proc: asyncio.subprocess.Process) -> int | None:
        """Wait for the child to die (return its code) or for a stop (stop it, return None); either way
        nothing of its process group is left running."""
        died = asyncio.ensure_future(proc.wait())
        stop = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait([died, stop], return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not died.done():
            await self._terminate(child, proc, died)
            return None
        rc = died.result()
        log.warning("%s (pid %d) %s; %s", child.name, proc.pid, describe_exit(rc), self._kill_leftovers(proc.pid))
        return rc

    async def _terminate(self, child: Child, proc: asyncio.subprocess.Process, died: asyncio.Future[int]) -> None:
        signal_group(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(died), self.stop_timeout)
        except asyncio.TimeoutError:
            log.warning("%s (pid %d) did not stop within %.0f s of SIGTERM; killing its process group",
                        child.name, proc.pid, self.stop_timeout)
            signal_group(proc.pid, signal.SIGKILL)
        rc = await died
        log.info("%s (pid %d) stopped: it %s; %s", child.name, proc.pid, describe_exit(rc),
                 self._kill_leftovers(proc.pid))

    @staticmethod
    def _kill_leftovers(pgid: int) -> str:
        """SIGKILL what remains of a dead child's process group, and say what that was (the leader's pid
        stays reserved as the group's id while any member lives, so the signal reaches no other process)."""
        members = group_members(pgid)
        if not members:
            return f"its process group {pgid} held no other process"
        signal_group(pgid, signal.SIGKILL)
        return (f"killed its process group {pgid}: {len(members)} leftover process(es): "
                + "; ".join(f"pid {m.pid} ({_command(m)})" for m in members))

    async def _stopped_within(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
            return True
        except asyncio.TimeoutError:
            return False
