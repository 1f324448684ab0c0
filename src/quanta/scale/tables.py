"""The Activity Record's tables, declared once (``quanta.scale.tables``).

Every capture source has a live table and, aggregated from it, an hourly, a daily and a monthly
table (``$Process_Live``, ``$Process_Hourly``, ...). This module is the single declaration of
their columns: the store creates its tables from it, SCALE's checker knows the table names from
it, and the method reference (``docs/scale.md``) lists the columns from it.

Standard library only: SCALE, the server and ``quanta scale check`` import it without the
capture code (``quanta.agent.inventory``), which imports it too.

Times (``TS`` and the other ``...Ts`` columns) are integers, seconds since 1970-01-01 UTC, as in
the model; in an aggregated table ``TS`` is the start of the hour, day or month (UTC).

What of this is the model's (the 1E client's Activity Record) and what is Quanta's own is
recorded here too, with where it was looked up (:data:`MODEL_PAGES`, ``Source.documented``), so
the reference says it next to each table rather than claiming more than was found: the model's
pages reachable when this was written name the capture sources and their four granularities, but
none of them showed a table's columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GRANULARITIES = ("Live", "Hourly", "Daily", "Monthly")
# The period of each aggregated table as an SQL expression of a Ts column (UTC).
PERIOD_SQL = {
    "Hourly": "(({ts}) / 3600) * 3600",
    "Daily": "(({ts}) / 86400) * 86400",
    "Monthly": "CAST(strftime('%s', {ts}, 'unixepoch', 'start of month') AS INTEGER)",
}
# Which table each aggregated table is computed from.
FINER = {"Hourly": "Live", "Daily": "Hourly", "Monthly": "Daily"}

# The model's pages these declarations were checked against (docs/scale.md lists them): each gives
# the feature, its Module.Inventory.Enabled switch, a live, hourly, daily and monthly table per
# capture source, and the capture sources by name; none reached showed the columns of a table.
MODEL_PAGES = (
    ("1E SDK, Tachyon Activity Record (reference)", "https://help.1e.com/display/TCNSDK/Tachyon+Activity+Record"),
    ("1E 8.1, Tachyon Activity Record (reference)", "https://help.1e.com/TCN81/en/736741-738804-activity-record.html"),
    ("1E 8.1, Tachyon Activity Record (capture sources by OS)",
     "https://help.1e.com/TCN81/en/699397-700899-tachyon-activity-record.html"),
    ("1E, Client Activity Record (capture sources by OS)",
     "https://docs.1e.com/en/Content/endpoint-troubleshooting/using-endpoint-troubleshooting/client-activity-record.htm"),
    ("1E 4.0, Tachyon Agent Historic Data Capture (capture sources)",
     "https://help.1e.com/display/TCN40/Tachyon+Agent+Historic+Data+Capture"),
    ("1E 8.1, User Defined Persistent Storage Tables",
     "https://help.1e.com/TCN81/en/736741-738838-user-defined-persistent-storage-tables.html"),
    ("1E 8.1, Storage.Set", "https://help.1e.com/TCN81/en/736741-765255-storage-set.html"),
)
# Public pages that are not the model's own but show its names: a SCALE guide's example query, and
# a third-party project's plan written from the model's Client Activity Record page. What they
# name is said per table (``Source.documented``) as "named by a secondary source".
SECONDARY_PAGES = (
    ("JohnNelsonNumber2/1e-docs, Language/Data_Types.md (a SCALE guide): `SELECT * FROM $SoftwarePerformance_Live "
     "WHERE Product LIKE ...` summing `ProcessorTimePercent`",
     "https://github.com/JohnNelsonNumber2/1e-docs/blob/main/Language/Data_Types.md"),
    ("a public script titled \"Yuzu TAR Roadmap\" (its repository was not established; the Yuzu project, an "
     "independent reimplementation, is at the address given) summarising the model's Client Activity Record page: "
     "the capture "
     "sources, `TS` (epoch seconds, UTC), `ProcessId` in `$TCP_Live` and `ConnectionCount` in the aggregated TCP "
     "tables, `IsUninstall` (live) and `InstallCount`/`UninstallCount` (aggregated) of the software installations, "
     "`ExecutionCount`, `UserName` and `ExecutableName` of the process stabilization tables, `$ProcessUsage_Daily` "
     "only, `$UserUsage_Daily` (SID, Username, LastSeen, Duration), and aggregation of every table from the live one",
     "https://github.com/Tr3kkR/Yuzu"),
)
_SECONDARY = "named by a secondary source (below): "
_SOURCE_LISTED = ("the source is in the model's list of capture sources (the capture-source pages above); "
                  "its columns are not confirmed against the model's documentation")


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # integer | number | string
    description: str
    # True: named as the model's column is believed to be named (not confirmed: no page of the model
    # reached showed a table's columns); False: a column Quanta captures in addition
    model: bool = True

    @property
    def sql_type(self) -> str:
        return {"integer": "INTEGER", "number": "REAL", "string": "TEXT"}[self.type]


@dataclass(frozen=True)
class Measure:
    """A column of the aggregated tables: ``first`` computes it from the live rows, ``rollup``
    from the rows of the next finer aggregated table (so daily = rollup of hourly)."""

    column: Column
    first: str
    rollup: str


@dataclass(frozen=True)
class Source:
    name: str
    description: str
    live: tuple[Column, ...]
    keys: tuple[str, ...]  # live columns the aggregated tables group by
    measures: tuple[Measure, ...]
    indexes: tuple[tuple[str, ...], ...] = ()  # extra live-table indexes (Ts is always indexed)
    # default retention per granularity: (max age in days, max rows)
    retention: dict[str, tuple[float, int]] = field(default_factory=dict)
    # what of this table was confirmed against the model's documentation (docs/scale.md says it
    # next to the table)
    documented: str = "not confirmed against the model's documentation"

    def table(self, granularity: str) -> str:
        return f"{self.name}_{granularity}"

    def columns(self, granularity: str) -> tuple[Column, ...]:
        if granularity == "Live":
            return self.live
        by_name = {c.name: c for c in self.live}
        return (by_name["TS"],) + tuple(by_name[k] for k in self.keys) + tuple(m.column for m in self.measures)


def _c(name: str, type_: str, description: str, model: bool = True) -> Column:
    return Column(name, type_, description, model)


TS = _c("TS", "integer", "Time of the event (live) or start of the period (aggregated), seconds since the epoch, "
                        "UTC (the model's name and casing, TS; SQL names are case-insensitive, so Ts works too)")

# Live rows are capped at 50,000: at a busy 200 process starts and 100 connections a minute the
# store then grows by under 20 MB on its first day (docs/benchmarks.md); the aggregated tables
# keep the counts for longer.
_DEFAULT_RETENTION = {"Live": (7.0, 50_000), "Hourly": (31.0, 100_000), "Daily": (366.0, 100_000),
                      "Monthly": (3 * 366.0, 100_000)}

SOURCES: tuple[Source, ...] = (
    Source(
        "Process",
        "Every process start (and its exit when seen).",
        (
            TS,
            _c("ProcessId", "integer", "Process id"),
            _c("ParentProcessId", "integer", "Parent process id"),
            _c("ExecutableName", "string", "File name of the executable"),
            _c("ExecutablePath", "string", "Full path of the executable", model=False),
            _c("CommandLine", "string", "Command line (arguments separated by spaces)"),
            _c("UserName", "string", "Account the process runs as"),
            _c("ExecutableHash", "string", "SHA-256 of the executable file (hex); empty when unreadable"),
            _c("ExitTs", "integer", "Exit time when seen (NULL while running or when the exit was missed)", model=False),
            _c("CaptureMethod", "string", "How the start was captured: 'netlink' (kernel process events) or 'poll'",
               model=False),
        ),
        keys=("ExecutableName", "ExecutablePath", "ExecutableHash", "UserName"),
        measures=(Measure(_c("ExecutionCount", "integer", "Process starts in the period"), "COUNT(*)",
                          "SUM(ExecutionCount)"),),
        indexes=(("ProcessId",), ("ExecutableName",)),
        retention=dict(_DEFAULT_RETENTION),
        documented=_SOURCE_LISTED + "; " + _SECONDARY + "`TS`, and `ExecutionCount`, `UserName`, `ExecutableName` "
                   "(for the model's process stabilization tables, not these)",
    ),
    Source(
        "TCP",
        "TCP connections, outbound and inbound, seen by polling the kernel's socket table.",
        (
            TS,
            _c("LastSeenTs", "integer", "Last time the connection was seen open", model=False),
            _c("ProcessId", "integer", "Process owning the local socket"),
            _c("ExecutableName", "string", "File name of that process's executable"),
            _c("ExecutablePath", "string", "Full path of that process's executable", model=False),
            _c("LocalAddress", "string", "Local IP address", model=False),
            _c("LocalPort", "integer", "Local port", model=False),
            _c("IpAddress", "string", "Remote IP address"),
            _c("Port", "integer", "Remote port"),
            _c("Direction", "string", "'Outbound' (this device connected) or 'Inbound' (to a listening port)",
               model=False),
            _c("CaptureMethod", "string", "How the connection was captured ('poll')", model=False),
        ),
        keys=("ExecutableName", "IpAddress", "Port", "Direction"),
        measures=(Measure(_c("ConnectionCount", "integer", "Connections first seen in the period"), "COUNT(*)",
                          "SUM(ConnectionCount)"),),
        indexes=(("LocalPort", "Port"), ("IpAddress",)),
        retention=dict(_DEFAULT_RETENTION),
        documented="the parts of the model's capture-source list that could be read did not reach a TCP row, so the "
                   "model's own pages confirm neither the name nor the columns; " + _SECONDARY + "the source (TCP "
                   "outbound connections), `TS`, `ProcessId` of `$TCP_Live` and `ConnectionCount` of the aggregated "
                   "tables. The model records outbound connections only; Quanta also inbound ones (`Direction`)",
    ),
    Source(
        "Software",
        "Software installs, removals and upgrades from the package databases (Linux: dpkg, rpm; Windows: the "
        "machine's Uninstall registry keys; macOS: the installer's receipts and /Applications), and the set present "
        "when capture first ran (Operation 'Present').",
        (
            TS,
            _c("Product", "string", "Package name"),
            _c("Version", "string", "Version after the change (before it, for an uninstall)"),
            _c("Publisher", "string", "Maintainer or vendor"),
            _c("Architecture", "string", "Package architecture"),
            _c("IsUninstall", "integer", "1 for a removal, 0 otherwise (the model's name for what Operation tells)"),
            _c("Operation", "string", "'Install', 'Uninstall', 'Upgrade' or 'Present'", model=False),
            _c("PreviousVersion", "string", "Version before an upgrade", model=False),
            _c("PackageManager", "string", "'dpkg', 'rpm', 'windows' (Uninstall keys), 'pkgutil' (receipts) or 'app' "
                                             "(/Applications)", model=False),
        ),
        keys=("Product", "Publisher"),
        measures=(
            Measure(_c("InstallCount", "integer", "Installs and upgrades in the period"),
                    "SUM(Operation IN ('Install','Upgrade'))", "SUM(InstallCount)"),
            Measure(_c("UninstallCount", "integer", "Removals in the period"),
                    "SUM(Operation = 'Uninstall')", "SUM(UninstallCount)"),
        ),
        retention={"Live": (366.0, 100_000), "Hourly": (31.0, 50_000), "Daily": (366.0, 50_000),
                   "Monthly": (3 * 366.0, 50_000)},
        documented=_SOURCE_LISTED + " (the model describes it as software installs, uninstalls and presence); "
                   + _SECONDARY + "`TS`, `IsUninstall`, `InstallCount`, `UninstallCount`",
    ),
    Source(
        "DevicePerformance",
        "CPU, memory, disk and network utilisation of the device, sampled at an interval.",
        (
            TS,
            _c("ProcessorUtilization", "number", "CPU busy, percent of all CPUs"),
            _c("MemoryUtilization", "number", "Memory in use, percent"),
            _c("MemoryAvailableBytes", "integer", "Memory available", model=False),
            _c("DiskReadBytesPerSecond", "number", "Disk reads, bytes per second", model=False),
            _c("DiskWriteBytesPerSecond", "number", "Disk writes, bytes per second", model=False),
            _c("NetworkSentBytesPerSecond", "number", "Network sent, bytes per second", model=False),
            _c("NetworkReceivedBytesPerSecond", "number", "Network received, bytes per second", model=False),
        ),
        keys=(),
        measures=tuple(
            m for name in ("ProcessorUtilization", "MemoryUtilization", "DiskReadBytesPerSecond",
                           "DiskWriteBytesPerSecond", "NetworkSentBytesPerSecond", "NetworkReceivedBytesPerSecond")
            for m in (
                Measure(_c(f"{name}Avg", "number", f"Average of {name} in the period"), f"AVG({name})",
                        f"AVG({name}Avg)"),
                Measure(_c(f"{name}Max", "number", f"Highest {name} in the period"), f"MAX({name})",
                        f"MAX({name}Max)"),
            )
        ) + (Measure(_c("SampleCount", "integer", "Samples in the period"), "COUNT(*)", "SUM(SampleCount)"),),
        retention={"Live": (3.0, 20_000), "Hourly": (31.0, 10_000), "Daily": (366.0, 5_000),
                   "Monthly": (3 * 366.0, 1_000)},
        documented=_SOURCE_LISTED + " (the model lists it for Windows only, from performance counters)",
    ),
    Source(
        "ProcessUsage",
        "CPU time and peak memory per executable and user, per sampling interval.",
        (
            TS,
            _c("ExecutableName", "string", "File name of the executable"),
            _c("UserName", "string", "Account the processes run as"),
            _c("ProcessorTimeSeconds", "number", "CPU time (user + system) used in the interval"),
            _c("PeakMemoryBytes", "integer", "Highest resident memory of one process seen in the interval"),
            _c("ProcessCount", "integer", "Processes of this executable and user seen in the interval", model=False),
        ),
        keys=("ExecutableName", "UserName"),
        measures=(
            Measure(_c("ProcessorTimeSeconds", "number", "CPU time used in the period"), "SUM(ProcessorTimeSeconds)",
                    "SUM(ProcessorTimeSeconds)"),
            Measure(_c("PeakMemoryBytes", "integer", "Highest resident memory of one process in the period"),
                    "MAX(PeakMemoryBytes)", "MAX(PeakMemoryBytes)"),
            Measure(_c("SampleCount", "integer", "Samples in the period"), "COUNT(*)", "SUM(SampleCount)"),
        ),
        indexes=(("ExecutableName",),),
        retention={"Live": (3.0, 100_000), "Hourly": (31.0, 100_000), "Daily": (366.0, 100_000),
                   "Monthly": (3 * 366.0, 50_000)},
        documented=_SOURCE_LISTED + " (the model's is a summary of process launches and terminations, off by "
                   "default); " + _SECONDARY + "the model has only `$ProcessUsage_Daily`; Quanta has all four",
    ),
)

SOURCES += (
    Source(
        "Logon",
        "User sessions starting and ending (Linux: the wtmp log, read from where it was last read, so "
        "sessions while the agent was stopped are found with their own times; macOS and Windows: the sessions the "
        "system lists, compared between polls, a logoff timed when found gone).",
        (
            TS,
            _c("UserName", "string", "Account of the session", model=False),
            _c("Operation", "string", "'Logon' or 'Logoff'", model=False),
            _c("Terminal", "string", "Terminal or line of the session (e.g. pts/0, tty1)", model=False),
            _c("RemoteHost", "string", "Host the session came from (empty when local)", model=False),
            _c("ProcessId", "integer", "Process of the session's login", model=False),
        ),
        keys=("UserName", "Operation"),
        measures=(Measure(_c("EventCount", "integer", "Logons or logoffs in the period"), "COUNT(*)",
                          "SUM(EventCount)"),),
        retention={"Live": (366.0, 50_000), "Hourly": (31.0, 50_000), "Daily": (366.0, 50_000),
                   "Monthly": (3 * 366.0, 10_000)},
        documented="Quanta's own source: no Logon source is in the parts of the model's capture-source list that "
                   "could be read, so the table name and its columns are not confirmed against the model's "
                   "documentation (the model's nearest, UserUsage, is daily time per user: `$UserUsage_Daily`, "
                   + _SECONDARY[:-2] + ")",
    ),
    Source(
        "Boot",
        "Boots (the kernel's boot time, once per boot) and clean shutdowns (the wtmp log).",
        (
            TS,
            _c("Operation", "string", "'Boot' or 'Shutdown'", model=False),
            _c("KernelVersion", "string", "Kernel release at the boot (empty for a shutdown)", model=False),
        ),
        keys=("Operation",),
        measures=(Measure(_c("EventCount", "integer", "Boots or shutdowns in the period"), "COUNT(*)",
                          "SUM(EventCount)"),),
        retention={"Live": (3 * 366.0, 10_000), "Hourly": (31.0, 10_000), "Daily": (366.0, 10_000),
                   "Monthly": (3 * 366.0, 10_000)},
        documented="Quanta's own source: the model's nearest, BootPerformance, holds Windows boot performance "
                   "metrics, not boot and shutdown times; the table name and its columns are not confirmed against "
                   "the model's documentation",
    ),
)

SOURCE_BY_NAME = {s.name: s for s in SOURCES}


def table_names() -> tuple[str, ...]:
    """Every Activity Record table name (``Process_Live``, ``Process_Hourly``, ...)."""
    return tuple(s.table(g) for s in SOURCES for g in GRANULARITIES)


def lookup_table(name: str) -> tuple[Source, str] | None:
    """The source and granularity of a table name, case-insensitively; None if not one."""
    low = name.lower()
    for s in SOURCES:
        for g in GRANULARITIES:
            if s.table(g).lower() == low:
                return s, g
    return None


def ddl() -> list[str]:
    """CREATE statements for every table and index (idempotent)."""
    out = []
    for s in SOURCES:
        for g in GRANULARITIES:
            t = s.table(g)
            cols = ", ".join(f'"{c.name}" {c.sql_type}' for c in s.columns(g))
            out.append(f'CREATE TABLE IF NOT EXISTS "{t}" ({cols})')
            out.append(f'CREATE INDEX IF NOT EXISTS "{t}_Ts" ON "{t}" ("TS")')
            if g == "Live":
                for idx in s.indexes:
                    cols_i = ", ".join(f'"{c}"' for c in idx)
                    out.append(f'CREATE INDEX IF NOT EXISTS "{t}_{"_".join(idx)}" ON "{t}" ({cols_i})')
    return out


def missing_columns_sql(existing: dict[str, list[str]]) -> list[str]:
    """ALTER statements that bring a store made by an earlier version to the declarations
    (``existing``: table name -> its column names): a column declared since is added (NULL in the
    older rows), one whose name's casing changed (``Ts`` -> ``TS``) is renamed, so ``SELECT *``
    answers the same names on every device."""
    out = []
    for s in SOURCES:
        for g in GRANULARITIES:
            t = s.table(g)
            if t not in existing:
                continue
            have = {n.lower(): n for n in existing[t]}
            for c in s.columns(g):
                actual = have.get(c.name.lower())
                if actual is None:
                    out.append(f'ALTER TABLE "{t}" ADD COLUMN "{c.name}" {c.sql_type}')
                elif actual != c.name:
                    out.append(f'ALTER TABLE "{t}" RENAME COLUMN "{actual}" TO "{c.name}"')
    return out


def aggregate_sql(source: Source, granularity: str) -> str:
    """INSERT ... SELECT that aggregates the rows of the finer table with ``? <= Ts < ?``."""
    finer = FINER[granularity]
    period = PERIOD_SQL[granularity].format(ts='"TS"')
    keys = [f'"{k}"' for k in source.keys]
    exprs = [m.first if finer == "Live" else m.rollup for m in source.measures]
    target_cols = ", ".join(['"TS"'] + keys + [f'"{m.column.name}"' for m in source.measures])
    select = ", ".join([period] + keys + exprs)
    group = ", ".join([period] + keys)
    return (f'INSERT INTO "{source.table(granularity)}" ({target_cols}) SELECT {select} '
            f'FROM "{source.table(finer)}" WHERE "TS" >= ? AND "TS" < ? GROUP BY {group}')


def period_start(granularity: str, ts: int) -> int:
    """Start of the hour, day or month (UTC) holding ``ts``."""
    import datetime as dt

    if granularity == "Hourly":
        return ts // 3600 * 3600
    if granularity == "Daily":
        return ts // 86400 * 86400
    d = dt.datetime.fromtimestamp(ts, dt.timezone.utc)
    return int(dt.datetime(d.year, d.month, 1, tzinfo=dt.timezone.utc).timestamp())
