"""Log lines: event name plus context, JSON or console, never a secret."""

import json
import logging

from workers.logs import configure_logging, get_logger
from workers.settings import Settings


def capture(capsys, log_format):
    settings = Settings.from_env(
        {},
        HUBSPOT_CLIENT_SECRET="client-secret-value",
        HUBSPOT_ACCESS_TOKEN="pat-na1-token-value",
        ASSOCIATOR_LOG_FORMAT=log_format,
    )
    configure_logging(settings, process="test")
    log = get_logger("tests.logs", portal=1)
    log.info("webhook_received", kept=2, note="pat-na1-token-value leaked")
    try:
        raise ValueError("client-secret-value in an error")
    except ValueError:
        log.exception("webhook_failed")
    logging.getLogger().handlers.clear()
    return capsys.readouterr().err


def test_json_lines_carry_event_and_context(capsys):
    first, *_ = capture(capsys, "json").splitlines()
    line = json.loads(first)
    assert line["event"] == "webhook_received"
    assert line["portal"] == 1
    assert line["kept"] == 2
    assert line["process"] == "test"


def test_console_lines_read_as_key_value_pairs(capsys):
    first = capture(capsys, "console").splitlines()[0]
    assert "webhook_received portal=1 kept=2" in first


def test_no_secret_reaches_a_line_even_inside_an_exception(capsys):
    for log_format in ("json", "console"):
        output = capture(capsys, log_format)
        assert "client-secret-value" not in output
        assert "pat-na1-token-value" not in output
        assert "[redacted]" in output
