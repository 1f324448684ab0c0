"""Agent limits hold *while* a payload runs: linear-time regular expressions, memory bounded as
values and rows are produced, special files refused, cancellation and the time limit reaching
SQL, SQL functions, method loops and child processes.

Memory is measured in a child process (``ru_maxrss`` growth over a warmed-up baseline) under the
agent's own SQLite heap limit (``quanta.agent.main.limit_payload_memory``); before these limits
the same payloads reached 1.0-1.5 GB.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from quanta.scale import AgentContext, Limits, RunResult, compile_scale, run_program

MiB = 1024 * 1024
ROWS20 = "(WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x < 20) SELECT x FROM c)"
COUNT_TO_BILLION = ("SELECT COUNT(*) AS n FROM (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c "
                    "WHERE x < 1000000000) SELECT x FROM c);")


@pytest.fixture
def ctx(tmp_path: Path) -> AgentContext:
    return AgentContext(data_dir=tmp_path / "agent")


def run(ctx: AgentContext, text: str, params: dict | None = None, **kw) -> RunResult:
    return run_program(compile_scale(text, params), context=ctx, **kw)


def timed(ctx: AgentContext, text: str, params: dict | None = None, **kw) -> tuple[RunResult, float]:
    started = time.monotonic()
    r = run(ctx, text, params, **kw)
    return r, time.monotonic() - started


# ------------------------------------------------------------------ regular expressions
@pytest.mark.parametrize("n", [30, 40, 5000])
def test_backtracking_pattern_from_a_definition_parameter_is_linear(ctx, n: int) -> None:
    # (a+)+$ against a...ab: Python's re takes minutes from ~30 characters on
    payload = ('@t = SELECT printf("%%.*c", %d, "a") || "b" AS s; '
               'SELECT s REGEXP %%Pattern%% AS m, length(REGEXPREPLACE(%%Pattern%%, s, "x")) AS n FROM @t;') % n
    r, elapsed = timed(ctx, payload, {"Pattern": "(a+)+$"})
    assert r.status == "success", r.error
    assert r.rows == [[0, n + 1]]
    assert elapsed < 0.5, f"{elapsed:.3f} s"
    r, elapsed = timed(ctx, payload, {"Pattern": "(a|aa)+b$"})
    assert r.rows == [[1, 1]] and elapsed < 0.5


@pytest.mark.parametrize("pattern, reason", [
    (r"(a)\1", "invalid escape sequence"),
    (r"a(?=b)", "invalid perl operator"),
    (r"(?<!x)a", "invalid perl operator"),
    ("a{5000}", "invalid repetition size"),
    ("(unclosed", "missing )"),
    (r"\pL{1000}", "pattern too large"),  # past RE2's memory budget per pattern
])
def test_pattern_re2_cannot_take_is_a_clear_error(ctx, pattern: str, reason: str) -> None:
    for payload in ('@t = SELECT "aa" AS s;\nSELECT s REGEXP %Pattern% AS m FROM @t;',
                    '@t = SELECT "aa" AS s;\nSELECT REGEXPREPLACE(%Pattern%, s, "x") AS m FROM @t;'):
        r = run(ctx, payload, {"Pattern": pattern})
        assert r.status == "error"
        assert r.error.message.startswith(f"SQL error: invalid regular expression '{pattern}': ")
        assert reason in r.error.message and "RE2 syntax" in r.error.message
        assert (r.error.line, r.error.column) == (2, 1)


def test_regexp_semantics_on_re2(ctx) -> None:
    r = run(ctx, 'SELECT REGEXPREPLACE("é", "café", "e") AS a, REGEXPREPLACE("^.", "éa", "x") AS b, '
                 'REGEXPREPLACE("(\\w+)@(\\w+)", "me@host you@there", "$2:$1 [$&] $$ $9") AS c, '
                 '"x" REGEXP NULL AS d, REGEXPREPLACE("", "ab", "-") AS e;')
    assert r.status == "success", r.error
    assert r.rows == [["cafe", "xa", "host:me [me@host] $ $9 there:you [you@there] $ $9", None, "-a-b-"]]


# ------------------------------------------------------------------ memory, measured in a child
_PEAK = """
import json, resource, sys
from pathlib import Path
from quanta.agent.main import limit_payload_memory
from quanta.scale import AgentContext, Limits, compile_scale, run_program
heap = limit_payload_memory()
ctx = AgentContext(data_dir=Path(sys.argv[2]))
run_program(compile_scale("SELECT REGEXPREPLACE('a', 'abc', 'x') AS warm;"), context=ctx)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
r = run_program(compile_scale(sys.argv[1]), context=ctx, limits=Limits(timeout_seconds=30))
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
print(json.dumps({"status": r.status, "error": str(r.error), "grown_kib": grown, "heap": heap}))
"""


def _peak(payload: str, data_dir: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", _PEAK, payload, str(data_dir)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def big_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("big")
    sparse = d / "sparse.bin"  # 2 GiB of zero bytes, no newline, hardly any disk
    with open(sparse, "wb") as f:
        f.truncate(2 * 1024 * MiB)
    lines = d / "lines.txt"  # 200,000 lines of 100 bytes (20 MB)
    with open(lines, "w") as f:
        f.writelines(f"{i:09d} {'x' * 89}\n" for i in range(200_000))
    return {"sparse": sparse, "lines": lines}


HOSTILE_MEMORY = {
    "zeroblob rows": f"SELECT zeroblob(60000000) AS z FROM {ROWS20};",
    "zeroblob under the value limit": f"SELECT zeroblob(16000000) AS z FROM {ROWS20};",
    "printf padding": f"SELECT printf('%.*c', 16000000, 'x') AS z FROM {ROWS20};",
    "sorted huge rows": f"SELECT length(z) AS n FROM (SELECT zeroblob(16000000) AS z, x FROM {ROWS20} ORDER BY x DESC);",
    "group_concat": f"SELECT length(group_concat(z)) AS n FROM (SELECT printf('%.*c', 8000000, 'x') AS z FROM {ROWS20});",
    "replace": "SELECT length(replace(printf('%.*c', 1000000, 'x'), 'x', printf('%.*c', 1000, 'y'))) AS n;",
    "REGEXPREPLACE": "SELECT length(REGEXPREPLACE('', printf('%.*c', 1000000, 'x'), printf('%.*c', 1000, 'y'))) AS n;",
    "GetFileByLine /dev/zero": '@f = FileSystem.GetFileByLine(FileName: "/dev/zero"); SELECT COUNT(*) AS n FROM @f;',
    "GetFile 2 GiB": '@f = FileSystem.GetFile(FileName: "{sparse}"); SELECT Size FROM @f;',
    "GetFileByLine 2 GiB without newline": '@f = FileSystem.GetFileByLine(FileName: "{sparse}"); SELECT COUNT(*) AS n FROM @f;',
    "method rows joined": ('@f = FileSystem.GetFileByLine(FileName: "{lines}"); '
                           'SELECT a.Content || b.Content AS c FROM @f a, @f b;'),
}


@pytest.mark.parametrize("name", list(HOSTILE_MEMORY))
def test_memory_limit_holds_while_the_work_runs(name: str, big_files: dict[str, Path], tmp_path: Path) -> None:
    payload = HOSTILE_MEMORY[name].replace("{sparse}", str(big_files["sparse"])).replace("{lines}", str(big_files["lines"]))
    started = time.monotonic()
    out = _peak(payload, tmp_path)
    elapsed = time.monotonic() - started
    assert out["heap"] == 2 * 64 * MiB + 32 * MiB  # MAX_PARALLEL payloads of 64 MiB, plus slack
    grown_mib = out["grown_kib"] / 1024
    # bounded by the limit (64 MiB), one value being built (16 MiB) and SQLite's share: ~3x the limit
    # at worst, against 1.0-1.5 GB before
    assert grown_mib < 200, (name, grown_mib, out)
    assert elapsed < 60
    if name.startswith("GetFileByLine /dev"):
        assert out["status"] == "error" and "is a character device, not a regular file: refused" in out["error"]
    elif name == "GetFile 2 GiB":
        assert out["status"] == "error" and "exceeds the 10 MB limit" in out["error"]
    elif name == "GetFileByLine 2 GiB without newline":
        assert out["status"] == "success", out  # one line: the first 10 MB, read in chunks
    else:
        assert out["status"] == "error", out
        assert "limit" in out["error"], out


def test_values_are_bounded_per_connection(ctx) -> None:
    r = run(ctx, "SELECT length(zeroblob(20000000)) AS n;")
    assert r.status == "error" and r.error.message.startswith("Memory limit of 67108864 bytes exceeded: string or blob too big")
    r = run(ctx, "SELECT length(zeroblob(16000000)) AS n;")  # a quarter of the memory limit is allowed
    assert r.rows == [[16_000_000]]
    r = run(ctx, "SELECT length(REGEXPREPLACE('x', printf('%.*c', 100000, 'x'), printf('%.*c', 200, 'y'))) AS n;")
    assert r.status == "error" and "REGEXPREPLACE result exceeds the limit of 16777216 bytes" in r.error.message


def test_rows_are_counted_as_they_arrive(ctx) -> None:
    lim = Limits(max_memory_bytes=4 * MiB)
    r, elapsed = timed(ctx, f"SELECT printf('%.*c', 1000000, 'x') AS z FROM {ROWS20};", limits=lim)
    assert r.status == "error" and r.error.message == f"Memory limit of {4 * MiB} bytes exceeded"
    r = run(ctx, "SELECT x FROM (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c) SELECT x FROM c);",
            limits=Limits(max_rows=1000))
    assert r.status == "error" and r.error.message == "Result exceeds the row limit of 1000 rows"


def test_method_output_is_counted_while_produced(ctx, big_files: dict[str, Path]) -> None:
    r = run(ctx, f'FileSystem.GetFileByLine(FileName: "{big_files["lines"]}");', limits=Limits(max_memory_bytes=MiB))
    assert r.status == "error"
    assert r.error.message == f"Memory limit of {MiB} bytes exceeded (in call to FileSystem.GetFileByLine)"
    r = run(ctx, f'FileSystem.GetFileByLine(FileName: "{big_files["lines"]}");', limits=Limits(max_rows=10))
    assert r.error.message == "Result exceeds the row limit of 10 rows (in call to FileSystem.GetFileByLine)"
    r = run(ctx, f'@f = FileSystem.GetFileByLine(FileName: "{big_files["lines"]}"); SELECT COUNT(*) AS n FROM @f;')
    assert r.rows == [[50_000]]  # the documented line cap


# ------------------------------------------------------------------ special files
def _in_thread(fn, timeout: float = 5.0):  # type: ignore[no-untyped-def]
    """fn() in a daemon thread; fail (without hanging the suite) when it blocks past timeout."""
    box: list[object] = []
    t = threading.Thread(target=lambda: box.append(fn()), daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"blocked for more than {timeout} s"
    return box[0]


@pytest.fixture
def specials(tmp_path: Path):  # type: ignore[no-untyped-def]
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    sock_path = tmp_path / "sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    link = tmp_path / "link-to-fifo"
    link.symlink_to(fifo)
    yield {"fifo": (fifo, "a FIFO"), "socket": (sock_path, "a socket"), "symlink": (link, "a FIFO"),
           "/dev/zero": (Path("/dev/zero"), "a character device"), "/dev/null": (Path("/dev/null"), "a character device")}
    sock.close()


@pytest.mark.parametrize("which", ["fifo", "socket", "symlink", "/dev/zero", "/dev/null"])
@pytest.mark.parametrize("method", ["GetFile", "GetFileByLine"])
def test_file_methods_refuse_special_files(ctx, specials, which: str, method: str) -> None:
    path, kind = specials[which]
    r = _in_thread(lambda: run(ctx, f'FileSystem.{method}(FileName: "{path}");'))
    assert r.status == "error"
    assert r.error.message == f"'{path}' is {kind}, not a regular file: refused (in call to FileSystem.{method})"


def test_file_details_of_a_fifo_has_no_hash_and_does_not_block(ctx, specials) -> None:
    fifo, _ = specials["fifo"]
    r = _in_thread(lambda: run(ctx, f'@d = FileSystem.GetFileDetails(FileName: "{fifo}"); SELECT Mode, Sha256 FROM @d;'))
    assert r.status == "success" and len(r.rows) == 1
    mode, sha = r.rows[0]
    assert mode.startswith("p") and sha is None


def test_regular_files_still_read(ctx, tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_bytes(b"one\r\ntwo\nthree")
    r = run(ctx, f'FileSystem.GetFileByLine(FileName: "{f}");')
    assert r.rows == [[1, "one"], [2, "two"], [3, "three"]]
    r = run(ctx, f'@d = FileSystem.GetFileDetails(FileName: "{f}"); SELECT Sha256 FROM @d;')
    import hashlib

    assert r.rows == [[hashlib.sha256(b"one\r\ntwo\nthree").hexdigest()]]
    r = run(ctx, f'FileSystem.GetFile(FileName: "{tmp_path}");')
    assert r.error.message == f"'{tmp_path}' is a directory (in call to FileSystem.GetFile)"


# ------------------------------------------------------------------ cancellation and time
def _cancel_after(ctx: AgentContext, seconds: float) -> threading.Timer:
    t = threading.Timer(seconds, ctx.cancel.set)
    t.start()
    return t


def test_cancel_stops_sql(ctx) -> None:
    _cancel_after(ctx, 0.3)
    r, elapsed = timed(ctx, COUNT_TO_BILLION)
    assert r.status == "error" and r.error.message == "Instruction cancelled"
    assert elapsed < 2, elapsed


def test_cancel_by_instruction_id_stops_only_that_payload(tmp_path: Path) -> None:
    from quanta.scale import cancel

    results: dict[int, tuple[RunResult, float]] = {}

    def work(iid: int) -> None:
        results[iid] = timed(AgentContext(data_dir=tmp_path, instruction_id=iid), COUNT_TO_BILLION,
                             limits=Limits(timeout_seconds=3))

    threads = [threading.Thread(target=work, args=(i,)) for i in (7, 8)]
    for t in threads:
        t.start()
    deadline, told = time.monotonic() + 5, 0
    while told == 0 and time.monotonic() < deadline:  # until payload 7 runs; then it is told once
        told = cancel([7])
        time.sleep(0.01)
    assert told == 1
    for t in threads:
        t.join(10)
    r7, elapsed7 = results[7]
    assert r7.status == "error" and r7.error.message == "Instruction cancelled"
    assert elapsed7 < 2, elapsed7
    r8, elapsed8 = results[8]  # the other instruction ran on to its own time limit
    assert r8.error.message == "Time limit of 3 seconds exceeded" and elapsed8 >= 3
    assert cancel([7, 8]) == 0  # finished payloads are forgotten


def test_cancel_and_time_limit_stop_a_long_regexpreplace(ctx) -> None:
    # 16 M empty matches: one SQL function call, minutes of work, no progress-handler tick inside
    payload = "SELECT length(REGEXPREPLACE('', printf('%.*c', 16000000, 'x'), '')) AS n;"
    _cancel_after(ctx, 0.3)
    r, elapsed = timed(ctx, payload)
    assert r.status == "error" and r.error.message == "Instruction cancelled"
    assert elapsed < 2, elapsed
    ctx.cancel.clear()
    r, elapsed = timed(ctx, payload, limits=Limits(timeout_seconds=0.5))
    assert r.status == "error" and r.error.message == "Time limit of 0.5 seconds exceeded"
    assert elapsed < 2, elapsed


def test_cancel_stops_a_method_loop(ctx, tmp_path: Path) -> None:
    for i in range(40):
        d = tmp_path / "tree" / f"d{i}"
        d.mkdir(parents=True)
        for j in range(40):
            (d / f"f{j}").touch()
    ctx.cancel.set()
    r = run(ctx, f'FileSystem.GetFiles(Folder: "{tmp_path / "tree"}", Depth: 2);')
    assert r.status == "error" and r.error.message == "Instruction cancelled"


def test_cancel_kills_a_running_command(ctx) -> None:
    marker = "31.4159"
    _cancel_after(ctx, 0.5)
    r, elapsed = timed(ctx, f'NativeServices.RunCommand(CommandLine: "sleep {marker}");', allow_actions=True)
    assert r.status == "error" and r.error.message == "Instruction cancelled"
    assert elapsed < 2, elapsed
    alive = [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == ["sleep", marker]]
    assert alive == []


def test_command_output_is_bounded_while_it_runs(ctx) -> None:
    r, elapsed = timed(ctx, 'NativeServices.RunCommand(CommandLine: "yes quanta-output-flood");', allow_actions=True,
                       limits=Limits(max_memory_bytes=4 * MiB))
    assert r.status == "error" and "exceeds the memory limit" in r.error.message
    assert elapsed < 5, elapsed
    alive = [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == ["yes", "quanta-output-flood"]]
    assert alive == []
