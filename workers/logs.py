"""Structured logs: a stable snake_case event name with key-value context.

``get_logger(__name__).info("webhook_received", events=3, kept=2)`` prints one line,
JSON in production (``{"event": "webhook_received", "events": 3, ...}``) or
``webhook_received events=3 kept=2`` on a terminal. Every line passes through
:class:`Redactor`, so a configured secret never reaches the output even when it
sneaks into an exception message.
"""

import json
import logging
import sys
import time
from collections.abc import Iterable

REDACTED = "[redacted]"


class Redactor:
    """Replaces every known secret value in a text."""

    def __init__(self, secrets: Iterable[str] = ()):
        # Longest first, so a secret containing another is replaced whole.
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        return text


class EventLogger:
    """A thin wrapper giving stdlib logging keyword context."""

    def __init__(self, name: str, **bound):
        self._logger = logging.getLogger(name)
        self._bound = bound

    def bind(self, **fields) -> "EventLogger":
        return EventLogger(self._logger.name, **{**self._bound, **fields})

    def _log(self, level: int, event: str, exc_info=None, **fields):
        if self._logger.isEnabledFor(level):
            self._logger.log(
                level,
                event,
                exc_info=exc_info,
                extra={"fields": {**self._bound, **fields}},
                stacklevel=3,
            )

    def debug(self, event: str, **fields):
        self._log(logging.DEBUG, event, **fields)

    def info(self, event: str, **fields):
        self._log(logging.INFO, event, **fields)

    def warning(self, event: str, **fields):
        self._log(logging.WARNING, event, **fields)

    def error(self, event: str, **fields):
        self._log(logging.ERROR, event, **fields)

    def exception(self, event: str, **fields):
        self._log(logging.ERROR, event, exc_info=True, **fields)


def get_logger(name: str, **bound) -> EventLogger:
    return EventLogger(name, **bound)


class _Formatter(logging.Formatter):
    def __init__(self, process: str, redact: Redactor, as_json: bool):
        super().__init__()
        self.process = process
        self.redact = redact
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", {})
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        stamp += f".{int(record.msecs):03d}Z"
        message = record.getMessage()
        error = self.formatException(record.exc_info) if record.exc_info else None

        if self.as_json:
            line = {
                "ts": stamp,
                "level": record.levelname.lower(),
                "process": self.process,
                "logger": record.name,
                "event": message,
                **fields,
            }
            if error:
                line["exception"] = error
            text = json.dumps(line, default=str, ensure_ascii=False)
        else:
            pairs = " ".join(f"{k}={_console_value(v)}" for k, v in fields.items())
            text = f"{stamp} {record.levelname:<7} {self.process:<6} {message}"
            text += f" {pairs}" if pairs else ""
            if error:
                text += "\n" + error
        return self.redact(text)


def _console_value(value) -> str:
    if isinstance(value, str):
        return value if value and " " not in value else json.dumps(value)
    if isinstance(value, list | tuple | dict):
        return json.dumps(value, default=str, separators=(",", ":"))
    return str(value)


def configure_logging(settings, *, process: str) -> None:
    """Send every log line of this process through one redacting formatter."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        _Formatter(process, Redactor(settings.secrets), settings.log_format == "json")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
