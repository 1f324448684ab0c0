"""Helpers shared by method implementations."""

from __future__ import annotations

import datetime as dt
import errno
import os
import platform
import stat
import sys
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:  # pragma: no cover
    from ..spec import MethodEnv

READ_CHUNK = 1 << 16  # small enough that reading a tiny file allocates little
SYSTEM_FILE_BYTES = 4 * 1024 * 1024  # a system file read whole (os-release, cpuinfo, a unit file)
# Opening never waits for a writer (FIFO) or a device; never makes a terminal ours; not inherited.
_OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
               | getattr(os, "O_BINARY", 0))


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def os_type() -> str:
    if sys.platform.startswith("win"):
        return "Windows"
    if sys.platform == "darwin":
        return "MacOS"
    if sys.platform.startswith("linux"):
        return "Linux"
    return platform.system() or sys.platform


def user_name(uid: int) -> str | None:
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return None


def group_name(gid: int) -> str | None:
    try:
        import grp

        return grp.getgrgid(gid).gr_name
    except (ImportError, KeyError):
        return None


class SpecialFileError(OSError):
    """A path that is a FIFO, a device, a socket or another non-regular file: never read."""

    def __init__(self, path: str | Path, kind: str) -> None:
        super().__init__(errno.EINVAL, f"'{path}' is {kind}, not a regular file: refused")
        self.kind = kind

    def __str__(self) -> str:
        return str(self.strerror)


def file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "a special file"


def _check_regular(path: str | Path, mode: int) -> None:
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, "Is a directory", str(path))
    if not stat.S_ISREG(mode):
        raise SpecialFileError(path, file_kind(mode))


def open_regular(path: str | Path) -> BinaryIO:
    """Open a regular file for reading; anything else raises (SpecialFileError, IsADirectoryError, OSError).

    The path is checked before opening (opening a device can have effects), and the opened
    descriptor again, so a file swapped for a FIFO in between is refused too. The open itself
    never blocks: O_NONBLOCK (no effect on a regular file) keeps a FIFO from waiting for a writer.
    """
    _check_regular(path, os.stat(path).st_mode)
    fd = os.open(path, _OPEN_FLAGS)
    try:
        _check_regular(path, os.fstat(fd).st_mode)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_capped(f: BinaryIO, max_bytes: int, env: MethodEnv | None = None) -> bytes:
    """Up to ``max_bytes + 1`` bytes of ``f`` (one more than allowed shows it is too large), in chunks."""
    parts: list[bytes] = []
    left = max_bytes + 1
    while left > 0:
        chunk = f.read(min(READ_CHUNK, left))
        if not chunk:
            break
        parts.append(chunk)
        left -= len(chunk)
        if env is not None:
            env.check_time()
    return b"".join(parts)


def read_system_file(path: str | Path, max_bytes: int = SYSTEM_FILE_BYTES) -> bytes | None:
    """A regular file of at most ``max_bytes``, or None when missing, unreadable, special or larger."""
    try:
        with open_regular(path) as f:
            data = read_capped(f, max_bytes)
    except OSError:
        return None
    return data if len(data) <= max_bytes else None


def read_text(path: str | Path, max_bytes: int = SYSTEM_FILE_BYTES) -> str | None:
    data = read_system_file(path, max_bytes)
    return None if data is None else data.decode("utf-8", errors="replace").strip()


def os_release() -> dict[str, str]:
    out: dict[str, str] = {}
    for path in ("/etc/os-release", "/usr/lib/os-release"):
        text = read_text(path)
        if text is None:
            continue
        for line in text.splitlines():
            if "=" in line and not line.startswith("#"):
                k, v = line.split("=", 1)
                out[k.strip()] = v.strip().strip('"')
        break
    return out


def env_tmp() -> str:
    if sys.platform.startswith("win"):
        return os.environ.get("TMP") or os.environ.get("TEMP") or os.path.join(os.environ.get("WINDIR", "C:\\Windows"), "Temp")
    return os.environ.get("TMPDIR") or "/tmp"
