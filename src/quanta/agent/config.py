"""The agent directory and its ``agent.conf`` (``Key=Value`` lines, as the model's client uses)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

CONF = "agent.conf"


@dataclass(frozen=True)
class AgentSetting:
    key: str
    default: str | None  # None: required
    meaning: str


AGENT_SETTINGS = (
    AgentSetting("DeviceName", None, "the device's name: its certificate's common name, which the Switch checks "
                 "against the hello"),
    AgentSetting("Switch", None, "host:port of the Switches to connect to, comma-separated (tried in turn); "
                 "the port is SwitchConfiguration.Port"),
    AgentSetting("BackgroundChannelUrl", "", "https://server:port/Background, where instruction resources are "
                 "fetched; empty: instructions that need one fail with a clear error"),
    AgentSetting("ConnectionRetryTimeInSecondsMin", "1", "seconds of the first wait before reconnecting"),
    AgentSetting("ConnectionRetryTimeInSecondsMax", "60", "seconds: the longest wait between reconnects "
                 "(exponential back-off with jitter between Min and Max; 0 < Min <= Max)"),
    AgentSetting("Module.Interaction.Port", "7766", "loopback TCP port of the end-user interaction listener"),
)
"""Every agent.conf setting outside ``Module.Inventory.*`` (those: quanta.agent.inventory.settings), with
its default; docs/configuration.md is generated from it (python -m quanta.configdoc)."""


class AgentConfigError(ValueError):
    pass


def interaction_name(device: str) -> str:
    """The name on the interaction port's certificate: not a host anyone else would dial."""
    return f"quanta-interaction.{device}"


@dataclass(frozen=True)
class SwitchAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def parse_switches(value: str) -> list[SwitchAddress]:
    """``Switch=host:port[,host:port...]``; the port defaults to 4000."""
    out = []
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        host, sep, port = part.rpartition(":")
        if not sep:
            host, port = part, "4000"
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise AgentConfigError(f"Switch entry {part!r} is not host:port")
        out.append(SwitchAddress(host.strip("[]"), int(port)))
    if not out:
        raise AgentConfigError("Switch= names no Switch")
    return out


@dataclass(frozen=True)
class AgentConfig:
    root: Path
    device_name: str
    switches: list[SwitchAddress]
    background_url: str
    retry_min: float
    retry_max: float
    interaction_port: int

    ca = property(lambda self: self.root / "ca.crt")
    cert = property(lambda self: self.root / "device.crt")
    key = property(lambda self: self.root / "device.key")
    signing_pub = property(lambda self: self.root / "signing.pub")
    # TLS certificate of the local interaction port; its only name is interaction_name(device)
    interaction_cert = property(lambda self: self.root / "interaction.crt")
    interaction_key = property(lambda self: self.root / "interaction.key")
    state = property(lambda self: self.root / "state")
    conf_path = property(lambda self: self.root / CONF)
    log_path = property(lambda self: self.root / "agent.log")


def read_conf(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise AgentConfigError(f"{path}:{n}: expected Key=Value, got {line!r}")
        values[key.strip()] = value.strip()
    return values


def load_agent_config(root: Path) -> AgentConfig:
    root = Path(root)
    if not (root / CONF).exists():
        raise AgentConfigError(f"{root / CONF} not found: create it with 'quanta enroll'")
    v = read_conf(root / CONF)
    try:
        cfg = AgentConfig(
            root=root,
            device_name=v["DeviceName"],
            switches=parse_switches(v["Switch"]),
            background_url=v.get("BackgroundChannelUrl", ""),
            retry_min=_seconds(v, "ConnectionRetryTimeInSecondsMin", "1"),
            retry_max=_seconds(v, "ConnectionRetryTimeInSecondsMax", "60"),
            interaction_port=int(v.get("Module.Interaction.Port", "7766")),
        )
    except KeyError as e:
        raise AgentConfigError(f"{root / CONF}: missing setting {e.args[0]}") from None
    except ValueError as e:
        raise AgentConfigError(f"{root / CONF}: {e}") from None
    check_retry(cfg.retry_min, cfg.retry_max, root / CONF)
    return cfg


def _seconds(values: dict[str, str], key: str, default: str) -> float:
    try:
        return float(values.get(key, default))
    except ValueError:
        raise ValueError(f"{key}={values[key]!r} is not a number of seconds") from None


def check_retry(lo: float, hi: float, where: Path) -> None:
    """The back-off bounds must be finite seconds, 0 < Min <= Max: a Min of 0 would dial again at
    once after every failure, and a fleet would hammer its Switch."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo <= 0 or hi < lo:
        raise AgentConfigError(f"{where}: ConnectionRetryTimeInSecondsMin={lo:g} and "
                               f"ConnectionRetryTimeInSecondsMax={hi:g} must be seconds with 0 < Min <= Max")


def write_conf(root: Path, *, device_name: str, switches: str, background_url: str, retry_min: float = 1,
               retry_max: float = 60, interaction_port: int = 7766) -> None:
    """Write the agent's settings, and make the agent directory private (0700, its keys and
    everything else in it 0600): it holds the device's keys and, later, its journal of answers."""
    from quanta.datadir import make_private_dir, tighten

    make_private_dir(root)
    (root / CONF).write_text(
        "# Quanta agent settings\n"
        f"DeviceName={device_name}\n"
        f"Switch={switches}\n"
        f"BackgroundChannelUrl={background_url}\n"
        f"ConnectionRetryTimeInSecondsMin={retry_min}\n"
        f"ConnectionRetryTimeInSecondsMax={retry_max}\n"
        f"Module.Interaction.Port={interaction_port}\n"
    )
    tighten(root)
