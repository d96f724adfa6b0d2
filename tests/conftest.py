"""Fixtures: one embedded Redis per test module, and apps built on it."""

import pytest

from tests.support import SECRET
from webhook import create_app
from workers.embedded_redis import EmbeddedRedis
from workers.settings import Settings


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    """A real redis-server (the embedded one), shared by the tests of a module."""
    with EmbeddedRedis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def redis_url(redis_server):
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
def redis_client(redis_url):
    import redis

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


def app_config(redis_url, **overrides):
    config = {
        "REDIS_URL": redis_url,
        "HUBSPOT_CLIENT_SECRET": SECRET,
        "ASSOCIATOR_LOG_FORMAT": "json",
    }
    config.update(overrides)
    return config


@pytest.fixture
def make_app(redis_url):
    def make(**overrides):
        return create_app(app_config(redis_url, **overrides))

    return make


@pytest.fixture
def settings(redis_url):
    return Settings.from_env({}, **app_config(redis_url))
