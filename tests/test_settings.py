import socket

import pytest
from pydantic import ValidationError

from quanta.runtime import PortError, bind_socket
from quanta.settings import PORTS, Settings, dump_settings, poke_port


def test_defaults_follow_the_seed():
    s = Settings()
    assert s.port("https") == 443 and s.port("http") == 80 and s.port("switch") == 4000
    assert s.port("poke") == 4001 and s.port("core") == 3900 and s.port("hub") == 3901
    assert s.port("coordinator") == 8081 and s.port("integrate") == 6002 and s.port("interaction") == 7766
    assert s.port("smtp") == 25
    assert {p.name for p in PORTS} >= {"https", "http", "switch", "poke", "core", "hub", "coordinator",
                                        "integrate", "interaction", "smtp", "database"}


def test_poke_is_always_switch_plus_one():
    s = Settings(ports={"switch": 4100})
    assert s.port("poke") == 4101 == poke_port(4100)
    with pytest.raises(ValidationError, match="derived"):
        Settings(ports={"poke": 5000})


@pytest.mark.parametrize("ports,msg", [({"nosuch": 1}, "unknown port name"), ({"https": 0}, "out of range"),
                                       ({"https": 70000}, "out of range"), ({"https": "x"}, "valid integer")])
def test_bad_ports_are_refused(ports, msg):
    with pytest.raises(ValidationError, match=msg):
        Settings(ports=ports)


def test_settings_round_trip_through_toml(tmp_path):
    import tomllib

    s = Settings(server_name='odd "name"', ports={"https": 8443})
    assert Settings.model_validate(tomllib.loads(dump_settings(s))) == s


def test_taken_port_names_the_setting():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PortError) as e:
            bind_socket("127.0.0.1", port, "switch")
    assert f"port {port}" in str(e.value) and "already in use" in str(e.value)
    assert "--switch-port" in str(e.value) and "SwitchConfiguration" in str(e.value)


def test_privileged_port_names_the_setting(monkeypatch):
    import os

    if os.getuid() == 0:
        # root may bind anything; emulate the kernel's refusal for the message test
        import errno

        real = socket.socket.bind

        def deny(self, addr):
            if addr[1] < 1024:
                raise OSError(errno.EACCES, "Permission denied")
            return real(self, addr)

        monkeypatch.setattr(socket.socket, "bind", deny)
    with pytest.raises(PortError) as e:
        bind_socket("127.0.0.1", 443, "https")
    assert "privileged" in str(e.value) and "--https-port" in str(e.value)
