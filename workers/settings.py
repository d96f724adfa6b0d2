"""Every setting of the service, read once from the environment.

``HUBSPOT_*`` names credentials and HubSpot endpoints, ``ASSOCIATOR_*`` every
behaviour of this service. Each field of :class:`Settings` names its variable, its
type and its default; the README table lists the same variables, and a test keeps
the two in step.
"""

import dataclasses
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_DATA_DIR = Path(".associator")
# The path families workers.hubspot.ApiPaths knows.
HUBSPOT_API_VERSIONS = ("2026-03", "v4")


class ConfigError(Exception):
    """A setting is missing or malformed; the message says which and why."""


def _var(env, default, doc, *, secret=False):
    return field(default=default, metadata={"env": env, "doc": doc, "secret": secret})


def _default_log_format():
    return "console" if sys.stderr.isatty() else "json"


@dataclass(frozen=True)
class Settings:
    hubspot_client_secret: str | None = _var(
        "HUBSPOT_CLIENT_SECRET",
        None,
        "The app's client secret: the key HubSpot signs webhooks with. Required by "
        "the web process; `associator run` generates a local one when unset.",
        secret=True,
    )
    hubspot_access_token: str | None = _var(
        "HUBSPOT_ACCESS_TOKEN",
        None,
        "Private-app access token, used by the worker. Required by the worker "
        "process; under `associator run` events are skipped with `no_credentials` "
        "when unset.",
        secret=True,
    )
    hubspot_api_base_url: str = _var(
        "HUBSPOT_API_BASE_URL",
        "https://api.hubapi.com",
        "Where the worker sends HubSpot API calls; tests point it at a fake.",
    )
    hubspot_api_version: str = _var(
        "HUBSPOT_API_VERSION",
        "2026-03",
        "Which HubSpot paths the worker calls: `2026-03` (dated) or `v4` "
        "(numbered: `/crm/v4` associations, `/crm/v3` objects).",
    )
    http_timeout_seconds: float = _var(
        "ASSOCIATOR_HTTP_TIMEOUT_SECONDS",
        10.0,
        "Connect and read timeout of each HubSpot API call.",
    )
    redis_url: str | None = _var(
        "REDIS_URL",
        None,
        "Celery broker and state store (Redis 6.2 or newer, `noeviction`). "
        "Required by both processes; `associator run` starts an embedded Redis "
        "when unset.",
    )
    port: int = _var("PORT", 8000, "Port of the web process.")
    public_url: str | None = _var(
        "ASSOCIATOR_PUBLIC_URL",
        None,
        "The exact public URL HubSpot calls, for signature checks behind a proxy. "
        "When it has no query string, the request's own is appended.",
    )
    require_v3: bool = _var(
        "ASSOCIATOR_REQUIRE_V3",
        False,
        "`true` refuses deliveries signed only with v1 or v2.",
    )
    log_format: str = _var(
        "ASSOCIATOR_LOG_FORMAT",
        None,
        "`json` (default when stderr is not a terminal) or `console`.",
    )
    log_level: str = _var("ASSOCIATOR_LOG_LEVEL", "INFO", "Lowest level logged.")
    data_dir: Path = _var(  # noqa: RUF009 - _var returns a dataclasses.field
        "ASSOCIATOR_DATA_DIR",
        DEFAULT_DATA_DIR,
        "Where `associator run` keeps its Redis data and local client secret.",
    )
    local: bool = _var(
        "ASSOCIATOR_LOCAL",
        False,
        "Set by `associator run` for its children: the worker may start without "
        "`HUBSPOT_ACCESS_TOKEN`. Never set it in production.",
    )
    max_body_bytes: int = _var(
        "ASSOCIATOR_MAX_BODY_BYTES",
        1024 * 1024,
        "Largest webhook body accepted; larger ones get 413.",
    )
    signature_max_age_seconds: float = _var(
        "ASSOCIATOR_SIGNATURE_MAX_AGE_SECONDS",
        300.0,
        "How far a v3 `X-HubSpot-Request-Timestamp` may be from now, either way.",
    )
    redis_timeout_seconds: float = _var(
        "ASSOCIATOR_REDIS_TIMEOUT_SECONDS",
        1.0,
        "Connect and read timeout of the web process's Redis and broker "
        "connections (at most 1).",
    )
    worker_redis_timeout_seconds: float = _var(
        "ASSOCIATOR_WORKER_REDIS_TIMEOUT_SECONDS",
        10.0,
        "Connect and read timeout of the worker's and the commands' Redis "
        "connections; they may wait longer than the web process.",
    )
    redis_budget_seconds: float = _var(
        "ASSOCIATOR_REDIS_BUDGET_SECONDS",
        2.0,
        "Time all Redis work of one delivery may take before the answer is 503.",
    )
    dedup_pending_seconds: int = _var(
        "ASSOCIATOR_DEDUP_PENDING_SECONDS",
        30,
        "How long a delivery's claim on an event holds while it is being queued.",
    )
    dedup_ttl_seconds: int = _var(
        "ASSOCIATOR_DEDUP_TTL_SECONDS",
        72 * 3600,
        "How long a queued event is remembered as a duplicate.",
    )
    worker_concurrency: int = _var(
        "ASSOCIATOR_WORKER_CONCURRENCY",
        2,
        "Celery pool processes of the worker.",
    )
    visibility_timeout_seconds: int = _var(
        "ASSOCIATOR_VISIBILITY_TIMEOUT",
        300,
        "Seconds before the broker hands an unacknowledged task to another worker.",
    )
    task_time_limit_seconds: int = _var(
        "ASSOCIATOR_TASK_TIME_LIMIT",
        240,
        "Hard time limit of one task; below the visibility timeout.",
    )
    shutdown_timeout_seconds: float = _var(
        "ASSOCIATOR_SHUTDOWN_TIMEOUT_SECONDS",
        15.0,
        "How long `associator run` waits for a child to stop before killing it.",
    )
    startup_timeout_seconds: float = _var(
        "ASSOCIATOR_STARTUP_TIMEOUT_SECONDS",
        20.0,
        "How long `associator run` waits for the embedded Redis to answer.",
    )
    rules_path: str | None = _var(
        "ASSOCIATOR_RULES",
        None,
        "Path of the rules file (TOML); the built-in defaults apply when unset.",
    )
    dry_run: bool = _var(
        "ASSOCIATOR_DRY_RUN",
        False,
        "`true` plans and records everything and writes nothing.",
    )
    settle_seconds: float = _var(
        "ASSOCIATOR_SETTLE_SECONDS",
        10.0,
        "How old (from `occurredAt`) an event must be before it is planned, "
        "because HubSpot's search lags writes.",
    )
    recheck_seconds: float = _var(
        "ASSOCIATOR_RECHECK_SECONDS",
        300.0,
        "When a match search found no candidate, the event is planned once more "
        "after this long.",
    )
    write_claim_seconds: int = _var(
        "ASSOCIATOR_WRITE_CLAIM_SECONDS",
        600,
        "How long a planned write holds its claim on an association, so that two "
        "plans never write it twice.",
    )
    label_cache_seconds: int = _var(
        "ASSOCIATOR_LABEL_CACHE_SECONDS",
        24 * 3600,
        "How long association label definitions are cached in Redis.",
    )
    mover_interval_seconds: float = _var(
        "ASSOCIATOR_MOVER_INTERVAL_SECONDS",
        1.0,
        "How often each worker moves due delayed work onto the queue.",
    )
    delay_lease_seconds: float = _var(
        "ASSOCIATOR_DELAY_LEASE_SECONDS",
        60.0,
        "How long a taken delay-set entry is hidden from other movers before it "
        "comes due again (if its mover died before queueing it).",
    )
    max_calls_per_task: int = _var(
        "ASSOCIATOR_MAX_CALLS_PER_TASK",
        20,
        "Most HubSpot calls one task makes; beyond it the rest is retried later. "
        "Times the HTTP timeout it must stay below the task time limit.",
    )
    max_attempts: int = _var(
        "ASSOCIATOR_MAX_ATTEMPTS",
        10,
        "Transient failures an event may meet before it is dead-lettered.",
    )
    retry_base_seconds: float = _var(
        "ASSOCIATOR_RETRY_BASE_SECONDS",
        2.0,
        "Base of the exponential retry backoff (full jitter).",
    )
    retry_max_seconds: float = _var(
        "ASSOCIATOR_RETRY_MAX_SECONDS",
        3600.0,
        "Longest single retry delay.",
    )
    rate_limit_per_10s: int = _var(
        "ASSOCIATOR_RATE_LIMIT_PER_10S",
        100,
        "HubSpot calls per portal per ten seconds assumed before HubSpot's first "
        "answer; from then on its `X-HubSpot-RateLimit-*` headers say.",
    )
    search_limit_per_second: int = _var(
        "ASSOCIATOR_SEARCH_LIMIT_PER_SECOND",
        5,
        "HubSpot's search calls per portal per second (search has a limit of its "
        "own and sends no rate-limit headers).",
    )
    rate_limit_share: float = _var(
        "ASSOCIATOR_RATE_LIMIT_SHARE",
        0.9,
        "Share of each HubSpot budget (ten-second, search, daily) the service "
        "spends; the rest is left to the portal's other integrations.",
    )
    rate_limit_max_wait_seconds: float = _var(
        "ASSOCIATOR_RATE_LIMIT_MAX_WAIT_SECONDS",
        1.0,
        "Longest a worker waits for room in a budget before it defers the work "
        "through the delay set. Added to the HTTP timeout, times "
        "`ASSOCIATOR_MAX_CALLS_PER_TASK`, it must stay below the task time limit.",
    )
    daily_defer_seconds: float = _var(
        "ASSOCIATOR_DAILY_DEFER_SECONDS",
        3600.0,
        "How long a portal's work waits after a DAILY 429 when HubSpot's usage "
        "report gives no reset time; then one call probes whether it cleared.",
    )
    daily_probe_wait_seconds: float = _var(
        "ASSOCIATOR_DAILY_PROBE_WAIT_SECONDS",
        5.0,
        "After a daily limit's reset, while one worker probes whether it cleared, "
        "how soon the others ask again.",
    )
    claim_wait_seconds: float = _var(
        "ASSOCIATOR_CLAIM_WAIT_SECONDS",
        2.0,
        "How long a plan waits for another plan's write of the same association "
        "to end before reading the pair again later. Added once to the task's "
        "calls, it must stay below the task time limit.",
    )
    unacked_restore_seconds: int = _var(
        "ASSOCIATOR_UNACKED_RESTORE_SECONDS",
        10,
        "How often each worker looks for task messages whose worker was lost "
        "(unacknowledged past the visibility timeout) and puts them back.",
    )
    max_deliveries: int = _var(
        "ASSOCIATOR_MAX_DELIVERIES",
        3,
        "Times one task message may be handed to a worker; a message whose "
        "worker died that often is dead-lettered as `worker_lost`.",
    )

    def __post_init__(self):
        if self.log_format is None:
            object.__setattr__(self, "log_format", _default_log_format())
        if self.log_format not in ("json", "console"):
            raise ConfigError("ASSOCIATOR_LOG_FORMAT must be `json` or `console`.")
        if self.hubspot_api_version not in HUBSPOT_API_VERSIONS:
            raise ConfigError("HUBSPOT_API_VERSION must be `2026-03` or `v4`.")
        if self.http_timeout_seconds <= 0:
            raise ConfigError("ASSOCIATOR_HTTP_TIMEOUT_SECONDS must be above 0.")
        if not 0 < self.redis_timeout_seconds <= 1:
            raise ConfigError(
                "ASSOCIATOR_REDIS_TIMEOUT_SECONDS must be above 0 and at most 1."
            )
        if (
            self.http_timeout_seconds + self.rate_limit_max_wait_seconds
        ) * self.max_calls_per_task + self.claim_wait_seconds >= (
            self.task_time_limit_seconds
        ):
            raise ConfigError(
                "ASSOCIATOR_HTTP_TIMEOUT_SECONDS plus "
                "ASSOCIATOR_RATE_LIMIT_MAX_WAIT_SECONDS, times "
                "ASSOCIATOR_MAX_CALLS_PER_TASK, plus ASSOCIATOR_CLAIM_WAIT_SECONDS, "
                "must stay below "
                "ASSOCIATOR_TASK_TIME_LIMIT, or a task could be killed in the "
                "middle of its calls."
            )
        if not 0 < self.rate_limit_share <= 1:
            raise ConfigError("ASSOCIATOR_RATE_LIMIT_SHARE must be above 0, at most 1.")
        if self.task_time_limit_seconds >= self.visibility_timeout_seconds:
            raise ConfigError(
                "ASSOCIATOR_TASK_TIME_LIMIT must be below "
                "ASSOCIATOR_VISIBILITY_TIMEOUT, or a slow task would be handed to "
                "a second worker."
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides):
        """Read every variable from ``environ`` (default ``os.environ``).

        ``overrides`` are keyed by environment variable name and win over the
        environment; tests use them.
        """
        environ = dict(os.environ if environ is None else environ)
        environ.update({k: v for k, v in overrides.items() if v is not None})
        values = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(f.metadata["env"])
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(f, raw)
        return cls(**values)

    def require(self, *names: str, role: str) -> None:
        """Fail with one clear message naming every missing variable."""
        by_env = {f.metadata["env"]: f.name for f in dataclasses.fields(self)}
        missing = [n for n in names if getattr(self, by_env[n]) in (None, "")]
        if missing:
            raise ConfigError(
                f"The {role} process cannot start: {', '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not set. "
                f"In production set {'it' if len(missing) == 1 else 'them'} in the "
                "platform's config; for a local "
                "service with an embedded Redis use `associator run`."
            )

    @property
    def secrets(self) -> tuple[str, ...]:
        """Values that must never appear in a log line, error or dead letter."""
        return tuple(
            getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.metadata["secret"] and getattr(self, f.name)
        )


def variables():
    """(name, default, doc) of every variable, in declaration order."""
    for f in dataclasses.fields(Settings):
        yield f.metadata["env"], f.default, f.metadata["doc"]


def markdown_table() -> str:
    """The README's settings table, generated so it cannot drift."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, default, doc in variables():
        if name == "ASSOCIATOR_LOG_FORMAT":
            shown = "`json` off a terminal"
        elif default is None:
            shown = "—"
        elif isinstance(default, bool):
            shown = f"`{str(default).lower()}`"
        else:
            shown = f"`{default}`"
        rows.append(f"| `{name}` | {shown} | {doc} |")
    return "\n".join(rows) + "\n"


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parse(f, raw: str):
    name = f.metadata["env"]
    kind = f.type
    try:
        if kind is bool:
            lowered = raw.strip().lower()
            if lowered not in _TRUE | _FALSE:
                raise ValueError
            return lowered in _TRUE
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        if kind is Path:
            return Path(raw)
        return raw
    except ValueError:
        expected = {bool: "true or false", int: "an integer", float: "a number"}
        raise ConfigError(f"{name} must be {expected[kind]}.") from None
