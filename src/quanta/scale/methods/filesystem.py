"""SCALE module FileSystem: file contents, details and directory listings, with limits."""

from __future__ import annotations

import fnmatch
import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ..spec import ColumnSpec as C
from ..spec import MethodEnv, MethodError, method
from ..spec import ParamSpec as P
from ._common import READ_CHUNK, SpecialFileError, group_name, iso, open_regular, read_capped, user_name

MAX_LINES = 50_000
MAX_FILE_BYTES = 10 * 1024 * 1024
MAX_DEPTH = 32
MAX_COUNT = 100_000

_FILE_PARAM = P("FileName", "string", required=True, description="full path of the file", aliases=("FilePath",))


def _path(args: dict[str, object]) -> Path:
    p = Path(str(args["FileName"])).expanduser()
    if not p.is_absolute():
        raise MethodError(f"FileName must be an absolute path, got '{args['FileName']}'")
    return p


def _refusal(path: Path, e: OSError) -> MethodError:
    if isinstance(e, SpecialFileError):
        return MethodError(str(e))
    if isinstance(e, IsADirectoryError):
        return MethodError(f"'{path}' is a directory")
    if isinstance(e, PermissionError):
        return MethodError(f"Permission denied reading '{path}'")
    return MethodError(f"Cannot read '{path}': {e.strerror or e}")


def _lines(f: BinaryIO, env: MethodEnv) -> Iterator[bytes]:
    """The lines of ``f`` (without their LF or CRLF), from at most MAX_FILE_BYTES read in chunks."""
    left = MAX_FILE_BYTES
    tail = b""
    while left > 0:
        chunk = f.read(min(READ_CHUNK, left))
        if not chunk:
            break
        left -= len(chunk)
        *complete, tail = (tail + chunk).split(b"\n")
        yield from complete
        env.check_time()
    if tail:
        yield tail


@method(
    "FileSystem", "GetFileByLine",
    f"A text file, one row per line (LF or CRLF). At most {MAX_LINES:,} lines and the first "
    f"{MAX_FILE_BYTES // (1024 * 1024)} MB are read. A missing file gives an empty table; FIFOs, devices, "
    "sockets and other special files are refused.",
    params=(_FILE_PARAM,),
    columns=(C("LineNumber", "integer"), C("Content", "string")),
)
def get_file_by_line(env: MethodEnv, args: dict[str, object]):
    path = _path(args)
    rows: list[list[object]] = []
    try:
        with open_regular(path) as f:
            for n, line in enumerate(_lines(f, env), 1):
                if n > MAX_LINES:
                    break
                text = line[:-1] if line.endswith(b"\r") else line
                rows.append(env.take([n, text.decode("utf-8", errors="replace")]))
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as e:
        raise _refusal(path, e) from None
    return rows


@method(
    "FileSystem", "GetFile",
    f"The whole content of a text file as one row. Files over {MAX_FILE_BYTES // (1024 * 1024)} MB are refused, "
    "as are FIFOs, devices, sockets and other special files. A missing file gives an empty table.",
    params=(_FILE_PARAM,),
    columns=(C("FileName", "string"), C("Size", "integer"), C("Content", "string")),
)
def get_file(env: MethodEnv, args: dict[str, object]):
    path = _path(args)
    try:
        with open_regular(path) as f:
            data = read_capped(f, MAX_FILE_BYTES, env)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as e:
        raise _refusal(path, e) from None
    if len(data) > MAX_FILE_BYTES:
        raise MethodError(f"File '{path}' exceeds the {MAX_FILE_BYTES // (1024 * 1024)} MB limit")
    return [env.take([str(path), len(data), data.decode("utf-8", errors="replace")])]


def _sha256(path: Path, env: MethodEnv) -> str | None:
    """SHA-256 of a regular file (None for a special or unreadable one), read in chunks."""
    h = hashlib.sha256()
    try:
        with open_regular(path) as f:
            while chunk := f.read(READ_CHUNK):
                h.update(chunk)
                env.check_time()
    except OSError:
        return None
    return h.hexdigest()


@method(
    "FileSystem", "GetFileDetails",
    "Size, times, owner, mode and SHA-256 of one file (no SHA-256 for directories, FIFOs, devices and sockets). "
    "A missing file gives an empty table.",
    params=(_FILE_PARAM,),
    columns=(
        C("FileName", "string"), C("Name", "string"), C("Directory", "string"), C("Size", "integer"),
        C("CreationTime", "datetime", "birth time where the platform records it, else inode change time"),
        C("LastModified", "datetime"), C("LastAccessed", "datetime"), C("Owner", "string"), C("Group", "string"),
        C("Mode", "string"), C("IsDirectory", "boolean"), C("Sha256", "string", "empty for directories and special files"),
    ),
)
def get_file_details(env: MethodEnv, args: dict[str, object]):
    path = _path(args)
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return []
    except PermissionError:
        raise MethodError(f"Permission denied reading '{path}'") from None
    created = getattr(st, "st_birthtime", None) or st.st_ctime
    is_dir = stat.S_ISDIR(st.st_mode)
    owner = user_name(st.st_uid) if hasattr(os, "getuid") else None
    group = group_name(st.st_gid) if hasattr(os, "getuid") else None
    return [[
        str(path), path.name, str(path.parent), st.st_size, iso(created), iso(st.st_mtime), iso(st.st_atime),
        owner, group, stat.filemode(st.st_mode), is_dir, _sha256(path, env) if stat.S_ISREG(st.st_mode) else None,
    ]]


@method(
    "FileSystem", "GetFiles",
    f"A directory listing. Depth 0 lists the folder itself; deeper levels recurse (at most {MAX_DEPTH}). "
    f"At most MaxCount entries (default 10,000, at most {MAX_COUNT:,}); symbolic links are not followed.",
    params=(
        P("Folder", "string", required=True, description="full path of the directory", aliases=("Directory", "FolderPath")),
        P("Depth", "integer", default=0, description="levels of subdirectories to descend"),
        P("MaxCount", "integer", default=10_000, description="maximum entries returned"),
        P("Pattern", "string", default="*", description="glob pattern matched against entry names"),
    ),
    columns=(
        C("Name", "string"), C("Path", "string"), C("Directory", "string"), C("IsDirectory", "boolean"),
        C("Size", "integer"), C("LastModified", "datetime"), C("Depth", "integer"),
    ),
)
def get_files(env: MethodEnv, args: dict[str, object]):
    root = Path(str(args["Folder"])).expanduser()
    depth = int(args["Depth"])  # type: ignore[arg-type]
    count = int(args["MaxCount"])  # type: ignore[arg-type]
    pattern = str(args["Pattern"])
    if not root.is_absolute():
        raise MethodError(f"Folder must be an absolute path, got '{root}'")
    if not 0 <= depth <= MAX_DEPTH:
        raise MethodError(f"Depth must be between 0 and {MAX_DEPTH}")
    if not 1 <= count <= MAX_COUNT:
        raise MethodError(f"MaxCount must be between 1 and {MAX_COUNT}")
    if not root.is_dir():
        return []
    rows: list[list[object]] = []
    stack: list[tuple[Path, int]] = [(root, 0)]
    while stack:
        d, level = stack.pop()
        env.check_time()
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError:
            continue
        subdirs = []
        for e in entries:
            try:
                is_dir = e.is_dir(follow_symlinks=False)
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if fnmatch.fnmatchcase(e.name, pattern):
                rows.append(env.take([e.name, e.path, str(d), is_dir, None if is_dir else st.st_size, iso(st.st_mtime), level]))
                if len(rows) >= count:
                    return rows
            if is_dir and level < depth:
                subdirs.append((Path(e.path), level + 1))
        stack.extend(reversed(subdirs))
    return rows


MAX_PATTERN = 256
DEFAULT_LIMIT = 8192  # the model's default


@method(
    "FileSystem", "GetFilesInDirectory",
    "The regular files of a directory and, with Recursive (default true), of its subdirectories down to "
    f"{MAX_DEPTH} levels: one row each with the model's columns. Directories, symbolic links, FIFOs, devices and "
    "sockets are not listed and links are not followed (no loops). At most Limit files (default 8,192; 0: no limit "
    "but the payload's row limit). A Directory that does not exist or is a file is an error; one that cannot be "
    "read, or holds no files, gives an empty table; unreadable subdirectories are skipped.",
    params=(
        P("Directory", "string", required=True, description="full path of the directory",
          aliases=("Folder", "FolderPath", "Path")),
        P("Recursive", "boolean", default=True, description="also list the files of subdirectories"),
        P("Limit", "integer", default=DEFAULT_LIMIT, description="return no more than this many files; 0: all"),
        P("Exclude", "table", default=None,
          description="one column: directory paths relative to Directory not to descend into"),
        P("Pattern", "string", default="*",
          description=f"glob matched against file names, at most {MAX_PATTERN} characters (Quanta)"),
    ),
    columns=(
        C("FileName", "string", "full path"), C("FileSize", "integer", "bytes"),
        C("DateCreated", "datetime", "birth time; empty where the file system does not record it"),
        C("DateModified", "datetime"),
    ),
)
def get_files_in_directory(env: MethodEnv, args: dict[str, object]):
    raw = str(args["Directory"])
    pattern = str(args["Pattern"])
    recursive = bool(args["Recursive"])
    limit = int(args["Limit"])  # type: ignore[call-overload]
    if "\0" in raw or "\0" in pattern:
        raise MethodError("Directory and Pattern must not contain NUL characters")
    if len(pattern) > MAX_PATTERN:
        raise MethodError(f"Pattern exceeds {MAX_PATTERN} characters")
    if limit < 0:
        raise MethodError("Limit must be 0 (no limit) or more")
    root = Path(raw).expanduser()
    if not root.is_absolute():
        raise MethodError(f"Directory must be an absolute path, got '{raw}'")
    root = Path(os.path.normpath(root))  # "a/../b" is reported as "b"; links are not resolved
    excluded: set[str] = set()
    table = args.get("Exclude")
    if table is not None:
        for row in table.rows:  # type: ignore[attr-defined]
            if row and isinstance(row[0], str) and row[0] and "\0" not in row[0]:
                excluded.add(os.path.normpath(os.path.join(root, row[0])))
    try:
        st = os.stat(root)
    except FileNotFoundError:
        raise MethodError(f"Directory '{root}' does not exist") from None
    except OSError as e:
        raise MethodError(f"Cannot read '{root}': {e.strerror or e}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MethodError(f"'{root}' is not a directory")
    rows: list[list[object]] = []
    stack: list[tuple[Path, int]] = [(root, 0)]
    while stack:
        d, level = stack.pop()
        env.check_time()
        subdirs = []
        try:
            with os.scandir(d) as it:
                entries = []
                for n, e in enumerate(it, 1):
                    entries.append(e)
                    if n % 4096 == 0:
                        env.check_time()
        except OSError:
            continue
        entries.sort(key=lambda e: e.name)
        for e in entries:
            try:
                est = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(est.st_mode):
                if recursive and level < MAX_DEPTH and os.path.normpath(e.path) not in excluded:
                    subdirs.append((Path(e.path), level + 1))
                continue
            if not stat.S_ISREG(est.st_mode) or not fnmatch.fnmatchcase(e.name, pattern):
                continue
            born = getattr(est, "st_birthtime", None)
            rows.append(env.take([e.path, est.st_size, iso(born) if born else "", iso(est.st_mtime)]))
            if limit and len(rows) >= limit:
                return rows
        stack.extend(reversed(subdirs))
    return rows
