"""The HubSpot client, against a local fake of HubSpot's API.

The fake is a WSGI app served on a loopback port; each test installs a handler
that answers like HubSpot. When HubSpot's published OpenAPI documents are at
hand, the fake first checks every request against the documents of the client's
API version and refuses one that does not fit.
"""

import copy
import functools
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from openapi_core import OpenAPI
from openapi_core.contrib.requests import RequestsOpenAPIRequest
from openapi_core.templating.paths.exceptions import PathError
from werkzeug.serving import WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

from tests.support import free_port
from workers.hubspot import (
    Association,
    AssociationInput,
    AssociationType,
    HubSpotClient,
    HubSpotError,
    PermanentError,
    RateLimited,
    TransientError,
)

TOKEN = "pat-na1-11111111-2222-3333-4444-555555555555"
PUBLISHED_URL = "https://api.hubapi.com"

# HubSpot's published documents (HUBSPOT.md section 7), by API version.
OPENAPI_DIR = Path(__file__).resolve().parents[3] / "shared" / "hubspot-openapi"
DOCUMENTS = {
    "v4": (
        "crm-objects-v3.json",
        "crm-associations-v4.json",
        "crm-associations-schema-v4.json",
        "account-info-v3.json",
    ),
    "2026-03": (
        "crm-objects-2026-03.json",
        "crm-associations-2026-03.json",
        "crm-associations-schema-2026-03.json",
        "account-info-2026-03.json",
    ),
}
# The documents mark these fields required, but HubSpot's own guides send these
# requests without them, and the client leaves them out.
OPTIONAL_AFTER_ALL = {
    "PublicObjectSearchRequest": {"after", "sorts"},
}

ALL_AT_ONCE = {
    "status": "COMPLETE",
    "startedAt": "2026-04-01T10:00:00.000Z",
    "completedAt": "2026-04-01T10:00:00.100Z",
}


def batch(results, errors=()):
    answer = {**ALL_AT_ONCE, "results": list(results)}
    if errors:
        answer.update(errors=list(errors), numErrors=len(errors))
    return answer


def record(record_id, **properties):
    return {
        "id": record_id,
        "properties": {"hs_object_id": str(record_id), **properties},
        "createdAt": "2026-04-01T09:00:00.000Z",
        "updatedAt": "2026-04-01T09:00:00.000Z",
        "archived": False,
    }


def no_associations(from_id, *, sub_category=True):
    error = {
        "status": "error",
        "category": "OBJECT_NOT_FOUND",
        "message": f"No company is associated with contact {from_id}.",
        "context": {"fromObjectId": [str(from_id)]},
        "errors": [],
        "links": {},
    }
    if sub_category:
        error["subCategory"] = "crm.associations.NO_ASSOCIATIONS_FOUND"
    return error


def hubspot_error(category, message, **fields):
    return {
        "status": "error",
        "message": message,
        "correlationId": "aeb5f871-7f07-4993-9211-075dc63e7cbf",
        "category": category,
        **fields,
    }


# The fake


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: dict | None


@dataclass
class Answer:
    status: int = 200
    body: dict | str | None = None
    headers: dict[str, str] | None = None


class Contract:
    """HubSpot's published documents of one API version, as a request checker."""

    def __init__(self, names):
        self.documents = [OpenAPI.from_dict(_loadable(name)) for name in names]

    def problem(self, seen: Seen) -> str | None:
        """Why the documents refuse this request, or None when one accepts it."""
        request = requests.Request(
            seen.method,
            PUBLISHED_URL + seen.path,
            params=seen.query,
            json=seen.body,
            headers={"Content-Type": "application/json"} if seen.body else {},
        )
        for document in self.documents:
            try:
                document.validate_request(RequestsOpenAPIRequest(request))
            except PathError:
                continue
            except Exception as exc:
                return f"{seen.method} {seen.path}: {exc}"
            return None
        return f"{seen.method} {seen.path} is in no published document"


def _loadable(name):
    document = json.loads((OPENAPI_DIR / name).read_text())
    schemas = document.get("components", {}).get("schemas", {})
    for schema_name, optional in OPTIONAL_AFTER_ALL.items():
        if schema_name in schemas:
            schema = schemas[schema_name] = copy.deepcopy(schemas[schema_name])
            schema["required"] = [f for f in schema["required"] if f not in optional]
    # The fake checks the shape of requests, not OAuth scopes.
    document.pop("security", None)
    for operations in document["paths"].values():
        for operation in operations.values():
            if isinstance(operation, dict):
                operation.pop("security", None)
    return document


@functools.cache
def contract(version) -> Contract | None:
    if not OPENAPI_DIR.is_dir():
        return None
    return Contract(DOCUMENTS[version])


class FakeHubSpot:
    def __init__(self):
        self.url = ""
        self.reset()

    def reset(self):
        self.seen: list[Seen] = []
        self.contract: Contract | None = None
        self.broken_contract: list[str] = []
        self.handler: Callable[[Seen], Answer] = lambda seen: Answer(404, {})

    def __call__(self, environ, start_response):
        request = Request(environ)
        raw = request.get_data()
        seen = Seen(
            method=request.method,
            path=request.path,
            query=dict(request.args),
            headers=dict(request.headers),
            body=json.loads(raw) if raw else None,
        )
        self.seen.append(seen)

        problem = self.contract.problem(seen) if self.contract else None
        if problem:
            self.broken_contract.append(problem)
            answer = Answer(400, hubspot_error("VALIDATION_ERROR", problem))
        else:
            answer = self.handler(seen)

        body = answer.body
        text = body if isinstance(body, str) else json.dumps(body or {})
        response = Response(
            text,
            status=answer.status,
            headers=answer.headers or {},
            content_type="application/json;charset=utf-8",
        )
        return response(environ, start_response)

    def bodies(self):
        return [seen.body for seen in self.seen]


class QuietRequestHandler(WSGIRequestHandler):
    def log_request(self, *args, **kwargs):
        pass


@pytest.fixture(scope="module")
def hubspot_server():
    fake = FakeHubSpot()
    server = make_server(
        "127.0.0.1", 0, fake, threaded=True, request_handler=QuietRequestHandler
    )
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_port}"
    yield fake
    server.shutdown()
    server.server_close()


@pytest.fixture
def hubspot(hubspot_server):
    hubspot_server.reset()
    yield hubspot_server
    assert hubspot_server.broken_contract == []


@pytest.fixture
def make_client(hubspot):
    clients = []

    def make(version="2026-03", timeout=2.0):
        hubspot.contract = contract(version)
        client = HubSpotClient(
            token=TOKEN, base_url=hubspot.url, api_version=version, timeout=timeout
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def client(make_client):
    return make_client()


# Paths


def every_call(client):
    client.read_records("0-1", [1], ["email"])
    client.search("0-2", "domain", ["example.com"], ["domain"])
    client.read_associations("0-1", "0-2", [1])
    client.create_associations(
        "0-1", "0-2", [AssociationInput(1, 2, (("HUBSPOT_DEFINED", 279),))]
    )
    client.associate_default("0-1", "0-2", [(1, 2)])
    client.label_definitions("0-1", "0-2")
    client.account_details()


def answer_every_call(seen):
    if seen.path.endswith("/details"):
        return Answer(200, {"portalId": 62515, "timeZone": "Europe/Berlin"})
    if seen.path.endswith("/labels"):
        return Answer(200, {"results": []})
    if seen.path.endswith("/search"):
        return Answer(200, {"total": 0, "results": []})
    if seen.path.endswith("/batch/create"):
        return Answer(201, batch([]))
    return Answer(200, batch([]))


EXPECTED_PATHS = {
    "v4": [
        ("POST", "/crm/v3/objects/0-1/batch/read"),
        ("POST", "/crm/v3/objects/0-2/search"),
        ("POST", "/crm/v4/associations/0-1/0-2/batch/read"),
        ("POST", "/crm/v4/associations/0-1/0-2/batch/create"),
        ("POST", "/crm/v4/associations/0-1/0-2/batch/associate/default"),
        ("GET", "/crm/associations/v4/0-1/0-2/labels"),
        ("GET", "/account-info/v3/details"),
    ],
    "2026-03": [
        ("POST", "/crm/objects/2026-03/0-1/batch/read"),
        ("POST", "/crm/objects/2026-03/0-2/search"),
        ("POST", "/crm/associations/2026-03/0-1/0-2/batch/read"),
        ("POST", "/crm/associations/2026-03/0-1/0-2/batch/create"),
        ("POST", "/crm/associations/2026-03/0-1/0-2/batch/associate/default"),
        ("GET", "/crm/associations/2026-03/0-1/0-2/labels"),
        ("GET", "/account-info/2026-03/details"),
    ],
}


@pytest.mark.parametrize("version", ["v4", "2026-03"])
def test_each_call_uses_the_paths_of_its_api_version(hubspot, make_client, version):
    client = make_client(version)
    hubspot.handler = answer_every_call

    every_call(client)

    assert [(s.method, s.path) for s in hubspot.seen] == EXPECTED_PATHS[version]


def test_an_unknown_api_version_is_refused():
    with pytest.raises(ValueError, match="v4"):
        HubSpotClient(token=TOKEN, base_url=PUBLISHED_URL, api_version="v3", timeout=1)


def test_every_call_carries_the_bearer_token_counts_and_asks_the_hook(hubspot, client):
    hubspot.handler = answer_every_call
    kinds = []
    client.before_request = kinds.append

    every_call(client)

    assert {s.headers["Authorization"] for s in hubspot.seen} == {f"Bearer {TOKEN}"}
    assert client.api_calls == len(hubspot.seen) == 7
    assert kinds == [
        "objects",
        "search",
        "associations",
        "associations",
        "associations",
        "labels",
        "account",
    ]


def test_a_hook_that_raises_stops_the_call_before_it_is_sent(hubspot, client):
    def refuse(kind):
        raise RuntimeError(f"no budget for {kind}")

    client.before_request = refuse

    with pytest.raises(RuntimeError, match="no budget for account"):
        client.account_details()
    assert hubspot.seen == []
    assert client.api_calls == 0


# Records


def test_record_reads_go_in_batches_of_100(hubspot, client):
    def answer(seen):
        ids = [int(i["id"]) for i in seen.body["inputs"]]
        return Answer(200, batch(record(i, email=f"{i}@example.com") for i in ids))

    hubspot.handler = answer

    read = client.read_records("0-1", range(1, 251), ["email", "hs_email_domain"])

    assert [len(b["inputs"]) for b in hubspot.bodies()] == [100, 100, 50]
    first = hubspot.bodies()[0]
    assert first == {
        "properties": ["email", "hs_email_domain"],
        "propertiesWithHistory": [],
        "inputs": [{"id": str(i)} for i in range(1, 101)],
    }
    assert sorted(read.records) == list(range(1, 251))
    assert read.records[250]["email"] == "250@example.com"
    assert read.missing == set()


def test_a_record_read_reports_missing_only_the_ids_listed_in_errors(hubspot, client):
    hubspot.handler = lambda seen: Answer(
        207,
        batch(
            # HubSpot sends this id as a string; the client takes numbers too.
            [record(101, email=None), record("102", email="b@example.com")],
            errors=[
                hubspot_error(
                    "OBJECT_NOT_FOUND",
                    "Could not get some CONTACT objects, they may be deleted or "
                    "not exist. Check that ids are valid.",
                    context={"ids": ["103", "104"]},
                    errors=[],
                    links={},
                )
            ],
        ),
    )

    read = client.read_records("contacts", [101, 102, 103, 104, 105], ["email"])

    assert read.records[101]["email"] is None
    assert read.records[102]["email"] == "b@example.com"
    assert read.missing == {103, 104}
    # Answered for by neither list: not reported missing.
    assert 105 not in read.records and 105 not in read.missing


def test_no_ids_make_no_calls(hubspot, client):
    assert client.read_records("0-1", [], ["email"]).records == {}
    assert client.read_associations("0-1", "0-2", []) == {}
    assert client.search("0-2", "domain", [], ["domain"]) == []
    assert client.create_associations("0-1", "0-2", []).done == []
    assert hubspot.seen == []


def test_search_sends_lowercase_values_in_or_groups_and_follows_paging(hubspot, client):
    def answer(seen):
        values = seen.body["filterGroups"][0]["filters"][0]["values"]
        if values[0] != "d0.example.com":
            return Answer(200, {"total": 1, "results": [record(900, domain=values[0])]})
        if "after" not in seen.body:
            return Answer(
                200,
                {
                    "total": 3,
                    "results": [record(1, domain="d0.example.com"), record(2)],
                    "paging": {"next": {"after": "2", "link": "https://x/?after=2"}},
                },
            )
        return Answer(200, {"total": 3, "results": [record(3), record(2)]})

    hubspot.handler = answer
    values = [f"D{i}.Example.COM" for i in range(550)]

    found = client.search("companies", "domain", values, ["domain", "name"])

    bodies = hubspot.bodies()
    assert len(bodies) == 3
    # Five OR'ed groups of 100 values each: 500 values a search.
    assert bodies[0] == {
        "filterGroups": [
            {
                "filters": [
                    {
                        "propertyName": "domain",
                        "operator": "IN",
                        "values": [f"d{i}.example.com" for i in range(g, g + 100)],
                    }
                ]
            }
            for g in range(0, 500, 100)
        ],
        "properties": ["domain", "name"],
        "limit": 200,
    }
    assert bodies[1] == {**bodies[0], "after": "2"}
    assert [len(g["filters"][0]["values"]) for g in bodies[2]["filterGroups"]] == [50]
    assert [r["id"] for r in found] == [1, 2, 3, 900]
    assert found[0] == {
        "id": 1,
        "properties": {"hs_object_id": "1", "domain": "d0.example.com"},
    }


# Association reads


def test_association_reads_go_in_batches_of_1000(hubspot, client):
    def answer(seen):
        ids = [i["id"] for i in seen.body["inputs"]]
        return Answer(200, batch({"from": {"id": i}, "to": []} for i in ids))

    hubspot.handler = answer

    found = client.read_associations("0-1", "0-2", range(1, 2501))

    assert [len(b["inputs"]) for b in hubspot.bodies()] == [1000, 1000, 500]
    assert hubspot.bodies()[0]["inputs"][0] == {"id": "1"}
    assert sorted(found) == list(range(1, 2501))
    assert found[2500] == []


def test_no_associations_found_is_an_empty_list_not_an_error(hubspot, client):
    hubspot.handler = lambda seen: Answer(
        207,
        batch(
            [
                {
                    # Real answers carry these ids as JSON numbers.
                    "from": {"id": 1},
                    "to": [
                        {
                            "toObjectId": 10,
                            "associationTypes": [
                                {
                                    "category": "HUBSPOT_DEFINED",
                                    "typeId": 1,
                                    "label": "Primary",
                                },
                                {
                                    "category": "HUBSPOT_DEFINED",
                                    "typeId": 279,
                                    "label": None,
                                },
                            ],
                        }
                    ],
                }
            ],
            errors=[no_associations(2), no_associations(3, sub_category=False)],
        ),
    )

    found = client.read_associations("0-1", "0-2", [1, 2, 3])

    assert found == {
        1: [
            Association(
                10,
                (
                    AssociationType("HUBSPOT_DEFINED", 1, "Primary"),
                    AssociationType("HUBSPOT_DEFINED", 279, None),
                ),
            )
        ],
        2: [],
        3: [],
    }


def test_other_association_read_errors_are_permanent(hubspot, client):
    hubspot.handler = lambda seen: Answer(
        207,
        batch(
            [],
            errors=[
                hubspot_error(
                    "VALIDATION_ERROR",
                    "Unable to infer object type from: 0-999",
                    subCategory="crm.associations.INVALID_OBJECT_TYPE",
                    context={},
                    errors=[],
                    links={},
                )
            ],
        ),
    )

    with pytest.raises(PermanentError) as caught:
        client.read_associations("0-1", "0-999", [1])
    assert caught.value.category == "VALIDATION_ERROR"
    assert caught.value.sub_category == "crm.associations.INVALID_OBJECT_TYPE"


def test_an_association_read_follows_each_records_paging_cursor(hubspot, client):
    unlabeled = {"category": "HUBSPOT_DEFINED", "typeId": 279, "label": None}

    def answer(seen):
        results = []
        for item in seen.body["inputs"]:
            if item["id"] == "1" and "after" not in item:
                results.append(
                    {
                        "from": {"id": "1"},
                        "to": [{"toObjectId": "10", "associationTypes": [unlabeled]}],
                        "paging": {"next": {"after": "MTA%3D"}},
                    }
                )
            elif item["id"] == "1":
                assert item["after"] == "MTA%3D"
                results.append(
                    {
                        "from": {"id": "1"},
                        "to": [{"toObjectId": 11, "associationTypes": [unlabeled]}],
                    }
                )
            else:
                results.append({"from": {"id": item["id"]}, "to": []})
        return Answer(200, batch(results))

    hubspot.handler = answer

    found = client.read_associations("0-1", "0-2", [1, 2])

    assert [b["inputs"] for b in hubspot.bodies()] == [
        [{"id": "1"}, {"id": "2"}],
        [{"id": "1", "after": "MTA%3D"}],
    ]
    assert [a.to_id for a in found[1]] == [10, 11]
    assert found[2] == []


# Association writes


def test_create_sends_each_inputs_types_and_201_means_all_done(hubspot, client):
    def answer(seen):
        return Answer(
            201,
            batch(
                {
                    "fromObjectTypeId": "0-1",
                    "fromObjectId": int(i["from"]["id"]),
                    "toObjectTypeId": "0-2",
                    "toObjectId": int(i["to"]["id"]),
                    "labels": ["Primary"],
                }
                for i in seen.body["inputs"]
            ),
        )

    hubspot.handler = answer
    inputs = [
        AssociationInput(
            i, 1000 + i, (("HUBSPOT_DEFINED", 279), ("HUBSPOT_DEFINED", 1))
        )
        for i in range(150)
    ]

    write = client.create_associations("0-1", "0-2", inputs)

    assert [len(b["inputs"]) for b in hubspot.bodies()] == [100, 50]
    assert hubspot.bodies()[0]["inputs"][0] == {
        "from": {"id": "0"},
        "to": {"id": "1000"},
        "types": [
            {"associationCategory": "HUBSPOT_DEFINED", "associationTypeId": 279},
            {"associationCategory": "HUBSPOT_DEFINED", "associationTypeId": 1},
        ],
    }
    assert write.done == inputs
    assert write.failed == []


def test_a_207_create_is_split_per_input(hubspot, client):
    confirmed = AssociationInput(1, 10, (("USER_DEFINED", 37),))
    refused = AssociationInput(2, 20, (("USER_DEFINED", 37),))
    unexplained = AssociationInput(3, 30, (("USER_DEFINED", 37),))
    hubspot.handler = lambda seen: Answer(
        207,
        batch(
            [
                {
                    "fromObjectTypeId": "0-1",
                    "fromObjectId": 1,
                    "toObjectTypeId": "0-2",
                    "toObjectId": 10,
                    "labels": ["Billing contact"],
                }
            ],
            errors=[
                hubspot_error(
                    "VALIDATION_ERROR",
                    "Object 20 of type 0-2 does not exist.",
                    subCategory="crm.associations.INVALID_OBJECT_IDS",
                    context={"toObjectId": ["20"], "toObjectType": ["0-2"]},
                    errors=[],
                    links={},
                )
            ],
        ),
    )

    write = client.create_associations("0-1", "0-2", [confirmed, refused, unexplained])

    assert write.done == [confirmed]
    assert [item for item, _ in write.failed] == [refused, unexplained]
    error = write.failed[0][1]
    assert isinstance(error, PermanentError)
    assert error.category == "VALIDATION_ERROR"
    assert error.sub_category == "crm.associations.INVALID_OBJECT_IDS"
    assert error.message == "Object 20 of type 0-2 does not exist."
    assert isinstance(write.failed[1][1], PermanentError)


def test_associate_default_sends_pairs_only_and_splits_the_errors_of_a_200(
    hubspot, client
):
    unlabeled = {"associationCategory": "HUBSPOT_DEFINED", "associationTypeId": 279}
    hubspot.handler = lambda seen: Answer(
        200,
        {
            **batch(
                [
                    {
                        "from": {"id": "1"},
                        "to": {"id": "10"},
                        "associationSpec": unlabeled,
                    },
                    {"from": {"id": 3}, "to": {"id": 30}, "associationSpec": unlabeled},
                ],
                errors=[
                    hubspot_error(
                        "OBJECT_NOT_FOUND",
                        "No contact with id 2.",
                        context={"fromObjectId": ["2"]},
                        errors=[],
                        links={},
                    )
                ],
            ),
        },
    )

    write = client.associate_default("0-1", "0-2", [(1, 10), (2, 20), (3, 30)])

    assert hubspot.bodies() == [
        {
            "inputs": [
                {"from": {"id": "1"}, "to": {"id": "10"}},
                {"from": {"id": "2"}, "to": {"id": "20"}},
                {"from": {"id": "3"}, "to": {"id": "30"}},
            ]
        }
    ]
    assert write.done == [AssociationInput(1, 10), AssociationInput(3, 30)]
    [(item, error)] = write.failed
    assert item == AssociationInput(2, 20)
    assert error.category == "OBJECT_NOT_FOUND"


def test_a_whole_write_that_fails_is_raised_for_the_caller_to_retry(hubspot, client):
    hubspot.handler = lambda seen: Answer(
        503, hubspot_error("SERVICE_UNAVAILABLE", "Try again later.")
    )

    with pytest.raises(TransientError) as caught:
        client.associate_default("0-1", "0-2", [(1, 10)])
    assert caught.value.status == 503


# Labels and account


def test_label_definitions_keep_the_unlabeled_type_with_label_none(hubspot, client):
    hubspot.handler = lambda seen: Answer(
        200,
        {
            "results": [
                {"category": "HUBSPOT_DEFINED", "typeId": 279},
                {"category": "HUBSPOT_DEFINED", "typeId": 1, "label": "Primary"},
                {"category": "USER_DEFINED", "typeId": 37, "label": "Billing contact"},
            ]
        },
    )

    assert client.label_definitions("0-1", "0-2") == [
        AssociationType("HUBSPOT_DEFINED", 279, None),
        AssociationType("HUBSPOT_DEFINED", 1, "Primary"),
        AssociationType("USER_DEFINED", 37, "Billing contact"),
    ]


def test_account_details_are_hubspots_json(hubspot, client):
    details = {
        "portalId": 62515,
        "timeZone": "US/Eastern",
        "uiDomain": "app.hubspot.com",
    }
    hubspot.handler = lambda seen: Answer(200, details)

    assert client.account_details() == details


# Errors


@pytest.mark.parametrize(
    ("headers", "body", "retry_after", "policy"),
    [
        (
            {"Retry-After": "3"},
            {
                "status": "error",
                "message": "You have reached your ten_secondly_rolling limit.",
                "errorType": "RATE_LIMIT",
                "policyName": "TEN_SECONDLY_ROLLING",
                "correlationId": "c0ffee",
            },
            3.0,
            "TEN_SECONDLY_ROLLING",
        ),
        (
            {},
            {
                "status": "error",
                "message": "You have reached your daily limit.",
                "errorType": "RATE_LIMIT",
                "policyName": "DAILY",
                "correlationId": "c0ffee",
            },
            None,
            "DAILY",
        ),
    ],
)
def test_a_429_is_rate_limited_with_its_policy(
    hubspot, client, headers, body, retry_after, policy
):
    hubspot.handler = lambda seen: Answer(429, body, headers)

    with pytest.raises(RateLimited) as caught:
        client.read_records("0-1", [1], ["email"])

    error = caught.value
    assert isinstance(error, TransientError)
    assert error.status == 429
    assert error.retry_after == retry_after
    assert error.policy == policy
    assert error.category == "RATE_LIMIT"
    assert error.correlation_id == "c0ffee"
    assert error.message == body["message"]


@pytest.mark.parametrize(
    ("status", "headers", "retry_after"),
    [
        (423, {}, 2.0),
        (477, {"Retry-After": "30"}, 30.0),
        (502, {}, None),
        (503, {"Retry-After": "1.5"}, 1.5),
        (521, {}, None),
    ],
)
def test_these_statuses_are_transient(hubspot, client, status, headers, retry_after):
    hubspot.handler = lambda seen: Answer(status, "<html>bad gateway</html>", headers)

    with pytest.raises(TransientError) as caught:
        client.account_details()

    assert not isinstance(caught.value, RateLimited)
    assert caught.value.status == status
    assert caught.value.retry_after == retry_after


@pytest.mark.parametrize(
    ("status", "category", "message"),
    [
        (400, "VALIDATION_ERROR", "Property values were not valid"),
        (
            403,
            "MISSING_SCOPES",
            "This app hasn't been granted all required scopes to make this call.",
        ),
        (404, "OBJECT_NOT_FOUND", "resource not found"),
    ],
)
def test_other_4xx_are_permanent(hubspot, client, status, category, message):
    hubspot.handler = lambda seen: Answer(
        status,
        hubspot_error(category, message, subCategory="some.SUB_CATEGORY"),
    )

    with pytest.raises(PermanentError) as caught:
        client.label_definitions("0-1", "0-2")

    error = caught.value
    assert error.status == status
    assert error.category == category
    assert error.sub_category == "some.SUB_CATEGORY"
    assert error.message == message
    assert error.correlation_id == "aeb5f871-7f07-4993-9211-075dc63e7cbf"


def test_a_timeout_is_transient_without_a_status(hubspot, make_client):
    client = make_client(timeout=0.2)

    def slow(seen):
        time.sleep(0.5)
        return Answer(200, {})

    hubspot.handler = slow
    started = time.monotonic()

    with pytest.raises(TransientError) as caught:
        client.account_details()

    assert time.monotonic() - started < 0.45
    assert caught.value.status is None
    assert caught.value.retry_after is None
    assert isinstance(caught.value.__cause__, requests.Timeout)
    assert client.api_calls == 1


def test_a_refused_connection_is_transient_without_a_status():
    client = HubSpotClient(
        token=TOKEN,
        base_url=f"http://127.0.0.1:{free_port()}",
        api_version="v4",
        timeout=1,
    )

    with pytest.raises(TransientError) as caught:
        client.account_details()
    assert caught.value.status is None
    assert isinstance(caught.value.__cause__, requests.ConnectionError)


def test_a_success_without_json_is_transient(hubspot, client):
    hubspot.handler = lambda seen: Answer(200, "<html>maintenance</html>")

    with pytest.raises(TransientError):
        client.account_details()


# Rate-limit headers


def test_the_rate_limit_headers_of_the_latest_answer_are_kept(hubspot, client):
    headers = {
        "X-HubSpot-RateLimit-Max": "190",
        "X-HubSpot-RateLimit-Remaining": "187",
        "X-HubSpot-RateLimit-Interval-Milliseconds": "10000",
        "X-HubSpot-RateLimit-Daily": "625000",
        "X-HubSpot-RateLimit-Daily-Remaining": "624321",
    }
    hubspot.handler = lambda seen: Answer(200, {"portalId": 1}, headers)
    assert client.last_rate_limit is None

    client.account_details()

    assert client.last_rate_limit == {
        "max": 190,
        "remaining": 187,
        "interval_milliseconds": 10000,
        "daily": 625000,
        "daily_remaining": 624321,
    }

    # Search answers carry no such headers; what is known stays.
    hubspot.handler = lambda seen: Answer(200, {"total": 0, "results": []})
    client.search("0-2", "domain", ["example.com"], ["domain"])
    assert client.last_rate_limit["remaining"] == 187


# The token


def test_the_token_is_in_no_error_and_no_log_line(hubspot, make_client, caplog):
    caplog.set_level(logging.DEBUG, logger="workers.hubspot")
    client = make_client(timeout=0.2)
    echoes = iter(
        [
            Answer(401, hubspot_error("INVALID_AUTHENTICATION", f"Bad token {TOKEN}")),
            Answer(429, {"message": f"limit for {TOKEN}", "policyName": "DAILY"}),
            Answer(
                207,
                batch(
                    [],
                    errors=[
                        hubspot_error(
                            "VALIDATION_ERROR",
                            f"{TOKEN} may not",
                            context={"toObjectId": ["2"]},
                        )
                    ],
                ),
            ),
            Answer(200, {"results": []}),
        ]
    )

    def answer(seen):
        if seen.path.endswith("/labels"):
            time.sleep(0.5)
        return next(echoes)

    hubspot.handler = answer
    errors: list[HubSpotError] = []
    for call in (
        client.account_details,
        client.account_details,
        lambda: errors.extend(
            e for _, e in client.associate_default("0-1", "0-2", [(1, 2)]).failed
        ),
        lambda: client.label_definitions("0-1", "0-2"),
    ):
        try:
            call()
        except HubSpotError as exc:
            errors.append(exc)

    assert len(errors) == 4
    texts = [repr(client)]
    for error in errors:
        texts += [str(error), repr(error), error.message, repr(vars(error))]
        if error.__cause__ is not None:
            texts.append(str(error.__cause__))
    lines = [r for r in caplog.records if r.name == "workers.hubspot"]
    texts += [r.getMessage() + repr(r.fields) for r in lines]
    assert len(lines) == 4
    assert [t for t in texts if TOKEN in t] == []


def test_each_call_logs_one_debug_line(hubspot, client, caplog):
    caplog.set_level(logging.DEBUG, logger="workers.hubspot")
    hubspot.handler = lambda seen: Answer(200, {"portalId": 1})

    client.account_details()

    [line] = [r for r in caplog.records if r.name == "workers.hubspot"]
    assert line.levelno == logging.DEBUG
    assert line.getMessage() == "hubspot_call"
    assert line.fields["method"] == "GET"
    assert line.fields["path"] == "/account-info/2026-03/details"
    assert line.fields["status"] == 200
    assert isinstance(line.fields["ms"], int)
