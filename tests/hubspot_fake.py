"""An HTTP fake of HubSpot's CRM API, for tests whose worker runs in another process.

:class:`FakeHubSpot` serves the calls the associator makes, over real HTTP on a
loopback port, and behaves as HUBSPOT.md says HubSpot does:

- a bearer token on every call (401 otherwise);
- numbered paths (``/crm/v3/objects``, ``/crm/v4/...``, ``/account-info/v3``) and
  dated ones (``2026-03``); object types as names (``contacts``, ``contact``) or
  type ids (``0-1``, ``2-123``);
- batch answers of 207 with one error per refused input; a batch read of
  associations reports an id without any as ``NO_ASSOCIATIONS_FOUND``;
- a labeled write replaces the labels a pair has (the unlabeled type stays), a
  Primary association brings the unlabeled one, and a record has at most one
  primary company;
- a search index that lags writes by ``search_lag_seconds``, and a search limit
  of ``search_limit_per_second``;
- with ``rate_limit_per_10s`` set, a rolling ten-second window answering 429
  ``TEN_SECONDLY_ROLLING`` beyond it; the ``X-HubSpot-RateLimit-*`` headers are
  on every answer but a search's;
- a daily budget that, once spent, answers 429 ``DAILY`` until the reset time its
  usage report gives;
- the faults of a network and of a busy HubSpot, injected by a test: error
  answers once or until cleared, a share of 429s, calls that hang or lose their
  connection with or without the write applied, and a per-record limit of
  associations.

Tests set state up and inspect it through the methods of :class:`FakeHubSpot`,
never through HTTP. Every request is kept in :attr:`FakeHubSpot.calls` and, with
``log_path``, written as one JSON line that the contract test checks against
HubSpot's published OpenAPI documents. Creating, updating and archiving records
and removing associations are not served: the associator never does them.
"""

import contextlib
import json
import random
import re
import socket
import struct
import threading
import time
import uuid
import zlib
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

from werkzeug.datastructures import MultiDict
from werkzeug.serving import WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

DATED_VERSION = "2026-03"
TEST_TOKEN = "pat-na1-test-token"
TEST_PORTAL_ID = 62515

# A private app on a Professional account (HUBSPOT.md section 5). The window is
# enforced only when a test sets rate_limit_per_10s; the headers are always sent.
DEFAULT_RATE_LIMIT_PER_10S = 190
DAILY_LIMIT = 625_000
RATE_LIMIT_INTERVAL_MS = 10_000
SEARCH_LIMIT_PER_SECOND = 5
# How often the server looks for stop(); the default half second slows every test.
SHUTDOWN_POLL_SECONDS = 0.02

OBJECTS_PER_BATCH_READ = 100
IDS_PER_ASSOCIATION_READ = 1_000
# Undocumented at HubSpot; one connector reports 2,000. Tests may lower it.
INPUTS_PER_ASSOCIATION_WRITE = 2_000
ASSOCIATIONS_PER_PAGE = 500
SEARCH_MAX_GROUPS = 5
SEARCH_MAX_FILTERS_PER_GROUP = 6
SEARCH_MAX_FILTERS = 18
SEARCH_MAX_LIMIT = 200
SEARCH_DEFAULT_LIMIT = 10
SEARCH_MAX_RESULTS = 10_000

# type id -> (singular, plural)
STANDARD_OBJECTS = {
    "0-1": ("contact", "contacts"),
    "0-2": ("company", "companies"),
    "0-3": ("deal", "deals"),
    "0-5": ("ticket", "tickets"),
    "0-7": ("product", "products"),
    "0-8": ("line_item", "line_items"),
    "0-14": ("quote", "quotes"),
}
TYPE_IDS_BY_NAME = {
    name: type_id for type_id, names in STANDARD_OBJECTS.items() for name in names
}
CUSTOM_TYPE_ID = re.compile(r"2-\d+")
CONTACT, COMPANY, PRODUCT = "0-1", "0-2", "0-7"

# Record ids start above these, so that an id names its type in a failing test.
ID_BASES = {
    "0-1": 1_000_000,
    "0-2": 2_000_000,
    "0-3": 3_000_000,
    "0-5": 5_000_000,
    "0-7": 7_000_000,
    "0-8": 8_000_000,
    "0-14": 14_000_000,
}
CUSTOM_ID_BASE = 50_000_000
CUSTOM_ID_RANGE = 1_000_000

HUBSPOT_DEFINED = "HUBSPOT_DEFINED"
USER_DEFINED = "USER_DEFINED"
CATEGORIES = frozenset({HUBSPOT_DEFINED, USER_DEFINED, "INTEGRATOR_DEFINED", "WORK"})

# HUBSPOT.md's table: (A, B, type id A->B, type id B->A, label).
HUBSPOT_DEFINED_TYPES = (
    ("0-1", "0-2", 279, 280, None),
    ("0-1", "0-2", 1, 2, "Primary"),
    ("0-3", "0-1", 3, 4, None),
    ("0-3", "0-2", 341, 342, None),
    ("0-3", "0-2", 5, 6, "Primary"),
    ("0-3", "0-8", 19, 20, None),
    ("0-5", "0-1", 16, 15, None),
    ("0-5", "0-2", 339, 340, None),
    ("0-5", "0-2", 26, 25, "Primary"),
    ("0-5", "0-3", 28, 27, None),
    ("0-3", "0-14", 63, 64, None),
    ("0-14", "0-8", 67, 68, None),
)
# The Primary type from the record's side, by the record's type.
PRIMARY_COMPANY_TYPES = {"0-1": 1, "0-3": 5, "0-5": 26}

SEARCH_OPERATORS = frozenset(
    {
        "EQ",
        "NEQ",
        "LT",
        "LTE",
        "GT",
        "GTE",
        "BETWEEN",
        "IN",
        "NOT_IN",
        "HAS_PROPERTY",
        "NOT_HAS_PROPERTY",
        "CONTAINS_TOKEN",
        "NOT_CONTAINS_TOKEN",
    }
)

TEN_SECONDLY_POLICY = "TEN_SECONDLY_ROLLING"
DAILY_POLICY = "DAILY"
# The faults that meet a request on its connection (FakeHubSpot.hang_next and
# disconnect_next), as Call entries name them.
HANG = "hang"
DISCONNECT = "disconnect"

# Category and message of the statuses a test injects with fail_next.
FAULTS = {
    400: ("VALIDATION_ERROR", "Injected validation error."),
    401: ("INVALID_AUTHENTICATION", "The access token is not valid."),
    403: ("MISSING_SCOPES", "This app hasn't been granted all required scopes."),
    404: ("OBJECT_NOT_FOUND", "resource not found"),
    423: ("LOCKED", "The record is locked; try again shortly."),
    477: ("MIGRATION_IN_PROGRESS", "The account is being migrated."),
}

# (method, path, kind); a kind's handler is FakeHubSpot._serve_<kind>.
ROUTE_TEMPLATES = (
    ("POST", "{objects}/{type}/batch/read", "objects_read"),
    ("POST", "{objects}/{type}/search", "search"),
    ("GET", "{objects}/{type}/{id}", "single_read"),
    ("POST", "{pair}/batch/read", "associations_read"),
    ("POST", "{pair}/batch/create", "associations_create"),
    ("POST", "{pair}/batch/associate/default", "associations_default"),
    ("GET", "{pair}/labels", "labels"),
    ("PUT", "{record}/default/{to_type}/{to_id}", "associations_put_default"),
    ("PUT", "{record}/{to_type}/{to_id}", "associations_put"),
    ("GET", "{record}/{to_type}", "associations_list"),
    ("GET", "{account}/details", "account"),
    ("GET", "{account}/api-usage/daily/private-apps", "api_usage"),
)
NUMBERED_PREFIXES = {
    "{objects}": "/crm/v3/objects",
    "{pair}": "/crm/v4/associations/{from_type}/{to_type}",
    "{record}": "/crm/v4/objects/{from_type}/{from_id}/associations",
    "{account}": "/account-info/v3",
}
DATED_PREFIXES = {
    "{objects}": f"/crm/objects/{DATED_VERSION}",
    "{pair}": f"/crm/associations/{DATED_VERSION}/{{from_type}}/{{to_type}}",
    "{record}": f"/crm/objects/{DATED_VERSION}/{{from_type}}/{{from_id}}/associations",
    "{account}": f"/account-info/{DATED_VERSION}",
}
# The labels path of HubSpot's published v4 schema document, beside the one above.
SCHEMA_LABELS_PATH = "/crm/associations/v4/{from_type}/{to_type}/labels"


class HubSpotError(Exception):
    """An answer in HubSpot's error shape, raised inside the fake."""

    def __init__(
        self,
        status: int,
        message: str,
        category: str = "VALIDATION_ERROR",
        *,
        context: dict[str, list[str]] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.body = error_body(message, category, context)


class RateLimitedError(HubSpotError):
    """A 429 in HubSpot's RATE_LIMIT shape: a policyName and no category."""

    def __init__(self, limit_name: str, policy: str):
        super().__init__(429, f"You have reached your {limit_name} limit.")
        self.body = {
            "status": "error",
            "message": f"You have reached your {limit_name} limit.",
            "errorType": "RATE_LIMIT",
            "correlationId": str(uuid.uuid4()),
            "policyName": policy,
            "groupName": "publicapi",
        }


def error_body(
    message: str, category: str, context: dict[str, list[str]] | None = None
) -> dict:
    """The body of a failed call: ``{"status": "error", "message", ...}``."""
    body = {
        "status": "error",
        "message": message,
        "correlationId": str(uuid.uuid4()),
        "category": category,
    }
    if context is not None:
        body["context"] = context
    return body


def input_error(
    category: str,
    message: str,
    context: dict[str, list[str]],
    sub_category: str | None = None,
) -> dict:
    """One entry of a batch answer's ``errors``."""
    entry = {
        "status": "error",
        "category": category,
        "message": message,
        "context": context,
        "errors": [],
        "links": {},
    }
    if sub_category is not None:
        entry["subCategory"] = sub_category
    return entry


def timestamp(moment: datetime) -> str:
    """HubSpot's form: ``2024-05-01T12:00:00.000Z``."""
    moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def object_type_id(name: str) -> str:
    """``contacts``, ``contact`` or ``0-1`` -> ``0-1``; ``2-123`` stays."""
    if name in STANDARD_OBJECTS or CUSTOM_TYPE_ID.fullmatch(name):
        return name
    try:
        return TYPE_IDS_BY_NAME[name.lower()]
    except KeyError:
        raise HubSpotError(400, f"Unable to infer object type from: {name}") from None


def object_label(type_id: str) -> str:
    """``0-1`` -> ``contact``; custom objects keep their type id."""
    return STANDARD_OBJECTS.get(type_id, (type_id,))[0]


@dataclass(frozen=True)
class AssociationType:
    """One association type from one object type to another."""

    category: str
    type_id: int
    label: str | None
    inverse_type_id: int


@dataclass
class Record:
    id: int
    properties: dict[str, str | None]
    created_at: str
    created_monotonic: float


@dataclass(frozen=True)
class Route:
    method: str
    pattern: re.Pattern
    kind: str


@dataclass
class Call:
    """What a handler needs of one request."""

    params: dict[str, str]
    query: MultiDict
    body: Any
    has_body: bool
    body_error: str | None


@dataclass(frozen=True)
class Interruption:
    """What meets one request on its connection: a hang or a disconnect."""

    fault: str
    seconds: float
    applied: bool


def build_routes() -> list[Route]:
    def route(method: str, template: str, kind: str) -> Route:
        regex = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", template)
        return Route(method, re.compile(regex), kind)

    routes = []
    for prefixes in (NUMBERED_PREFIXES, DATED_PREFIXES):
        for method, template, kind in ROUTE_TEMPLATES:
            for placeholder, prefix in prefixes.items():
                template = template.replace(placeholder, prefix)
            routes.append(route(method, template, kind))
    routes.append(route("GET", SCHEMA_LABELS_PATH, "labels"))
    return routes


ROUTES = build_routes()


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, code="-", size="-"):
        pass


class FakeHubSpot:
    """HubSpot's CRM API in memory, served on ``127.0.0.1`` once started.

    Knobs a test may turn at any time: ``fail_next`` (a list of ``(kind or None,
    status, headers)`` or ``(kind or None, status, headers, body fields)``; the
    first entry matching a request's kind is removed and answered instead),
    ``rate_limit_per_10s``, ``search_limit_per_second`` (None turns it off),
    ``search_lag_seconds``, ``max_association_write_inputs`` and ``token``.

    Faults, each off by default; :meth:`clear_faults` turns every one off:

    - ``fail_always``: entries shaped as ``fail_next``'s, answered to every
      request of their kind for as long as they stay in the list (a scope the
      app lacks, a write HubSpot keeps refusing).
    - ``hang_next``: a list of ``(kind or None, seconds, applied)``. The first
      request of the kind waits ``seconds`` before anything is sent back: with
      ``applied`` it is served first (its write done) and answered late,
      without it the connection is closed after the wait and nothing is served.
    - ``disconnect_next``: a list of ``(kind or None, applied)``. The first
      request of the kind has its connection closed without an answer, after
      being served when ``applied``.
    - :meth:`throttle`: a seeded share of calls answered 429 (a search's as its
      secondly limit), optionally with ``Retry-After``; ``throttle_share`` and
      ``throttle_retry_after`` hold the setting.
    - ``rate_limit_interval_ms``: the length of the rolling window, as the
      ``X-HubSpot-RateLimit-Interval-Milliseconds`` header says it (HubSpot's
      is ten seconds).
    - ``daily_limit_until`` (epoch seconds): until then the daily budget is
      spent, every call but the usage report is answered 429 ``DAILY``, and the
      usage report gives that moment as ``resetsAt``.
    - ``association_limit``: the most records of one type a record may be
      associated with; a batch write input beyond it, at either end, fails
      alone in the answer's errors as ``VALIDATION_ERROR``.

    :meth:`spend_rate_limit` counts calls made by another integration of the
    portal in the window and the daily budget.

    Every entry of :attr:`calls` also holds when it arrived (``at``, epoch
    seconds) and the injected fault that met it (``fault``: ``hang``,
    ``disconnect`` or None); a request answered with nothing has status None.
    """

    def __init__(
        self,
        *,
        token: str = TEST_TOKEN,
        portal_id: int = TEST_PORTAL_ID,
        search_lag_seconds: float = 0.0,
        log_path: Path | None = None,
    ):
        self.token = token
        self.portal_id = portal_id
        self.search_lag_seconds = search_lag_seconds
        self.log_path = None if log_path is None else Path(log_path)
        self.fail_next: list[tuple] = []
        self.rate_limit_per_10s: int | None = None
        self.search_limit_per_second: int | None = SEARCH_LIMIT_PER_SECOND
        self.max_association_write_inputs = INPUTS_PER_ASSOCIATION_WRITE
        self.fail_always: list[tuple] = []
        self.hang_next: list[tuple[str | None, float, bool]] = []
        self.disconnect_next: list[tuple[str | None, bool]] = []
        self.throttle_share = 0.0
        self.throttle_retry_after: str | None = None
        self.rate_limit_interval_ms = RATE_LIMIT_INTERVAL_MS
        self.daily_limit_until: float | None = None
        self.association_limit: int | None = None

        # What tests read.
        self.calls: list[dict] = []
        self.redundant_writes = 0
        self.rate_limited = 0
        self.internal_errors: list[str] = []

        self._lock = threading.RLock()
        self._records: dict[str, dict[int, Record]] = {}
        self._last_ids: dict[str, int] = {}
        # (from type, from id, to type) -> {to id: {(category, type id)}}
        self._links: dict[tuple[str, int, str], dict[int, set[tuple[str, int]]]] = {}
        # (from type, to type) -> {type id: AssociationType}
        self._definitions: dict[tuple[str, str], dict[int, AssociationType]] = {}
        self._window: deque[float] = deque()
        self._search_window: deque[float] = deque()
        self._daily_calls = 0
        self._throttle_random = random.Random(0)
        self._server = None
        self._thread: threading.Thread | None = None
        self._url: str | None = None

        for a, b, forward, backward, label in HUBSPOT_DEFINED_TYPES:
            self._define(a, b, HUBSPOT_DEFINED, forward, backward, label)

    # Lifecycle

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``, once started."""
        if self._url is None:
            raise RuntimeError("FakeHubSpot has no URL before start().")
        return self._url

    def start(self) -> "FakeHubSpot":
        self._server = make_server(
            "127.0.0.1", 0, self._wsgi, threaded=True, request_handler=_QuietHandler
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": SHUTDOWN_POLL_SECONDS},
            name="fake-hubspot",
            daemon=True,
        )
        self._thread.start()
        self._url = f"http://127.0.0.1:{self._server.server_port}"
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        self._server = None

    def __enter__(self) -> "FakeHubSpot":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # Test setup and inspection

    def add_record(
        self, object_type: str, properties: dict, record_id: int | None = None
    ) -> int:
        """Store a record created now; its id, given or the next in its type's range.

        Values are stored as HubSpot answers them: strings, or None. A contact
        with an ``email`` gets ``hs_email_domain`` as HubSpot computes it.
        """
        type_id = object_type_id(object_type)
        stored = {name: _property_value(v) for name, v in properties.items()}
        email = stored.get("email")
        if type_id == CONTACT and email and "hs_email_domain" not in stored:
            stored["hs_email_domain"] = email.rpartition("@")[2].lower() or None

        with self._lock:
            records = self._records.setdefault(type_id, {})
            if record_id is None:
                record_id = self._next_id(type_id)
            elif record_id in records:
                raise ValueError(f"{object_label(type_id)} {record_id} exists already")
            moment = datetime.now(UTC)
            records[record_id] = Record(
                id=record_id,
                properties=stored,
                created_at=timestamp(moment),
                created_monotonic=time.monotonic(),
            )
            return record_id

    def associate(
        self,
        from_type: str,
        from_id: int,
        to_type: str,
        to_id: int,
        types: Iterable[tuple[str, int]] | None = None,
    ) -> None:
        """Associate two stored records; by default with the pair's unlabeled type.

        Adds to the types the pair has (the unlabeled one is always among them)
        and keeps one primary company per record, as HubSpot does. Counts no
        call and no redundant write.
        """
        a, b = object_type_id(from_type), object_type_id(to_type)
        with self._lock:
            for type_id, record_id in ((a, from_id), (b, to_id)):
                if record_id not in self._records.get(type_id, {}):
                    raise KeyError(f"no {object_label(type_id)} {record_id}")
            definitions = self._pair_definitions(a, b)
            wanted = set(types or ())
            unknown = sorted(t for t in wanted if not _defined(t, definitions))
            if unknown or not definitions:
                raise ValueError(
                    f"{unknown or 'no type'} defined from {object_label(a)} to "
                    f"{object_label(b)}"
                )
            self._write_pair(a, from_id, b, to_id, wanted, replace_labels=False)

    def associations(
        self, from_type: str, from_id: int, to_type: str
    ) -> dict[int, set[tuple[str, int]]]:
        """to id -> {(category, type id)}, as seen from ``from_id``."""
        a, b = object_type_id(from_type), object_type_id(to_type)
        with self._lock:
            links = self._links.get((a, from_id, b), {})
            return {to_id: set(types) for to_id, types in links.items()}

    def add_label(
        self,
        from_type: str,
        to_type: str,
        label: str,
        type_id: int,
        inverse_type_id: int,
        category: str = USER_DEFINED,
    ) -> None:
        """Define a labeled association type, in both directions."""
        a, b = object_type_id(from_type), object_type_id(to_type)
        with self._lock:
            taken = set(self._pair_definitions(a, b)) | set(
                self._pair_definitions(b, a)
            )
            if {type_id, inverse_type_id} & taken:
                raise ValueError(f"type id {type_id} or {inverse_type_id} is taken")
            self._define(a, b, category, type_id, inverse_type_id, label)

    def call_count(self, kind: str | None = None) -> int:
        """Requests received, of one kind or of all; refused ones included."""
        with self._lock:
            return sum(1 for c in self.calls if kind is None or c["kind"] == kind)

    def reset_counters(self) -> None:
        """Forget calls, redundant writes, 429s and the rate windows; keep data."""
        with self._lock:
            self.calls.clear()
            self.redundant_writes = 0
            self.rate_limited = 0
            self._window.clear()
            self._search_window.clear()

    # Faults

    def throttle(
        self, share: float, *, seed: int = 0, retry_after: int | None = None
    ) -> None:
        """Answer 429 to ``share`` of the calls from now on (0 stops it).

        Which calls is drawn from a random sequence seeded with ``seed``, so a
        run meets the same sequence every time; ``retry_after`` seconds go in a
        ``Retry-After`` header. The usage report is never throttled.
        """
        with self._lock:
            self.throttle_share = share
            self.throttle_retry_after = (
                None if retry_after is None else str(retry_after)
            )
            self._throttle_random = random.Random(seed)

    def spend_rate_limit(self, calls: int) -> None:
        """Count ``calls`` made just now by another integration of the portal: they
        fill the ten-second window and the daily budget, and are not in calls."""
        with self._lock:
            self._window.extend([time.monotonic()] * calls)
            self._daily_calls += calls

    def clear_faults(self) -> None:
        """Turn every injected fault and enforced limit off; keep data and counts."""
        with self._lock:
            self.fail_next.clear()
            self.fail_always.clear()
            self.hang_next.clear()
            self.disconnect_next.clear()
            self.throttle(0.0)
            self.rate_limit_per_10s = None
            self.rate_limit_interval_ms = RATE_LIMIT_INTERVAL_MS
            self.daily_limit_until = None
            self.association_limit = None

    # HTTP

    def _wsgi(self, environ, start_response):
        request = Request(environ)
        response = self._answer(request, environ.get("werkzeug.socket"))
        return response(environ, start_response)

    def _answer(self, request: Request, connection) -> Response:
        arrived = time.time()
        raw = request.get_data(cache=True)
        body, body_error = None, None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError as exc:
                body_error = str(exc)
        route, params = _match(request.method, request.path)
        kind = route.kind if route else "unknown"
        headers: dict[str, str] = {}

        with self._lock:
            interruption = self._pop_interruption(kind)
            if interruption is not None and not interruption.applied:
                self._record(request, kind, body, None, arrived, interruption.fault)
        if interruption is not None and not interruption.applied:
            _interrupt(interruption, connection)

        with self._lock:
            try:
                refusal = self._refuse_early(request, route, headers)
                if refusal is not None:
                    status, payload = refusal
                else:
                    call = Call(params, request.args, body, bool(raw), body_error)
                    status, payload = getattr(self, f"_serve_{kind}")(call)
            except HubSpotError as exc:
                status, payload = exc.status, exc.body
            except Exception as exc:
                # A bug of the fake, not HubSpot behaviour: keep it for the test.
                self.internal_errors.append(f"{request.method} {request.path}: {exc!r}")
                status, payload = 500, error_body(f"fake failed: {exc!r}", "ERROR")

            fault = None if interruption is None else interruption.fault
            self._record(request, kind, body, status, arrived, fault)
            self._log(request, kind, body, status)

        response = Response(status=status)
        if payload is not None:
            response.set_data(json.dumps(payload))
            response.content_type = "application/json;charset=utf-8"
        response.headers.update(headers)
        if isinstance(payload, dict) and "correlationId" in payload:
            response.headers["X-HubSpot-Correlation-Id"] = payload["correlationId"]
        if interruption is not None:
            _interrupt(interruption, connection)
        return response

    def _refuse_early(self, request, route, headers) -> tuple[int, Any] | None:
        """Routing, token, injected faults and rate limits, before any handler."""
        if route is None:
            if any(r.pattern.fullmatch(request.path) for r in ROUTES):
                raise HubSpotError(405, f"{request.method} is not allowed here.")
            raise HubSpotError(404, f"No route for {request.path}.", "OBJECT_NOT_FOUND")

        if request.headers.get("Authorization") != f"Bearer {self.token}":
            raise HubSpotError(
                401,
                "Authentication credentials not found. This API supports OAuth 2.0 "
                "authentication and you can find more details at "
                "https://developers.hubspot.com/docs/methods/auth/oauth-overview",
                "INVALID_AUTHENTICATION",
            )

        fault = self._pop_fault(route.kind)
        if fault is not None:
            status, fault_headers, body_fields = fault
            headers.update(fault_headers)
            return status, _fault_body(status, body_fields)

        if route.kind != "api_usage":
            self._refuse_if_daily_spent(route.kind, headers)
            self._refuse_if_throttled(route.kind, headers)
        if route.kind == "search":
            self._count_search()
        else:
            self._count_call(headers)
        return None

    def _pop_fault(self, kind: str) -> tuple[int, dict, dict] | None:
        for index, (wanted_kind, status, headers, *body_fields) in enumerate(
            self.fail_next
        ):
            if wanted_kind is None or wanted_kind == kind:
                del self.fail_next[index]
                return status, dict(headers or {}), dict(*body_fields)
        for wanted_kind, status, headers, *body_fields in self.fail_always:
            if wanted_kind is None or wanted_kind == kind:
                return status, dict(headers or {}), dict(*body_fields)
        return None

    def _pop_interruption(self, kind: str) -> Interruption | None:
        for index, (wanted_kind, seconds, applied) in enumerate(self.hang_next):
            if wanted_kind is None or wanted_kind == kind:
                del self.hang_next[index]
                return Interruption(HANG, float(seconds), bool(applied))
        for index, (wanted_kind, applied) in enumerate(self.disconnect_next):
            if wanted_kind is None or wanted_kind == kind:
                del self.disconnect_next[index]
                return Interruption(DISCONNECT, 0.0, bool(applied))
        return None

    def _daily_limit_reached(self) -> bool:
        until = self.daily_limit_until
        return until is not None and time.time() < until

    def _refuse_if_daily_spent(self, kind: str, headers: dict[str, str]) -> None:
        if not self._daily_limit_reached():
            return
        self.rate_limited += 1
        if kind != "search":
            self._rate_limit_headers(headers, daily_remaining=0)
        raise RateLimitedError("daily", DAILY_POLICY)

    def _refuse_if_throttled(self, kind: str, headers: dict[str, str]) -> None:
        if not self.throttle_share:
            return
        if self._throttle_random.random() >= self.throttle_share:
            return
        self.rate_limited += 1
        if self.throttle_retry_after is not None:
            headers["Retry-After"] = self.throttle_retry_after
        if kind == "search":
            raise RateLimitedError("secondly", "SECONDLY")
        self._rate_limit_headers(headers, remaining=0)
        raise RateLimitedError("ten_secondly_rolling", TEN_SECONDLY_POLICY)

    def _count_search(self) -> None:
        """Search has a limit of its own, per second, and no rate-limit headers."""
        moment = time.monotonic()
        window = self._search_window
        while window and window[0] <= moment - 1.0:
            window.popleft()
        limit = self.search_limit_per_second
        if limit is not None and len(window) >= limit:
            self.rate_limited += 1
            raise RateLimitedError("secondly", "SECONDLY")
        window.append(moment)
        self._daily_calls += 1

    def _count_call(self, headers: dict[str, str]) -> None:
        moment = time.monotonic()
        window = self._window
        while window and window[0] <= moment - self.rate_limit_interval_ms / 1000:
            window.popleft()
        limit = self.rate_limit_per_10s
        refused = limit is not None and len(window) >= limit
        if not refused:
            window.append(moment)
            self._daily_calls += 1

        self._rate_limit_headers(headers)
        if refused:
            self.rate_limited += 1
            raise RateLimitedError("ten_secondly_rolling", TEN_SECONDLY_POLICY)

    def _rate_limit_headers(
        self,
        headers: dict[str, str],
        *,
        remaining: int | None = None,
        daily_remaining: int | None = None,
    ) -> None:
        """The ``X-HubSpot-RateLimit-*`` headers; by default as the window and
        the daily budget stand."""
        limit = self.rate_limit_per_10s
        shown = DEFAULT_RATE_LIMIT_PER_10S if limit is None else limit
        if remaining is None:
            remaining = max(shown - len(self._window), 0)
        if daily_remaining is None:
            daily_remaining = max(DAILY_LIMIT - self._daily_calls, 0)
        headers.update(
            {
                "X-HubSpot-RateLimit-Max": str(shown),
                "X-HubSpot-RateLimit-Remaining": str(remaining),
                "X-HubSpot-RateLimit-Interval-Milliseconds": str(
                    self.rate_limit_interval_ms
                ),
                "X-HubSpot-RateLimit-Daily": str(DAILY_LIMIT),
                "X-HubSpot-RateLimit-Daily-Remaining": str(daily_remaining),
            }
        )

    def _record(self, request, kind, body, status, arrived, fault) -> None:
        self.calls.append(
            {
                "method": request.method,
                "path": request.path,
                "query": request.args.to_dict(flat=False),
                "kind": kind,
                "status": status,
                "body": body,
                "at": arrived,
                "fault": fault,
            }
        )

    def _log(self, request: Request, kind: str, body: Any, status: int) -> None:
        if self.log_path is None:
            return
        line = {
            "method": request.method,
            "path": request.path,
            "query": request.args.to_dict(flat=False),
            "headers": {
                name.lower(): value
                for name, value in request.headers.items()
                if name.lower() not in ("authorization", "cookie")
            },
            "body": body,
            "status": status,
            "kind": kind,
        }
        with self.log_path.open("a", encoding="utf-8") as log:
            log.write(json.dumps(line) + "\n")

    # Records

    def _serve_objects_read(self, call: Call) -> tuple[int, Any]:
        type_id = object_type_id(call.params["type"])
        body = _json_object(call)
        inputs = _inputs(body, OBJECTS_PER_BATCH_READ)
        properties = _string_list(body.get("properties"), "properties")
        id_property = body.get("idProperty")

        results, missing, seen = [], [], set()
        for item in inputs:
            raw_id = str(_input_field(item, "id"))
            record = self._find_record(type_id, raw_id, id_property)
            if record is None:
                missing.append(raw_id)
            elif record.id not in seen:
                seen.add(record.id)
                results.append(_public_object(record, properties))

        errors = []
        if missing:
            errors.append(
                input_error(
                    "OBJECT_NOT_FOUND",
                    f"Could not get some {object_label(type_id).upper()} objects, "
                    "they may be deleted or not exist. Check that ids are valid.",
                    {"ids": missing},
                )
            )
        return _batch_answer(results, errors)

    def _serve_single_read(self, call: Call) -> tuple[int, Any]:
        type_id = object_type_id(call.params["type"])
        raw_id = call.params["id"]
        record = self._find_record(type_id, raw_id, call.query.get("idProperty"))
        if record is None:
            raise HubSpotError(
                404,
                "Object not found.  objectId are usually numeric.",
                "OBJECT_NOT_FOUND",
                context={"id": [raw_id]},
            )

        answer = _public_object(record, _comma_list(call.query, "properties"))
        associated = {}
        for name in _comma_list(call.query, "associations"):
            to_type = object_type_id(name)
            links = self._links.get((type_id, record.id, to_type), {})
            entries = [
                {"id": str(to_id), "type": self._v3_type_name(type_id, to_type, spec)}
                for to_id in sorted(links)
                for spec in sorted(links[to_id], key=lambda spec: spec[1])
            ]
            if entries:
                associated[name] = {"results": entries}
        if associated:
            answer["associations"] = associated
        return 200, answer

    def _serve_search(self, call: Call) -> tuple[int, Any]:
        type_id = object_type_id(call.params["type"])
        body = _json_object(call)
        groups = _filter_groups(body.get("filterGroups"))
        properties = _string_list(body.get("properties"), "properties")
        limit = body.get("limit", SEARCH_DEFAULT_LIMIT)
        after = str(body.get("after") or "0")
        if not isinstance(limit, int) or not 0 <= limit <= SEARCH_MAX_LIMIT:
            raise HubSpotError(400, f"limit must be between 0 and {SEARCH_MAX_LIMIT}.")
        if not after.isdigit():
            raise HubSpotError(400, f"Invalid after token: {after}")
        offset = int(after)
        if offset + limit > SEARCH_MAX_RESULTS:
            raise HubSpotError(
                400, f"A search returns at most {SEARCH_MAX_RESULTS} results."
            )

        # The search index sees a record search_lag_seconds after it was written.
        visible_until = time.monotonic() - self.search_lag_seconds
        matches = [
            record
            for _, record in sorted(self._records.get(type_id, {}).items())
            if record.created_monotonic <= visible_until
            and (
                not groups
                or any(all(_matches(record, f) for f in g["filters"]) for g in groups)
            )
        ]

        page = matches[offset : offset + limit]
        answer = {
            "total": len(matches),
            "results": [_public_object(record, properties) for record in page],
        }
        if offset + limit < len(matches):
            answer["paging"] = {"next": {"after": str(offset + limit)}}
        return 200, answer

    # Associations

    def _serve_associations_read(self, call: Call) -> tuple[int, Any]:
        a, b = self._pair_types(call)
        inputs = _inputs(_json_object(call), IDS_PER_ASSOCIATION_READ)

        results, errors = [], []
        for item in inputs:
            raw_id = str(_input_field(item, "id"))
            links = self._links.get((a, _int_or_none(raw_id), b))
            # "None" is an error here, and so is an id that does not exist.
            if not links:
                errors.append(
                    input_error(
                        "OBJECT_NOT_FOUND",
                        f"No {object_label(b)} is associated with "
                        f"{object_label(a)} {raw_id}.",
                        {"fromObjectId": [raw_id]},
                        "crm.associations.NO_ASSOCIATIONS_FOUND",
                    )
                )
                continue
            targets, after = self._association_page(
                a, b, links, item.get("after"), ASSOCIATIONS_PER_PAGE
            )
            result = {"from": {"id": raw_id}, "to": targets}
            if after is not None:
                result["paging"] = {"next": {"after": after}}
            results.append(result)

        return _batch_answer(results, errors)

    def _serve_associations_list(self, call: Call) -> tuple[int, Any]:
        a, b = self._pair_types(call)
        limit = call.query.get("limit", str(ASSOCIATIONS_PER_PAGE))
        if not limit.isdigit():
            raise HubSpotError(400, f"Invalid limit: {limit}")
        links = self._links.get((a, _int_or_none(call.params["from_id"]), b), {})

        targets, after = self._association_page(
            a,
            b,
            links,
            call.query.get("after") or None,
            min(int(limit), ASSOCIATIONS_PER_PAGE),
        )
        answer = {"results": targets}
        if after is not None:
            answer["paging"] = {"next": {"after": after}}
        return 200, answer

    def _serve_associations_create(self, call: Call) -> tuple[int, Any]:
        a, b = self._pair_types(call)
        inputs = _inputs(_json_object(call), self.max_association_write_inputs)
        definitions = self._pair_definitions(a, b)

        writes, errors = [], []
        for item in inputs:
            from_id, to_id = _pair_ids(item)
            types = item.get("types")
            if not isinstance(types, list) or not types:
                raise HubSpotError(400, "Each input needs a list of types.")
            specs = {_association_spec(t) for t in types}
            error = self._undefined(a, b, from_id, to_id, specs, definitions)
            error = error or self._missing(a, from_id, b, to_id)
            error = error or self._over_limit(a, from_id, b, to_id, writes)
            if error is not None:
                errors.append(error)
            else:
                writes.append((int(from_id), int(to_id), specs))

        self._count_redundant(a, b, writes)
        results = []
        for from_id, to_id, specs in writes:
            self._write_pair(a, from_id, b, to_id, specs, replace_labels=True)
            results.append(_labels_between(a, from_id, b, to_id, specs, definitions))
        return _batch_answer(results, errors, status=201)

    def _serve_associations_default(self, call: Call) -> tuple[int, Any]:
        a, b = self._pair_types(call)
        inputs = _inputs(_json_object(call), self.max_association_write_inputs)
        unlabeled = self._unlabeled(a, b)

        writes, errors = [], []
        for item in inputs:
            # The default endpoint takes from and to only (HUBSPOT.md section 3).
            _only_fields(item, {"from", "to"})
            from_id, to_id = _pair_ids(item)
            error = self._no_default(a, b, from_id, to_id, unlabeled)
            error = error or self._missing(a, from_id, b, to_id)
            error = error or self._over_limit(a, from_id, b, to_id, writes)
            if error is not None:
                errors.append(error)
            else:
                writes.append((int(from_id), int(to_id), {unlabeled}))

        self._count_redundant(a, b, writes)
        results = []
        for from_id, to_id, _ in writes:
            self._write_pair(a, from_id, b, to_id, set(), replace_labels=False)
            results += self._default_results(a, from_id, b, to_id)
        # 200 even when inputs failed: HubSpot documents no 207 here.
        return 200, _batch_answer(results, errors)[1]

    def _serve_associations_put_default(self, call: Call) -> tuple[int, Any]:
        a, b = self._pair_types(call)
        if call.has_body:
            raise HubSpotError(400, "This endpoint takes no request body.")
        from_id, to_id = call.params["from_id"], call.params["to_id"]
        unlabeled = self._unlabeled(a, b)

        error = self._no_default(a, b, from_id, to_id, unlabeled)
        error = error or self._missing(a, from_id, b, to_id)
        if error is not None:
            return 200, _batch_answer([], [error])[1]
        writes = [(int(from_id), int(to_id), {unlabeled})]
        self._count_redundant(a, b, writes)
        self._write_pair(a, int(from_id), b, int(to_id), set(), replace_labels=False)
        results = self._default_results(a, int(from_id), b, int(to_id))
        return 200, _batch_answer(results, [])[1]

    def _serve_associations_put(self, call: Call) -> tuple[int, Any]:
        a, b = self._pair_types(call)
        if call.body_error is not None or not isinstance(call.body, list):
            raise HubSpotError(400, "The body must be a JSON array of types.")
        from_id, to_id = call.params["from_id"], call.params["to_id"]
        specs = {_association_spec(t) for t in call.body}
        definitions = self._pair_definitions(a, b)
        if not specs:
            raise HubSpotError(400, "No association types given.")

        refusal = self._undefined(a, b, from_id, to_id, specs, definitions)
        if refusal is not None:
            raise HubSpotError(400, refusal["message"], context=refusal["context"])
        missing = self._missing(a, from_id, b, to_id)
        if missing is not None:
            raise HubSpotError(
                404, missing["message"], "OBJECT_NOT_FOUND", context=missing["context"]
            )

        from_id, to_id = int(from_id), int(to_id)
        self._count_redundant(a, b, [(from_id, to_id, specs)])
        self._write_pair(a, from_id, b, to_id, specs, replace_labels=True)
        return 201, _labels_between(a, from_id, b, to_id, specs, definitions)

    def _serve_labels(self, call: Call) -> tuple[int, Any]:
        a, b = self._pair_types(call)
        definitions = self._pair_definitions(a, b)
        return 200, {
            "results": [
                {"category": d.category, "typeId": d.type_id, "label": d.label}
                for d in sorted(definitions.values(), key=lambda d: d.type_id)
            ]
        }

    # Account

    def _serve_account(self, call: Call) -> tuple[int, Any]:
        return 200, {
            "portalId": self.portal_id,
            "accountType": "STANDARD",
            "timeZone": "US/Eastern",
            "companyCurrency": "USD",
            "additionalCurrencies": [],
            "utcOffset": "-05:00",
            "utcOffsetMilliseconds": -18_000_000,
            "uiDomain": "app.hubspot.com",
            "dataHostingLocation": "na1",
        }

    def _serve_api_usage(self, call: Call) -> tuple[int, Any]:
        moment = datetime.now(UTC)
        midnight = moment.replace(hour=0, minute=0, second=0, microsecond=0)
        resets_at, usage = midnight + timedelta(days=1), self._daily_calls
        if self._daily_limit_reached():
            # A millisecond on, so that HubSpot's millisecond form never says a
            # moment before the reset.
            until = datetime.fromtimestamp(self.daily_limit_until, UTC)
            resets_at, usage = until + timedelta(milliseconds=1), DAILY_LIMIT
        return 200, {
            "results": [
                {
                    "name": "api-calls-daily",
                    "usageLimit": DAILY_LIMIT,
                    "currentUsage": usage,
                    "collectedAt": timestamp(moment),
                    "fetchStatus": "SUCCESS",
                    "resetsAt": timestamp(resets_at),
                }
            ]
        }

    # State

    def _next_id(self, type_id: str) -> int:
        if type_id not in self._last_ids:
            custom_types = sum(1 for t in self._last_ids if t not in ID_BASES)
            self._last_ids[type_id] = ID_BASES.get(
                type_id, CUSTOM_ID_BASE + CUSTOM_ID_RANGE * custom_types
            )
        records = self._records.get(type_id, {})
        self._last_ids[type_id] += 1
        while self._last_ids[type_id] in records:
            self._last_ids[type_id] += 1
        return self._last_ids[type_id]

    def _find_record(
        self, type_id: str, raw_id: str, id_property: str | None
    ) -> Record | None:
        records = self._records.get(type_id, {})
        if id_property and id_property != "hs_object_id":
            wanted = raw_id.casefold()
            for record in records.values():
                if (record.properties.get(id_property) or "").casefold() == wanted:
                    return record
            return None
        return records.get(_int_or_none(raw_id))

    def _define(self, a, b, category, forward, backward, label) -> None:
        self._definitions.setdefault((a, b), {})[forward] = AssociationType(
            category, forward, label, backward
        )
        self._definitions.setdefault((b, a), {})[backward] = AssociationType(
            category, backward, label, forward
        )

    def _pair_definitions(self, a: str, b: str) -> dict[int, AssociationType]:
        """The types from ``a`` to ``b``; a new pair gets a made-up unlabeled one.

        Products get none: a line item names its product in ``hs_product_id``.
        """
        if (a, b) not in self._definitions:
            if PRODUCT in (a, b):
                return {}
            # A checksum, not hash(): the same ids in every process and run.
            first, second = sorted((a, b))
            base = 10_000 + 2 * (zlib.crc32(f"{first}->{second}".encode()) % 40_000)
            custom = CUSTOM_TYPE_ID.fullmatch(a) or CUSTOM_TYPE_ID.fullmatch(b)
            category = USER_DEFINED if custom else HUBSPOT_DEFINED
            self._define(
                first, second, category, base, base if a == b else base + 1, None
            )
        return self._definitions[(a, b)]

    def _unlabeled(self, a: str, b: str) -> tuple[str, int] | None:
        for definition in self._pair_definitions(a, b).values():
            if definition.label is None:
                return definition.category, definition.type_id
        return None

    def _pair_types(self, call: Call) -> tuple[str, str]:
        return (
            object_type_id(call.params["from_type"]),
            object_type_id(call.params["to_type"]),
        )

    def _write_pair(self, a, from_id, b, to_id, specs, *, replace_labels) -> None:
        """Give one pair its types, in both directions.

        A labeled write replaces the pair's types with the ones sent, a default
        one adds to them; either way the unlabeled type is there.
        """
        types = {self._unlabeled(a, b)} | set(specs)
        if not replace_labels:
            types |= self._links.get((a, from_id, b), {}).get(to_id, set())
        self._set_types(a, from_id, b, to_id, types)

        if COMPANY in (a, b) and a != b:
            if b == COMPANY:
                self._keep_one_primary(a, from_id, to_id)
            else:
                self._keep_one_primary(b, to_id, from_id)

    def _keep_one_primary(self, record_type: str, record_id: int, company_id: int):
        """A record has one primary company: the one made primary last."""
        if record_type not in PRIMARY_COMPANY_TYPES:
            return
        primary = (HUBSPOT_DEFINED, PRIMARY_COMPANY_TYPES[record_type])
        companies = self._links.get((record_type, record_id, COMPANY), {})
        if primary not in companies.get(company_id, set()):
            return
        for other_id, types in list(companies.items()):
            if other_id != company_id and primary in types:
                self._set_types(
                    record_type, record_id, COMPANY, other_id, types - {primary}
                )

    def _set_types(self, a, from_id, b, to_id, types) -> None:
        definitions = self._definitions[(a, b)]
        inverse = {(c, definitions[t].inverse_type_id) for c, t in types}
        for key, other_id, values in (
            ((a, from_id, b), to_id, types),
            ((b, to_id, a), from_id, inverse),
        ):
            links = self._links.setdefault(key, {})
            if values:
                links[other_id] = set(values)
            else:
                links.pop(other_id, None)

    def _association_page(self, a, b, links, after, size):
        """One page of a record's associations: (to entries, next cursor or None)."""
        if after is not None and not str(after).isdigit():
            raise HubSpotError(400, f"Invalid after token: {after}")
        offset = int(after or 0)
        to_ids = sorted(links)
        definitions = self._definitions[(a, b)]
        targets = [
            {
                # A JSON number, as HubSpot answers it (HUBSPOT.md section 3).
                "toObjectId": to_id,
                "associationTypes": [
                    {
                        "category": category,
                        "typeId": type_id,
                        "label": definitions[type_id].label,
                    }
                    for category, type_id in sorted(links[to_id], key=lambda t: t[1])
                ],
            }
            for to_id in to_ids[offset : offset + size]
        ]
        more = offset + size < len(to_ids)
        return targets, str(offset + size) if more else None

    def _v3_type_name(self, a: str, b: str, spec: tuple[str, int]) -> str:
        """The v3 name of a type, as ``?associations=`` answers it."""
        definition = self._definitions[(a, b)][spec[1]]
        name = f"{object_label(a)}_to_{object_label(b)}"
        if definition.label is None:
            return name + "_unlabeled"
        return name if definition.label == "Primary" else str(definition.type_id)

    def _undefined(self, a, b, from_id, to_id, specs, definitions) -> dict | None:
        """The error of an input naming a type the pair does not have."""
        for category, type_id in sorted(specs):
            if not _defined((category, type_id), definitions):
                return input_error(
                    "VALIDATION_ERROR",
                    f"Association type {category} {type_id} is not defined from "
                    f"{object_label(a)} to {object_label(b)}.",
                    {
                        "fromObjectId": [str(from_id)],
                        "toObjectId": [str(to_id)],
                        "associationTypeId": [str(type_id)],
                    },
                )
        return None

    def _no_default(self, a, b, from_id, to_id, unlabeled) -> dict | None:
        if unlabeled is not None:
            return None
        return input_error(
            "VALIDATION_ERROR",
            f"{object_label(a)} and {object_label(b)} cannot be associated.",
            {"fromObjectId": [str(from_id)], "toObjectId": [str(to_id)]},
        )

    def _missing(self, a, from_id, b, to_id) -> dict | None:
        """The error of an input naming a record that does not exist."""
        ends = ((a, from_id, "fromObjectId"), (b, to_id, "toObjectId"))
        for type_id, raw_id, key in ends:
            if _int_or_none(raw_id) not in self._records.get(type_id, {}):
                return input_error(
                    "OBJECT_NOT_FOUND",
                    f"No {object_label(type_id)} with id {raw_id} exists.",
                    {key: [str(raw_id)]},
                )
        return None

    def _over_limit(self, a, from_id, b, to_id, writes) -> dict | None:
        """The error of an input that would give either end more associations
        than ``association_limit``, counting the batch's inputs before it."""
        limit = self.association_limit
        from_id, to_id = int(from_id), int(to_id)
        if limit is None or to_id in self._links.get((a, from_id, b), {}):
            return None
        ends = (
            (a, from_id, b, {t for f, t, _ in writes if f == from_id}),
            (b, to_id, a, {f for f, t, _ in writes if t == to_id}),
        )
        for record_type, record_id, other_type, batch in ends:
            linked = set(self._links.get((record_type, record_id, other_type), {}))
            if len(linked | batch) >= limit:
                return input_error(
                    "VALIDATION_ERROR",
                    f"{object_label(record_type)} {record_id} has reached the "
                    f"limit of {limit} associations with {object_label(other_type)} "
                    "records.",
                    {"fromObjectId": [str(from_id)], "toObjectId": [str(to_id)]},
                )
        return None

    def _count_redundant(self, a, b, writes) -> None:
        """Count the inputs that add nothing: every type they send the pair had
        already, or the call names the pair twice.

        A labeled write must resend the labels a pair has (it replaces them), so
        types resent beside a new one are not redundant.
        """
        seen = set()
        for from_id, to_id, specs in writes:
            existing = self._links.get((a, from_id, b), {}).get(to_id, set())
            if (from_id, to_id) in seen or set(specs) <= existing:
                self.redundant_writes += 1
            seen.add((from_id, to_id))

    def _default_results(self, a, from_id, b, to_id) -> list[dict]:
        """Both directions of a default association, as HubSpot answers them."""
        category, forward = self._unlabeled(a, b)
        backward = self._definitions[(a, b)][forward].inverse_type_id
        return [
            {
                "from": {"id": str(x)},
                "to": {"id": str(y)},
                "associationSpec": {
                    "associationCategory": category,
                    "associationTypeId": type_id,
                },
            }
            for x, y, type_id in ((from_id, to_id, forward), (to_id, from_id, backward))
        ]


def _match(method: str, path: str) -> tuple[Route | None, dict[str, str]]:
    for route in ROUTES:
        if route.method == method and (found := route.pattern.fullmatch(path)):
            return route, found.groupdict()
    return None, {}


def _interrupt(interruption: Interruption, connection) -> None:
    """Wait as the fault says; then answer late (a hang after serving) or drop
    the connection."""
    time.sleep(interruption.seconds)
    if interruption.fault == HANG and interruption.applied:
        return
    _drop(connection)


def _drop(connection) -> NoReturn:
    """Close the request's connection without an answer.

    werkzeug takes the ConnectionError raised here for a client that went away
    and sends nothing; with linger 0 the final close is a reset.
    """
    if connection is not None:
        with contextlib.suppress(OSError):
            connection.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            connection.shutdown(socket.SHUT_RDWR)
    raise ConnectionAbortedError("the fake closed the connection without an answer")


def _fault_body(status: int, body_fields: dict) -> dict:
    if status == 429:
        body = RateLimitedError("ten_secondly_rolling", "TEN_SECONDLY_ROLLING").body
    else:
        category, message = FAULTS.get(
            status, ("INTERNAL_ERROR", f"Injected error {status}.")
        )
        body = error_body(message, category)
    body.update(body_fields)
    return body


def _batch_answer(results: list, errors: list, status: int = 200) -> tuple[int, dict]:
    """HubSpot's batch answer: ``status`` when all went well, else 207."""
    moment = timestamp(datetime.now(UTC))
    answer = {
        "status": "COMPLETE",
        "results": results,
        "startedAt": moment,
        "completedAt": moment,
    }
    if errors:
        answer["errors"] = errors
        answer["numErrors"] = len(errors)
        return 207, answer
    return status, answer


def _labels_between(a, from_id, b, to_id, specs, definitions) -> dict:
    return {
        "fromObjectTypeId": a,
        # JSON numbers, as HubSpot answers them (HUBSPOT.md section 3).
        "fromObjectId": from_id,
        "toObjectTypeId": b,
        "toObjectId": to_id,
        "labels": sorted(
            definitions[t].label for _, t in specs if definitions[t].label
        ),
    }


def _json_object(call: Call) -> dict:
    if call.body_error is not None:
        raise HubSpotError(400, f"Invalid input JSON: {call.body_error}")
    if not isinstance(call.body, dict):
        raise HubSpotError(400, "The body must be a JSON object.")
    return call.body


def _inputs(body: dict, limit: int) -> list[dict]:
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not all(isinstance(i, dict) for i in inputs):
        raise HubSpotError(400, "inputs must be a list of objects.")
    if len(inputs) > limit:
        raise HubSpotError(
            400, f"Too many inputs: {len(inputs)}; at most {limit} are allowed."
        )
    return inputs


def _input_field(item: dict, name: str):
    value = item.get(name)
    if value is None or isinstance(value, (dict, list)):
        raise HubSpotError(400, f"Each input needs an {name}.")
    return value


def _pair_ids(item: dict) -> tuple[str, str]:
    """The from and to ids of a write input, as sent."""
    ids = []
    for end in ("from", "to"):
        value = item.get(end)
        if not isinstance(value, dict):
            raise HubSpotError(400, f"Each input needs {end}.id.")
        _only_fields(value, {"id"})
        ids.append(str(_input_field(value, "id")))
    return ids[0], ids[1]


def _only_fields(item: dict, allowed: set[str]) -> None:
    for name in item:
        if name not in allowed:
            raise HubSpotError(
                400,
                f'Invalid input JSON: Unrecognized field "{name}", not marked as '
                "ignorable.",
            )


def _association_spec(item) -> tuple[str, int]:
    category = item.get("associationCategory") if isinstance(item, dict) else None
    type_id = item.get("associationTypeId") if isinstance(item, dict) else None
    if category not in CATEGORIES or not isinstance(type_id, int):
        raise HubSpotError(
            400,
            "An association type needs an associationCategory (one of "
            f"{', '.join(sorted(CATEGORIES))}) and an integer associationTypeId.",
        )
    return category, type_id


def _defined(spec: tuple[str, int], definitions: dict[int, AssociationType]) -> bool:
    category, type_id = spec
    definition = definitions.get(type_id)
    return definition is not None and definition.category == category


def _string_list(value, name: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise HubSpotError(400, f"{name} must be a list of strings.")
    return value


def _comma_list(query: MultiDict, name: str) -> list[str]:
    return [part for value in query.getlist(name) for part in value.split(",") if part]


def _int_or_none(value) -> int | None:
    text = str(value).strip()
    return int(text) if text.isdigit() else None


def _property_value(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _public_object(record: Record, properties: list[str]) -> dict:
    """A record as HubSpot answers it: the asked properties, null when unset."""
    if properties:
        shown = {name: record.properties.get(name) for name in properties}
    else:
        shown = dict(record.properties)
    shown.update(
        {
            "hs_object_id": str(record.id),
            "createdate": record.created_at,
            "lastmodifieddate": record.created_at,
        }
    )
    return {
        "id": str(record.id),
        "properties": shown,
        "createdAt": record.created_at,
        "updatedAt": record.created_at,
        "archived": False,
    }


def _filter_groups(groups) -> list[dict]:
    """The filter groups of a search, within HubSpot's limits."""
    if groups is None:
        return []
    if not isinstance(groups, list) or len(groups) > SEARCH_MAX_GROUPS:
        raise HubSpotError(
            400, f"filterGroups: at most {SEARCH_MAX_GROUPS} groups are allowed."
        )
    total = 0
    for group in groups:
        filters = group.get("filters") if isinstance(group, dict) else None
        if not isinstance(filters, list):
            raise HubSpotError(400, "Each filter group needs a list of filters.")
        if len(filters) > SEARCH_MAX_FILTERS_PER_GROUP:
            raise HubSpotError(
                400,
                f"At most {SEARCH_MAX_FILTERS_PER_GROUP} filters are allowed in a "
                "filter group.",
            )
        for flt in filters:
            _check_filter(flt)
        total += len(filters)
    if total > SEARCH_MAX_FILTERS:
        raise HubSpotError(
            400, f"At most {SEARCH_MAX_FILTERS} filters are allowed in all."
        )
    return groups


def _check_filter(flt) -> None:
    if not isinstance(flt, dict) or not isinstance(flt.get("propertyName"), str):
        raise HubSpotError(400, "Each filter needs a propertyName.")
    operator = flt.get("operator")
    if operator not in SEARCH_OPERATORS:
        raise HubSpotError(400, f"Unknown operator: {operator}")
    if operator in ("IN", "NOT_IN"):
        if not isinstance(flt.get("values"), list):
            raise HubSpotError(400, f"{operator} needs values.")
    elif operator not in ("HAS_PROPERTY", "NOT_HAS_PROPERTY") and "value" not in flt:
        raise HubSpotError(400, f"{operator} needs a value.")
    if operator == "BETWEEN" and "highValue" not in flt:
        raise HubSpotError(400, "BETWEEN needs a highValue.")


def _matches(record: Record, flt: dict) -> bool:
    """One filter on one record; text compares case-insensitively."""
    name, operator = flt["propertyName"], flt["operator"]
    actual = str(record.id) if name == "hs_object_id" else record.properties.get(name)
    if operator == "HAS_PROPERTY":
        return actual not in (None, "")
    if operator == "NOT_HAS_PROPERTY":
        return actual in (None, "")
    if actual is None:
        return operator in ("NEQ", "NOT_IN", "NOT_CONTAINS_TOKEN")

    text = actual.casefold()
    if operator in ("IN", "NOT_IN"):
        found = text in {str(_property_value(v)).casefold() for v in flt["values"]}
        return found if operator == "IN" else not found
    value = str(_property_value(flt["value"])).casefold()
    if operator in ("CONTAINS_TOKEN", "NOT_CONTAINS_TOKEN"):
        found = value.strip("*") in text
        return found if operator == "CONTAINS_TOKEN" else not found
    if operator in ("EQ", "NEQ"):
        return (text == value) == (operator == "EQ")

    low, high = _sortable(value), _sortable(str(flt.get("highValue")))
    here = _sortable(text)
    try:
        if operator == "BETWEEN":
            return low <= here <= high
        return {
            "LT": here < low,
            "LTE": here <= low,
            "GT": here > low,
            "GTE": here >= low,
        }[operator]
    except TypeError:
        # A number against text: HubSpot matches nothing either.
        return False


def _sortable(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text
