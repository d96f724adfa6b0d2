"""The HubSpot API client: the only module that speaks HTTP to HubSpot.

:class:`HubSpotClient` reads records, searches them, reads, creates and labels
associations, and returns plain data. It splits its inputs into HubSpot's batch
limits and merges the answers, follows paging cursors, turns ids into ints, and
splits a batch's partial answer (207) per input. Every failure of a whole call is
raised as one of::

    HubSpotError                status, category, sub_category, message,
    │                           correlation_id, context
    ├── TransientError          retry_after; 423, 477, 500, 502, 503, 504,
    │   │                       521-524, timeouts and lost connections
    │   │                       (status None); worth retrying later
    │   └── RateLimited         429; policy (TEN_SECONDLY_ROLLING, DAILY, ...)
    └── PermanentError          every other 4xx and any unexpected answer;
                                retrying the same call cannot help

A batch write does not raise for the inputs HubSpot refused one by one: those
come back in :attr:`BatchWrite.failed`, each with its own error from the tree.

Paths differ between HubSpot's numbered versions (``/crm/v4``, ``/crm/v3``) and
its dated ones (``2026-03``); :class:`ApiPaths` is the one place that knows both.
"""

import email.utils
import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import quote

import requests

from workers.logs import get_logger

log = get_logger(__name__)

# HubSpot's batch limits (HUBSPOT.md sections 3 and 4). The input limit of the
# association writes is undocumented; 100 is the safe side of what was reported.
RECORDS_PER_BATCH_READ = 100
# One IN filter takes up to 100 values; a search ORs up to 5 filter groups.
VALUES_PER_FILTER = 100
FILTER_GROUPS_PER_SEARCH = 5
RECORDS_PER_SEARCH_PAGE = 200
IDS_PER_ASSOCIATION_READ = 1_000
INPUTS_PER_ASSOCIATION_WRITE = 100

TRANSIENT_STATUSES = frozenset({423, 429, 477, 500, 502, 503, 504, 521, 522, 523, 524})
# HubSpot asks for at least this pause after a 423 (a locked record).
LOCKED_MIN_WAIT_SECONDS = 2.0

NO_ASSOCIATIONS_FOUND = "crm.associations.NO_ASSOCIATIONS_FOUND"
OBJECT_NOT_FOUND = "OBJECT_NOT_FOUND"

REDACTED = "[redacted]"

# X-HubSpot-RateLimit-* headers, by the key they get in last_rate_limit.
RATE_LIMIT_HEADERS = {
    "max": "X-HubSpot-RateLimit-Max",
    "remaining": "X-HubSpot-RateLimit-Remaining",
    "interval_milliseconds": "X-HubSpot-RateLimit-Interval-Milliseconds",
    "daily": "X-HubSpot-RateLimit-Daily",
    "daily_remaining": "X-HubSpot-RateLimit-Daily-Remaining",
}

# Context keys naming the ids a batch write error is about. HubSpot does not
# document them for association writes, so every spelling seen in its errors
# counts; an error naming none of an input's ids does not fail that input.
_FROM_KEYS = ("fromObjectId", "fromObjectIds", "fromId", "fromIds", "from")
_TO_KEYS = ("toObjectId", "toObjectIds", "toId", "toIds", "to")
_ANY_KEYS = ("ids", "id", "objectId", "objectIds")


class HubSpotError(Exception):
    """A call to HubSpot failed, or HubSpot refused one input of a batch."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        category: str | None = None,
        sub_category: str | None = None,
        correlation_id: str | None = None,
        context: Mapping[str, list[str]] | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.status = status
        self.category = category
        self.sub_category = sub_category
        self.correlation_id = correlation_id
        self.context = dict(context or {})

    def describe(self) -> str:
        """Status, category and message, as a dead letter keeps them."""
        parts = [f"status={self.status}"]
        if self.category:
            parts.append(f"category={self.category}")
        if self.message:
            parts.append(f"message={self.message}")
        return " ".join(parts)


class TransientError(HubSpotError):
    """Worth retrying: after ``retry_after`` seconds when HubSpot said so."""

    def __init__(self, message: str, *, retry_after: float | None = None, **fields):
        super().__init__(message, **fields)
        self.retry_after = retry_after


class RateLimited(TransientError):
    """A 429. ``policy`` is HubSpot's policyName; a DAILY one lasts for hours."""

    def __init__(self, message: str, *, policy: str | None = None, **fields):
        super().__init__(message, **fields)
        self.policy = policy


class PermanentError(HubSpotError):
    """The same call will fail again: bad input, missing scope, gone record."""


@dataclass(frozen=True)
class AssociationType:
    category: str
    type_id: int
    label: str | None = None


@dataclass(frozen=True)
class Association:
    to_id: int
    types: tuple[AssociationType, ...]


@dataclass(frozen=True)
class AssociationInput:
    """One association to write; ``types`` holds (category, type id) pairs."""

    from_id: int
    to_id: int
    types: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class RecordsRead:
    records: dict[int, dict[str, str | None]] = field(default_factory=dict)
    missing: set[int] = field(default_factory=set)


@dataclass(frozen=True)
class BatchWrite:
    done: list[AssociationInput] = field(default_factory=list)
    failed: list[tuple[AssociationInput, HubSpotError]] = field(default_factory=list)


_PATH_FAMILIES = {
    "v4": {
        "objects": "/crm/v3/objects/{object_type}",
        "associations": "/crm/v4/associations/{from_type}/{to_type}",
        "record_associations": (
            "/crm/v4/objects/{from_type}/{id}/associations/{to_type}"
        ),
        # The path of HubSpot's published schema document; HUBSPOT.md also
        # names /crm/v4/associations/{from}/{to}/labels for the same call.
        "labels": "/crm/associations/v4/{from_type}/{to_type}/labels",
        "account": "/account-info/v3/details",
        "usage": "/account-info/v3/api-usage/daily/private-apps",
    },
    "2026-03": {
        "objects": "/crm/objects/2026-03/{object_type}",
        "associations": "/crm/associations/2026-03/{from_type}/{to_type}",
        "record_associations": (
            "/crm/objects/2026-03/{from_type}/{id}/associations/{to_type}"
        ),
        "labels": "/crm/associations/2026-03/{from_type}/{to_type}/labels",
        "account": "/account-info/2026-03/details",
        "usage": "/account-info/2026-03/api-usage/daily/private-apps",
    },
}

API_VERSIONS = tuple(_PATH_FAMILIES)


class ApiPaths:
    """The paths of one API version; object types are names or type ids."""

    def __init__(self, version: str):
        if version not in _PATH_FAMILIES:
            raise ValueError(
                f"Unknown HubSpot API version {version!r}; "
                f"expected one of {', '.join(API_VERSIONS)}."
            )
        self.version = version
        self._families = _PATH_FAMILIES[version]

    def _path(self, family: str, **parts) -> str:
        quoted = {name: quote(str(value), safe="") for name, value in parts.items()}
        return self._families[family].format(**quoted)

    def records_batch_read(self, object_type: str) -> str:
        return self._path("objects", object_type=object_type) + "/batch/read"

    def records_search(self, object_type: str) -> str:
        return self._path("objects", object_type=object_type) + "/search"

    def associations_batch(self, from_type: str, to_type: str, action: str) -> str:
        """``action`` is ``read``, ``create`` or ``associate/default``."""
        base = self._path("associations", from_type=from_type, to_type=to_type)
        return f"{base}/batch/{action}"

    def record_associations(self, from_type: str, record_id: int, to_type: str) -> str:
        return self._path(
            "record_associations", from_type=from_type, id=record_id, to_type=to_type
        )

    def labels(self, from_type: str, to_type: str) -> str:
        return self._path("labels", from_type=from_type, to_type=to_type)

    def account_details(self) -> str:
        return self._path("account")

    def daily_usage(self) -> str:
        return self._path("usage")


class HubSpotClient:
    """Calls HubSpot with one access token over one reused connection pool.

    ``api_calls`` counts the requests sent, failed ones included.
    ``last_rate_limit`` holds the ``X-HubSpot-RateLimit-*`` headers of the latest
    answer that carried any (search answers carry none), as ints keyed ``max``,
    ``remaining``, ``interval_milliseconds``, ``daily`` and ``daily_remaining``.
    ``before_request``, when set, is called with the kind of each call
    (``objects``, ``search``, ``associations``, ``labels``, ``account``,
    ``usage``) just before it is sent; a rate limiter waits or raises there.
    ``after_answer``, when set, is called with the kind, the status, that
    answer's rate-limit headers (as in ``last_rate_limit``, or None) and the
    error about to be raised (or None) for every answer HubSpot gave.
    """

    def __init__(
        self,
        *,
        token: str,
        base_url: str,
        api_version: str,
        timeout: float,
        session: requests.Session | None = None,
    ):
        self.paths = ApiPaths(api_version)
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.api_calls = 0
        self.last_rate_limit: dict[str, int] | None = None
        self.before_request: Callable[[str], None] | None = None
        self.after_answer: (
            Callable[[str, int, dict[str, int] | None, HubSpotError | None], None]
            | None
        ) = None

        self._token = token
        self._owns_session = session is None
        self._session = requests.Session() if session is None else session
        self._headers = {
            "Authorization": f"Bearer {token}",
            "Accept": "application/json",
        }

    def __repr__(self) -> str:
        return f"<HubSpotClient {self.base_url} {self.paths.version}>"

    def close(self) -> None:
        if self._owns_session:
            self._session.close()

    def __enter__(self) -> "HubSpotClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # Records

    def read_records(
        self, object_type: str, ids: Iterable[int], properties: Sequence[str]
    ) -> RecordsRead:
        """Read records by id. Only ids HubSpot reports as not found are missing."""
        read = RecordsRead()
        path = self.paths.records_batch_read(object_type)

        for chunk in _chunks(_unique_ids(ids), RECORDS_PER_BATCH_READ):
            answer = self._call(
                "objects",
                "POST",
                path,
                body={
                    "properties": list(properties),
                    # Required by the published schema; no history is wanted.
                    "propertiesWithHistory": [],
                    "inputs": [{"id": str(record_id)} for record_id in chunk],
                },
            )

            for result in answer.get("results") or []:
                read.records[_to_id(result["id"])] = dict(
                    result.get("properties") or {}
                )
            for error in answer.get("errors") or []:
                read.missing.update(_context_ids(error, ("ids",)))

        return read

    def search(
        self,
        object_type: str,
        property_name: str,
        values: Iterable[str],
        properties: Sequence[str],
    ) -> list[dict]:
        """Records whose ``property_name`` is one of ``values`` (case-insensitive).

        Search sees a new record only seconds after it was written; read by id
        when the id is known.
        """
        # IN on a string property matches only lowercase values.
        wanted = list(dict.fromkeys(str(v).lower() for v in values if str(v)))
        path = self.paths.records_search(object_type)
        found: dict[int, dict[str, str | None]] = {}

        # TODO: a query matching more than 10,000 records fails with HubSpot's 400
        # at the 10,000th; splitting it waits until a portal needs it.
        for chunk in _chunks(wanted, VALUES_PER_FILTER * FILTER_GROUPS_PER_SEARCH):
            body = {
                "filterGroups": [
                    {
                        "filters": [
                            {
                                "propertyName": property_name,
                                "operator": "IN",
                                "values": values,
                            }
                        ]
                    }
                    for values in _chunks(chunk, VALUES_PER_FILTER)
                ],
                "properties": list(properties),
                "limit": RECORDS_PER_SEARCH_PAGE,
            }
            for page in self._pages("search", path, body):
                for result in page.get("results") or []:
                    found[_to_id(result["id"])] = dict(result.get("properties") or {})

        return [
            {"id": record_id, "properties": props} for record_id, props in found.items()
        ]

    # Associations

    def read_associations(
        self, from_type: str, to_type: str, ids: Iterable[int]
    ) -> dict[int, list[Association]]:
        """Every association of each id to ``to_type``; an empty list for none."""
        path = self.paths.associations_batch(from_type, to_type, "read")
        wanted = _unique_ids(ids)
        found: dict[int, dict[int, tuple[AssociationType, ...]]] = {
            i: {} for i in wanted
        }
        # (id, paging cursor): an id with more than one page comes back with its
        # cursor and is read again in a later call.
        pending: list[tuple[int, str | None]] = [(i, None) for i in wanted]
        cursors_seen: set[tuple[int, str]] = set()

        while pending:
            chunk = pending[:IDS_PER_ASSOCIATION_READ]
            pending = pending[IDS_PER_ASSOCIATION_READ:]
            inputs = [
                {"id": str(record_id)}
                if after is None
                else {"id": str(record_id), "after": after}
                for record_id, after in chunk
            ]
            answer = self._call("associations", "POST", path, body={"inputs": inputs})

            for result in answer.get("results") or []:
                from_id = _to_id(result["from"]["id"])
                targets = found.setdefault(from_id, {})
                for target in result.get("to") or []:
                    to_id = _to_id(target["toObjectId"])
                    types = tuple(
                        _association_type(t)
                        for t in target.get("associationTypes") or []
                    )
                    known = targets.get(to_id, ())
                    targets[to_id] = known + tuple(t for t in types if t not in known)

                after = _next_after(result)
                if after is not None:
                    if (from_id, after) in cursors_seen:
                        raise PermanentError(
                            f"HubSpot repeated the paging cursor of {from_type} "
                            f"{from_id}'s associations to {to_type}."
                        )
                    cursors_seen.add((from_id, after))
                    pending.append((from_id, after))

            for error in answer.get("errors") or []:
                if not _means_no_associations(error):
                    raise _entry_error(error, self._redact)

        return {
            from_id: [Association(to_id, types) for to_id, types in targets.items()]
            for from_id, targets in found.items()
        }

    def create_associations(
        self, from_type: str, to_type: str, inputs: Sequence[AssociationInput]
    ) -> BatchWrite:
        """Write labeled associations; a pair's labels become the ones sent."""
        path = self.paths.associations_batch(from_type, to_type, "create")
        write = BatchWrite()

        for chunk in _chunks(list(inputs), INPUTS_PER_ASSOCIATION_WRITE):
            body = {
                "inputs": [
                    {
                        "from": {"id": str(item.from_id)},
                        "to": {"id": str(item.to_id)},
                        "types": [
                            {
                                "associationCategory": category,
                                "associationTypeId": type_id,
                            }
                            for category, type_id in item.types
                        ],
                    }
                    for item in chunk
                ]
            }
            status, answer = self._call_with_status(
                "associations", "POST", path, body=body
            )
            self._split_write(chunk, status, answer, write)

        return write

    def associate_default(
        self, from_type: str, to_type: str, pairs: Sequence[tuple[int, int]]
    ) -> BatchWrite:
        """Write unlabeled associations; labels a pair already has are kept."""
        path = self.paths.associations_batch(from_type, to_type, "associate/default")
        write = BatchWrite()
        inputs = [
            AssociationInput(int(from_id), int(to_id)) for from_id, to_id in pairs
        ]

        for chunk in _chunks(inputs, INPUTS_PER_ASSOCIATION_WRITE):
            body = {
                "inputs": [
                    {"from": {"id": str(item.from_id)}, "to": {"id": str(item.to_id)}}
                    for item in chunk
                ]
            }
            status, answer = self._call_with_status(
                "associations", "POST", path, body=body
            )
            self._split_write(chunk, status, answer, write)

        return write

    def label_definitions(self, from_type: str, to_type: str) -> list[AssociationType]:
        """The association types from one object type to another, unlabeled too."""
        answer = self._call("labels", "GET", self.paths.labels(from_type, to_type))
        return [_association_type(item) for item in answer.get("results") or []]

    # Account

    def account_details(self) -> dict:
        """The account's details as HubSpot sends them; ``portalId`` among them."""
        return self._call("account", "GET", self.paths.account_details())

    def daily_limit_resets_at(self) -> datetime | None:
        """When the private app's daily budget resets, from its usage report."""
        answer = self._call("usage", "GET", self.paths.daily_usage())
        for result in answer.get("results") or []:
            if not isinstance(result, dict) or not result.get("resetsAt"):
                continue
            try:
                return datetime.fromisoformat(str(result["resetsAt"]))
            except ValueError:
                continue
        return None

    # HTTP

    def _split_write(
        self,
        chunk: list[AssociationInput],
        status: int,
        answer: dict,
        write: BatchWrite,
    ) -> None:
        errors = answer.get("errors") or []
        if status != 207 and not errors:
            write.done.extend(chunk)
            return

        confirmed = {
            pair
            for result in answer.get("results") or []
            if (pair := _written_pair(result))
        }
        refusals = [(_entry_error(e, self._redact), _error_ids(e)) for e in errors]

        for item in chunk:
            if (item.from_id, item.to_id) in confirmed:
                write.done.append(item)
                continue
            refusal = next(
                (error for error, ids in refusals if _names_input(ids, item)), None
            )
            if refusal is None:
                refusal = PermanentError(
                    "HubSpot neither confirmed nor refused this association.",
                    status=status,
                )
            write.failed.append((item, refusal))

    def _pages(self, kind: str, path: str, body: dict) -> Iterator[dict]:
        """Each page of a search, following ``paging.next.after``."""
        cursors_seen: set[str] = set()
        after = None
        while True:
            page = self._call(
                kind,
                "POST",
                path,
                body=body if after is None else {**body, "after": after},
            )
            yield page

            after = _next_after(page)
            if after is None:
                return
            if after in cursors_seen:
                raise PermanentError(f"HubSpot repeated the paging cursor of {path}.")
            cursors_seen.add(after)

    def _call(self, kind: str, method: str, path: str, **kwargs) -> dict:
        return self._call_with_status(kind, method, path, **kwargs)[1]

    def _call_with_status(
        self,
        kind: str,
        method: str,
        path: str,
        *,
        body: dict | None = None,
    ) -> tuple[int, dict]:
        """Send one request; answer (status, JSON object) or raise the tree's error."""
        if self.before_request is not None:
            self.before_request(kind)

        self.api_calls += 1
        started = time.monotonic()
        try:
            response = self._session.request(
                method,
                self.base_url + path,
                json=body,
                headers=self._headers,
                timeout=self.timeout,
            )
        except requests.Timeout as exc:
            self._log(method, path, None, started, error="timeout")
            raise TransientError(
                f"{method} {path} got no answer within {self.timeout} s."
            ) from exc
        except (
            requests.ConnectionError,
            requests.exceptions.ChunkedEncodingError,
        ) as exc:
            self._log(method, path, None, started, error="connection")
            raise TransientError(
                f"{method} {path} lost its connection to HubSpot "
                f"({type(exc).__name__})."
            ) from exc
        except requests.RequestException as exc:
            self._log(method, path, None, started, error=type(exc).__name__)
            raise PermanentError(
                f"{method} {path} could not be sent ({type(exc).__name__})."
            ) from exc

        self._log(method, path, response.status_code, started)
        limits = self._remember_rate_limit(response.headers)
        error = None
        if not 200 <= response.status_code < 300:
            error = self._status_error(method, path, response)
        if self.after_answer is not None:
            self.after_answer(kind, response.status_code, limits, error)
        if error is not None:
            raise error

        return response.status_code, self._json_object(method, path, response)

    def _json_object(self, method: str, path: str, response: requests.Response) -> dict:
        if response.status_code == 204 or not response.content:
            return {}
        try:
            answer = response.json()
        except ValueError as exc:
            # A proxy's page or a cut-off body, not HubSpot's own answer.
            raise TransientError(
                f"{method} {path} answered {response.status_code} without JSON.",
                status=response.status_code,
            ) from exc
        if not isinstance(answer, dict):
            raise PermanentError(
                f"{method} {path} answered {response.status_code} with JSON that is "
                "not an object.",
                status=response.status_code,
            )
        return answer

    def _status_error(
        self, method: str, path: str, response: requests.Response
    ) -> HubSpotError:
        status = response.status_code
        try:
            answer = response.json()
        except ValueError:
            answer = {}
        if not isinstance(answer, dict):
            answer = {}

        fields = {
            "status": status,
            "category": _text(answer.get("category") or answer.get("errorType")),
            "sub_category": _text(answer.get("subCategory")),
            "correlation_id": _text(answer.get("correlationId")),
            "context": _context(answer),
        }
        message = self._redact(
            _text(answer.get("message")) or f"{method} {path} answered {status}."
        )
        retry_after = _retry_after(response.headers.get("Retry-After"))

        if status == 429:
            return RateLimited(
                message,
                retry_after=retry_after,
                policy=_text(answer.get("policyName")),
                **fields,
            )
        if status == 423:
            retry_after = max(retry_after or 0.0, LOCKED_MIN_WAIT_SECONDS)
        if status in TRANSIENT_STATUSES:
            return TransientError(message, retry_after=retry_after, **fields)
        return PermanentError(message, **fields)

    def _remember_rate_limit(self, headers: Mapping[str, str]) -> dict | None:
        limits = {}
        for key, header in RATE_LIMIT_HEADERS.items():
            try:
                limits[key] = int(headers[header])
            except (KeyError, ValueError):
                continue
        if not limits:
            return None
        self.last_rate_limit = limits
        return limits

    def _log(self, method, path, status, started, **fields) -> None:
        ms = round((time.monotonic() - started) * 1000)
        log.debug(
            "hubspot_call", method=method, path=path, status=status, ms=ms, **fields
        )

    def _redact(self, text: str) -> str:
        return text.replace(self._token, REDACTED) if self._token else text


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _unique_ids(ids: Iterable[int]) -> list[int]:
    return list(dict.fromkeys(_to_id(i) for i in ids))


def _to_id(value) -> int:
    """HubSpot sends ids as strings or as JSON numbers; both become ints."""
    return int(str(value).strip())


def _text(value) -> str | None:
    if value is None or isinstance(value, str):
        return value
    # The published schema types subCategory as an object; answers send a string.
    return json.dumps(value, sort_keys=True)


def _context(entry: Mapping) -> dict[str, list[str]]:
    context = entry.get("context")
    if not isinstance(context, dict):
        return {}
    return {
        str(key): [str(v) for v in (value if isinstance(value, list) else [value])]
        for key, value in context.items()
    }


def _context_ids(entry: Mapping, keys: Iterable[str]) -> set[int]:
    context = _context(entry)
    ids = set()
    for key in keys:
        for value in context.get(key, []):
            try:
                ids.add(_to_id(value))
            except ValueError:
                continue
    return ids


def _error_ids(entry: Mapping) -> tuple[set[int], set[int], set[int]]:
    """(from ids, to ids, ids of either side) that a batch error names."""
    return (
        _context_ids(entry, _FROM_KEYS),
        _context_ids(entry, _TO_KEYS),
        _context_ids(entry, _ANY_KEYS),
    )


def _names_input(
    ids: tuple[set[int], set[int], set[int]], item: AssociationInput
) -> bool:
    froms, tos, either = ids
    if froms and item.from_id not in froms:
        return False
    if tos and item.to_id not in tos:
        return False
    return bool(froms or tos) or item.from_id in either or item.to_id in either


def _entry_error(entry: Mapping, redact: Callable[[str], str]) -> HubSpotError:
    """The error of one input of a batch, from its entry in ``errors``."""
    fields = {
        "category": _text(entry.get("category")),
        "sub_category": _text(entry.get("subCategory")),
        "correlation_id": _text(entry.get("correlationId") or entry.get("id")),
        "context": _context(entry),
    }
    message = redact(_text(entry.get("message")) or "HubSpot refused this input.")
    try:
        # Entries carry "status": "error" in practice, an HTTP status in the spec.
        status = int(entry.get("status"))
    except (TypeError, ValueError):
        status = None
    if status in TRANSIENT_STATUSES:
        return TransientError(message, status=status, **fields)
    return PermanentError(message, status=status, **fields)


def _means_no_associations(entry: Mapping) -> bool:
    """HubSpot's batch read reports an id without associations as an error."""
    if _text(entry.get("subCategory")) == NO_ASSOCIATIONS_FOUND:
        return True
    return entry.get("category") == OBJECT_NOT_FOUND and "fromObjectId" in _context(
        entry
    )


def _written_pair(result: Mapping) -> tuple[int, int] | None:
    """The (from, to) ids a batch write result confirms, in either answer shape."""
    try:
        if "fromObjectId" in result:
            return _to_id(result["fromObjectId"]), _to_id(result["toObjectId"])
        return _to_id(result["from"]["id"]), _to_id(result["to"]["id"])
    except (KeyError, TypeError, ValueError):
        return None


def _association_type(item: Mapping) -> AssociationType:
    return AssociationType(
        category=str(item["category"]),
        type_id=int(item["typeId"]),
        label=item.get("label") or None,
    )


def _next_after(answer: Mapping) -> str | None:
    after = ((answer.get("paging") or {}).get("next") or {}).get("after")
    return None if after in (None, "") else str(after)


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max((when - datetime.now(UTC)).total_seconds(), 0.0)
