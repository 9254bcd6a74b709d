"""The integration tests' own broker: its port comes from TEST_KAFKA_PORT, so two test sessions
on one machine each start their own, without sharing a port or a file."""

from __future__ import annotations

import re
import socket

import pytest

from tests.conftest import KAFKA_SH, broker_env, broker_port, ports_in_use


def test_the_port_is_19092_unless_test_kafka_port_says_otherwise() -> None:
    assert broker_port({}) == 19092
    assert broker_port({"TEST_KAFKA_PORT": ""}) == 19092
    assert broker_port({"TEST_KAFKA_PORT": "29092"}) == 29092


@pytest.mark.parametrize("raw", ["abc", "0", "80", "65535", "29092.5"])
def test_a_bad_port_is_refused_naming_the_variable(raw: str) -> None:
    with pytest.raises(ValueError, match="TEST_KAFKA_PORT"):
        broker_port({"TEST_KAFKA_PORT": raw})


def test_the_controller_takes_the_next_port_whatever_the_environment_says() -> None:
    env = broker_env(29092, {"KAFKA_CONTROLLER_PORT": "19093", "PATH": "/bin"})
    assert env == {"KAFKA_PORT": "29092", "KAFKA_CONTROLLER_PORT": "29093", "PATH": "/bin"}


def test_kafka_sh_names_every_file_of_a_broker_by_its_port() -> None:
    """So brokers on two ports in one KAFKA_HOME share no data, properties, log or pid file."""
    script = KAFKA_SH.read_text()
    for name in ("data", "pidfile", "logfile"):
        assert re.search(rf"^{name}=\$home/\S*\$port", script, re.M), name
    assert re.search(r"props=\$home/server-\$port\.properties", script)
    assert "cport=${KAFKA_CONTROLLER_PORT:-$((port + 1))}" in script


def test_a_listening_port_is_found_in_use() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        taken = listener.getsockname()[1]
        assert ports_in_use(taken) == [taken]
    assert ports_in_use(taken) == []
