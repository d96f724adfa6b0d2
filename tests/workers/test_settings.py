"""Settings: read once, checked at start-up, every variable in the README."""

import re
from pathlib import Path

import pytest

from workers.settings import ConfigError, Settings, markdown_table, variables

README = Path(__file__).resolve().parents[2] / "README.md"


def test_defaults_need_no_environment():
    settings = Settings.from_env({})
    assert settings.require_v3 is False
    assert settings.max_body_bytes == 1024 * 1024
    assert settings.redis_budget_seconds == 2.0
    assert settings.redis_timeout_seconds <= 1


def test_overrides_win_over_the_environment():
    settings = Settings.from_env({"PORT": "1"}, PORT="2", ASSOCIATOR_REQUIRE_V3="yes")
    assert settings.port == 2
    assert settings.require_v3 is True


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("PORT", "eighty", "PORT must be an integer"),
        ("ASSOCIATOR_REQUIRE_V3", "maybe", "true or false"),
        ("ASSOCIATOR_LOG_FORMAT", "xml", "json"),
        ("ASSOCIATOR_REDIS_TIMEOUT_SECONDS", "3", "at most 1"),
        ("ASSOCIATOR_TASK_TIME_LIMIT", "400", "below ASSOCIATOR_VISIBILITY_TIMEOUT"),
    ],
)
def test_a_malformed_value_is_refused_with_its_name(name, value, message):
    with pytest.raises(ConfigError, match=message):
        Settings.from_env({name: value})


def test_require_names_every_missing_variable_at_once():
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({}).require("REDIS_URL", "HUBSPOT_CLIENT_SECRET", role="web")
    assert "REDIS_URL, HUBSPOT_CLIENT_SECRET are not set" in str(caught.value)


def test_secrets_are_the_credential_values():
    settings = Settings.from_env(
        {"HUBSPOT_CLIENT_SECRET": "s3cret", "HUBSPOT_ACCESS_TOKEN": "pat-na1-x"}
    )
    assert set(settings.secrets) == {"s3cret", "pat-na1-x"}


def test_names_follow_the_convention():
    for name, _, _ in variables():
        assert name.startswith(("HUBSPOT_", "ASSOCIATOR_")) or name in {
            "REDIS_URL",
            "PORT",
        }


def test_the_readme_table_lists_every_variable_and_no_other():
    table = re.findall(r"^\| `([A-Z_0-9]+)` \|", README.read_text(), re.MULTILINE)
    assert sorted(table) == sorted(name for name, _, _ in variables())


def test_the_readme_table_is_the_generated_one():
    assert markdown_table() in README.read_text(), (
        "regenerate the README table with `associator settings`"
    )
