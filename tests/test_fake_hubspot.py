"""The HubSpot fake behaves as HUBSPOT.md says HubSpot does.

End-to-end tests trust the fake to be as strict and as surprising as HubSpot; these
tests pin down each behaviour they rely on, over real HTTP.
"""

import json
import time
from datetime import datetime

import pytest
import requests

from tests.hubspot_fake import FakeHubSpot

NUMBERED = {
    "objects": "/crm/v3/objects",
    "pairs": "/crm/v4/associations",
    "records": "/crm/v4/objects",
    "labels": "/crm/v4/associations",
    "account": "/account-info/v3",
}
DATED = {
    "objects": "/crm/objects/2026-03",
    "pairs": "/crm/associations/2026-03",
    "records": "/crm/objects/2026-03",
    "labels": "/crm/associations/2026-03",
    "account": "/account-info/2026-03",
}
# The v4 labels path of HubSpot's published schema document.
SCHEMA_V4 = {**NUMBERED, "labels": "/crm/associations/v4"}

UNLABELED = ("HUBSPOT_DEFINED", 279)
UNLABELED_BACK = ("HUBSPOT_DEFINED", 280)
PRIMARY = ("HUBSPOT_DEFINED", 1)
PRIMARY_BACK = ("HUBSPOT_DEFINED", 2)


class Api:
    """HTTP calls to the fake, as a client would make them."""

    def __init__(self, fake: FakeHubSpot, paths=NUMBERED, token=None):
        self.fake = fake
        self.paths = paths
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token or fake.token}"
        self.timeout = 5.0

    def request(self, method, path, body=None, **params) -> requests.Response:
        return self.session.request(
            method, self.fake.url + path, json=body, params=params, timeout=self.timeout
        )

    def read(self, object_type, ids, properties=()):
        return self.request(
            "POST",
            f"{self.paths['objects']}/{object_type}/batch/read",
            {"inputs": [{"id": str(i)} for i in ids], "properties": list(properties)},
        )

    def search(self, object_type, body):
        return self.request(
            "POST", f"{self.paths['objects']}/{object_type}/search", body
        )

    def read_associations(self, from_type, to_type, ids):
        return self.request(
            "POST",
            f"{self.paths['pairs']}/{from_type}/{to_type}/batch/read",
            {"inputs": [{"id": str(i)} for i in ids]},
        )

    def create(self, from_type, to_type, *inputs):
        """``inputs``: (from id, to id, [(category, type id), ...])."""
        return self.request(
            "POST",
            f"{self.paths['pairs']}/{from_type}/{to_type}/batch/create",
            {
                "inputs": [
                    {
                        "from": {"id": str(from_id)},
                        "to": {"id": str(to_id)},
                        "types": [
                            {"associationCategory": c, "associationTypeId": t}
                            for c, t in types
                        ],
                    }
                    for from_id, to_id, types in inputs
                ]
            },
        )

    def default(self, from_type, to_type, *pairs):
        return self.request(
            "POST",
            f"{self.paths['pairs']}/{from_type}/{to_type}/batch/associate/default",
            {
                "inputs": [
                    {"from": {"id": str(f)}, "to": {"id": str(t)}} for f, t in pairs
                ]
            },
        )

    def labels(self, from_type, to_type):
        return self.request(
            "GET", f"{self.paths['labels']}/{from_type}/{to_type}/labels"
        )


@pytest.fixture
def hubspot():
    with FakeHubSpot() as fake:
        yield fake
        assert fake.internal_errors == []


@pytest.fixture
def api(hubspot):
    return Api(hubspot)


def contact_and_company(hubspot):
    return (
        hubspot.add_record("contacts", {"email": "ada@example.com"}),
        hubspot.add_record("companies", {"domain": "example.com"}),
    )


# Authentication and routing


@pytest.mark.parametrize("token", [None, "pat-na1-wrong"])
def test_refuses_a_call_without_the_right_bearer_token(hubspot, token):
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}

    answer = requests.get(
        hubspot.url + "/account-info/v3/details", headers=headers, timeout=5
    )

    assert answer.status_code == 401
    body = answer.json()
    assert body["status"] == "error"
    assert body["category"] == "INVALID_AUTHENTICATION"
    assert body["correlationId"] and body["message"]
    assert hubspot.calls[-1]["status"] == 401


def test_answers_404_for_an_unknown_path_and_405_for_a_wrong_method(api):
    assert api.request("GET", "/crm/v5/nothing").status_code == 404
    assert (
        api.request("GET", "/crm/v4/associations/0-1/0-2/batch/read").status_code == 405
    )


def test_refuses_an_unknown_object_type(api):
    answer = api.read("widgets", [1])

    assert answer.status_code == 400
    assert answer.json()["message"] == "Unable to infer object type from: widgets"


# Records


def test_record_ids_come_from_a_range_of_their_type(hubspot):
    first = hubspot.add_record("contacts", {})
    second = hubspot.add_record("0-1", {})
    third = hubspot.add_record("contact", {})
    company = hubspot.add_record("companies", {})
    custom = hubspot.add_record("2-123", {})

    assert second == first + 1 and third == second + 1
    assert len({first // 1_000_000, company // 1_000_000, custom // 1_000_000}) == 3
    assert hubspot.add_record("deals", {}, record_id=77) == 77
    with pytest.raises(ValueError):
        hubspot.add_record("deals", {}, record_id=77)


def test_batch_read_answers_207_naming_the_missing_ids(hubspot, api):
    contact = hubspot.add_record("contacts", {"email": "ada@example.com", "age": 36})

    answer = api.read("contacts", [contact, 404, 405], ["email", "age", "phone"])

    assert answer.status_code == 207
    body = answer.json()
    (record,) = body["results"]
    assert record["id"] == str(contact)
    assert record["properties"]["email"] == "ada@example.com"
    assert record["properties"]["age"] == "36"
    assert record["properties"]["phone"] is None
    assert body["numErrors"] == 1
    (error,) = body["errors"]
    assert error["category"] == "OBJECT_NOT_FOUND"
    assert error["context"] == {"ids": ["404", "405"]}


def test_batch_read_of_existing_records_answers_200(hubspot, api):
    contact = hubspot.add_record("contacts", {"email": "ada@example.com"})

    answer = api.read("0-1", [contact], ["hs_email_domain"])

    assert answer.status_code == 200
    assert "errors" not in answer.json()
    assert answer.json()["results"][0]["properties"]["hs_email_domain"] == "example.com"


def test_batch_read_refuses_more_than_100_inputs(api):
    answer = api.read("contacts", range(1, 102))

    assert answer.status_code == 400
    assert answer.json()["category"] == "VALIDATION_ERROR"


def test_single_read_answers_404_for_a_missing_record(hubspot, api):
    contact = hubspot.add_record("contacts", {"email": "ada@example.com"})

    found = api.request(
        "GET", f"/crm/v3/objects/contacts/{contact}", properties="email"
    )
    missing = api.request("GET", "/crm/objects/2026-03/contacts/404")

    assert found.status_code == 200
    assert found.json()["properties"]["email"] == "ada@example.com"
    assert missing.status_code == 404
    assert missing.json()["category"] == "OBJECT_NOT_FOUND"
    assert hubspot.call_count("single_read") == 2


# Search


def in_filter(name, values):
    return {"filters": [{"propertyName": name, "operator": "IN", "values": values}]}


def test_search_matches_case_insensitively_and_pages(hubspot, api):
    ids = [hubspot.add_record("companies", {"domain": d}) for d in ("A.com", "b.com")]
    hubspot.add_record("companies", {"domain": "c.com"})
    body = {
        "filterGroups": [in_filter("domain", ["a.com", "B.COM"])],
        "properties": ["domain"],
        "limit": 1,
    }

    first = api.search("companies", body).json()
    second = api.search(
        "companies", {**body, "after": first["paging"]["next"]["after"]}
    )

    assert first["total"] == 2
    assert [r["id"] for r in first["results"]] == [str(ids[0])]
    assert [r["id"] for r in second.json()["results"]] == [str(ids[1])]
    assert "paging" not in second.json()


def test_search_does_not_see_a_new_record_until_the_lag_has_passed():
    with FakeHubSpot(search_lag_seconds=0.2) as hubspot:
        api = Api(hubspot)
        company = hubspot.add_record("companies", {"domain": "example.com"})
        body = {"filterGroups": [in_filter("domain", ["example.com"])], "limit": 10}

        assert api.search("companies", body).json()["total"] == 0
        # Reads by id see it at once.
        assert api.read("companies", [company]).status_code == 200

        time.sleep(0.25)
        assert api.search("companies", body).json()["total"] == 1


@pytest.mark.parametrize(
    "body",
    [
        {"filterGroups": [in_filter("domain", ["a"])] * 6},
        {"filterGroups": [{"filters": in_filter("domain", ["a"])["filters"] * 7}]},
        {"filterGroups": [{"filters": in_filter("domain", ["a"])["filters"] * 5}] * 4},
        {"filterGroups": [], "limit": 201},
        {
            "filterGroups": [
                {"filters": [{"propertyName": "domain", "operator": "LIKE"}]}
            ]
        },
    ],
    ids=["6 groups", "7 filters", "20 filters", "limit 201", "operator"],
)
def test_search_refuses_what_hubspot_refuses(api, body):
    answer = api.search("companies", body)

    assert answer.status_code == 400
    assert answer.json()["category"] == "VALIDATION_ERROR"


def test_search_answers_429_beyond_five_a_second_without_rate_limit_headers(
    hubspot, api
):
    answers = [api.search("contacts", {"limit": 1}) for _ in range(6)]

    assert [a.status_code for a in answers] == [200] * 5 + [429]
    assert answers[-1].json()["policyName"] == "SECONDLY"
    assert "secondly" in answers[-1].json()["message"]
    assert not any("X-HubSpot-RateLimit-Max" in a.headers for a in answers)
    assert hubspot.rate_limited == 1


# Associations: reading


def test_association_read_reports_none_as_no_associations_found(hubspot, api):
    contact, company = contact_and_company(hubspot)
    lonely = hubspot.add_record("contacts", {})
    hubspot.associate("contacts", contact, "companies", company)

    answer = api.read_associations("contacts", "companies", [contact, lonely, 404])

    assert answer.status_code == 207
    body = answer.json()
    assert [r["from"]["id"] for r in body["results"]] == [str(contact)]
    assert body["numErrors"] == 2
    for error, missing in zip(body["errors"], (lonely, 404), strict=True):
        assert error["category"] == "OBJECT_NOT_FOUND"
        assert error["subCategory"] == "crm.associations.NO_ASSOCIATIONS_FOUND"
        assert error["message"] == f"No company is associated with contact {missing}."
        assert error["context"] == {"fromObjectId": [str(missing)]}


def test_association_read_gives_numbers_and_types_as_seen_from_each_side(hubspot):
    contact, company = contact_and_company(hubspot)
    hubspot.associate("contacts", contact, "companies", company, [PRIMARY])

    forward = Api(hubspot).read_associations("0-1", "0-2", [contact]).json()
    backward = Api(hubspot, DATED).read_associations("companies", "contacts", [company])

    (target,) = forward["results"][0]["to"]
    assert target["toObjectId"] == company
    assert target["associationTypes"] == [
        {"category": "HUBSPOT_DEFINED", "typeId": 1, "label": "Primary"},
        {"category": "HUBSPOT_DEFINED", "typeId": 279, "label": None},
    ]
    (target,) = backward.json()["results"][0]["to"]
    assert {t["typeId"] for t in target["associationTypes"]} == {2, 280}


def test_association_list_pages_with_after(hubspot, api):
    contact = hubspot.add_record("contacts", {})
    companies = [hubspot.add_record("companies", {}) for _ in range(3)]
    for company in companies:
        hubspot.associate("contacts", contact, "companies", company)
    path = f"/crm/v4/objects/contacts/{contact}/associations/companies"

    first = api.request("GET", path, limit=2).json()
    second = api.request("GET", path, limit=2, after=first["paging"]["next"]["after"])

    assert [t["toObjectId"] for t in first["results"]] == companies[:2]
    assert [t["toObjectId"] for t in second.json()["results"]] == companies[2:]
    assert "paging" not in second.json()


# Associations: writing


def test_a_labeled_write_replaces_the_labels_of_the_pair(hubspot, api):
    contact, company = contact_and_company(hubspot)
    hubspot.add_label("contacts", "companies", "Billing", 901, 902)
    billing = ("USER_DEFINED", 901)
    hubspot.associate("contacts", contact, "companies", company, [billing])

    answer = api.create("contacts", "companies", (contact, company, [PRIMARY]))

    assert answer.status_code == 201
    (result,) = answer.json()["results"]
    assert result["fromObjectId"] == contact and result["toObjectId"] == company
    assert result["labels"] == ["Primary"]
    assert hubspot.associations("contacts", contact, "companies") == {
        company: {PRIMARY, UNLABELED}
    }
    assert hubspot.associations("companies", company, "contacts") == {
        contact: {PRIMARY_BACK, UNLABELED_BACK}
    }


def test_a_single_labeled_put_replaces_labels_too(hubspot, api):
    contact, company = contact_and_company(hubspot)
    hubspot.associate("contacts", contact, "companies", company, [PRIMARY])
    hubspot.add_label("contacts", "companies", "Billing", 901, 902)
    path = f"/crm/objects/2026-03/contacts/{contact}/associations/companies/{company}"

    answer = api.request(
        "PUT", path, [{"associationCategory": "USER_DEFINED", "associationTypeId": 901}]
    )

    assert answer.status_code == 201
    assert answer.json()["labels"] == ["Billing"]
    assert hubspot.associations("contacts", contact, "companies") == {
        company: {("USER_DEFINED", 901), UNLABELED}
    }


def test_primary_brings_the_unlabeled_type(hubspot, api):
    deal = hubspot.add_record("deals", {})
    company = hubspot.add_record("companies", {})

    api.create("deals", "companies", (deal, company, [("HUBSPOT_DEFINED", 5)]))

    assert hubspot.associations("deals", deal, "companies") == {
        company: {("HUBSPOT_DEFINED", 5), ("HUBSPOT_DEFINED", 341)}
    }


def test_making_another_company_primary_moves_the_label(hubspot, api):
    contact, first = contact_and_company(hubspot)
    second = hubspot.add_record("companies", {})
    hubspot.associate("contacts", contact, "companies", first, [PRIMARY])

    api.create("contacts", "companies", (contact, second, [PRIMARY]))

    assert hubspot.associations("contacts", contact, "companies") == {
        first: {UNLABELED},
        second: {PRIMARY, UNLABELED},
    }
    assert hubspot.associations("companies", first, "contacts") == {
        contact: {UNLABELED_BACK}
    }


def test_primary_moves_when_written_from_the_company_side(hubspot, api):
    contact, first = contact_and_company(hubspot)
    second = hubspot.add_record("companies", {})
    hubspot.associate("contacts", contact, "companies", first, [PRIMARY])

    api.create("companies", "contacts", (second, contact, [PRIMARY_BACK]))

    assert hubspot.associations("contacts", contact, "companies") == {
        first: {UNLABELED},
        second: {PRIMARY, UNLABELED},
    }


@pytest.mark.parametrize(
    "spec",
    [
        ("HUBSPOT_DEFINED", 280),  # contact -> company, read from the other side
        ("HUBSPOT_DEFINED", 341),  # deal -> company
        ("USER_DEFINED", 279),  # the right id in the wrong category
    ],
)
def test_refuses_a_type_that_does_not_belong_to_the_pair(hubspot, api, spec):
    contact, company = contact_and_company(hubspot)

    answer = api.create("contacts", "companies", (contact, company, [spec]))

    assert answer.status_code == 207
    (error,) = answer.json()["errors"]
    assert error["category"] == "VALIDATION_ERROR"
    assert error["context"]["fromObjectId"] == [str(contact)]
    assert answer.json()["results"] == []
    assert hubspot.associations("contacts", contact, "companies") == {}


def test_a_single_put_of_a_foreign_type_is_a_400(hubspot, api):
    contact, company = contact_and_company(hubspot)
    path = f"/crm/v4/objects/contacts/{contact}/associations/companies/{company}"

    answer = api.request(
        "PUT",
        path,
        [{"associationCategory": "HUBSPOT_DEFINED", "associationTypeId": 5}],
    )

    assert answer.status_code == 400
    assert answer.json()["category"] == "VALIDATION_ERROR"


def test_a_missing_record_fails_its_input_only(hubspot, api):
    contact, company = contact_and_company(hubspot)

    answer = api.create(
        "contacts",
        "companies",
        (contact, company, [UNLABELED]),
        (contact, 404, [UNLABELED]),
    )

    assert answer.status_code == 207
    body = answer.json()
    assert [r["toObjectId"] for r in body["results"]] == [company]
    (error,) = body["errors"]
    assert error["category"] == "OBJECT_NOT_FOUND"
    assert error["context"] == {"toObjectId": ["404"]}


def test_refuses_more_association_inputs_than_the_limit(hubspot, api):
    contact, company = contact_and_company(hubspot)
    hubspot.max_association_write_inputs = 2

    answer = api.default("contacts", "companies", *[(contact, company)] * 3)

    assert answer.status_code == 400
    assert hubspot.associations("contacts", contact, "companies") == {}


def test_a_default_write_keeps_labels_and_answers_both_directions(hubspot, api):
    contact, company = contact_and_company(hubspot)
    hubspot.associate("contacts", contact, "companies", company, [PRIMARY])
    deal = hubspot.add_record("deals", {})

    kept = api.default("contacts", "companies", (contact, company))
    new = api.default("deals", "contacts", (deal, contact))

    assert kept.status_code == 200
    assert hubspot.associations("contacts", contact, "companies") == {
        company: {PRIMARY, UNLABELED}
    }
    specs = [
        (r["from"]["id"], r["to"]["id"], r["associationSpec"]["associationTypeId"])
        for r in new.json()["results"]
    ]
    assert specs == [(str(deal), str(contact), 3), (str(contact), str(deal), 4)]


def test_a_default_write_to_a_missing_record_answers_200_with_errors(hubspot, api):
    contact, _ = contact_and_company(hubspot)

    answer = api.default("contacts", "companies", (contact, 404))

    assert answer.status_code == 200
    assert answer.json()["numErrors"] == 1
    assert answer.json()["errors"][0]["context"] == {"toObjectId": ["404"]}


def test_the_default_endpoint_refuses_fields_other_than_from_and_to(hubspot, api):
    contact, company = contact_and_company(hubspot)
    path = "/crm/v4/associations/contacts/companies/batch/associate/default"
    item = {"from": {"id": str(contact)}, "to": {"id": str(company)}}

    answer = api.request("POST", path, {"inputs": [{**item, "types": []}]})

    assert answer.status_code == 400
    assert "types" in answer.json()["message"]


def test_the_single_default_put_takes_no_body(hubspot, api):
    contact, company = contact_and_company(hubspot)
    path = (
        f"/crm/v4/objects/contacts/{contact}/associations/default/companies/{company}"
    )

    with_body = api.request("PUT", path, [UNLABELED])
    without = api.request("PUT", path)

    assert with_body.status_code == 400
    assert without.status_code == 200
    assert hubspot.associations("contacts", contact, "companies") == {
        company: {UNLABELED}
    }


def test_counts_redundant_writes(hubspot, api):
    contact, company = contact_and_company(hubspot)
    other = hubspot.add_record("companies", {})
    hubspot.associate("contacts", contact, "companies", company)

    api.default("contacts", "companies", (contact, company))  # existed: 1
    api.default("contacts", "companies", (contact, other), (contact, other))  # dup: 1
    api.create("contacts", "companies", (contact, company, [PRIMARY]))  # new: 0
    api.create("companies", "contacts", (company, contact, [PRIMARY_BACK]))  # 1

    assert hubspot.redundant_writes == 3
    hubspot.reset_counters()
    assert (hubspot.redundant_writes, hubspot.calls) == (0, [])


# Labels and account


@pytest.mark.parametrize(
    "paths", [NUMBERED, SCHEMA_V4, DATED], ids=["v4", "v4 schema", "dated"]
)
def test_labels_name_every_type_of_the_pair_with_null_for_unlabeled(hubspot, paths):
    hubspot.add_label("contacts", "companies", "Billing", 901, 902)
    api = Api(hubspot, paths)

    forward = api.labels("contacts", "companies").json()["results"]
    backward = api.labels("0-2", "0-1").json()["results"]

    assert forward == [
        {"category": "HUBSPOT_DEFINED", "typeId": 1, "label": "Primary"},
        {"category": "HUBSPOT_DEFINED", "typeId": 279, "label": None},
        {"category": "USER_DEFINED", "typeId": 901, "label": "Billing"},
    ]
    assert [t["typeId"] for t in backward] == [2, 280, 902]
    assert hubspot.call_count("labels") == 2


def test_a_custom_object_pair_gets_the_same_made_up_type_everywhere(hubspot):
    with FakeHubSpot() as other:
        first = Api(hubspot).labels("2-123", "contacts").json()["results"]
        second = Api(other).labels("2-123", "0-1").json()["results"]
        back = Api(other).labels("contacts", "2-123").json()["results"]

    assert first == second
    ((_, type_id, label),) = [tuple(t.values()) for t in first]
    assert label is None
    assert [t["typeId"] for t in back] == [type_id - 1]


@pytest.mark.parametrize("paths", [NUMBERED, DATED], ids=["v3", "dated"])
def test_account_details_and_daily_usage(hubspot, paths):
    api = Api(hubspot, paths)

    details = api.request("GET", paths["account"] + "/details").json()
    usage = api.request("GET", paths["account"] + "/api-usage/daily/private-apps")

    assert details["portalId"] == 62515
    assert details["timeZone"] == "US/Eastern"
    (daily,) = usage.json()["results"]
    assert daily["name"] == "api-calls-daily"
    assert daily["currentUsage"] == 2
    assert daily["fetchStatus"] == "SUCCESS"


# Both path families


@pytest.mark.parametrize("paths", [NUMBERED, DATED], ids=["numbered", "dated"])
def test_both_path_families_serve_the_same_calls(hubspot, paths):
    api = Api(hubspot, paths)
    contact, company = contact_and_company(hubspot)
    deal = hubspot.add_record("deals", {})

    assert api.read("contacts", [contact]).status_code == 200
    assert api.search("companies", {"limit": 5}).json()["total"] == 1
    assert api.read_associations("contacts", "companies", [contact]).status_code == 207
    assert api.create("contacts", "companies", (contact, company, [PRIMARY])).ok
    assert api.default("deals", "contacts", (deal, contact)).ok
    assert api.read_associations("contacts", "companies", [contact]).status_code == 200
    assert api.labels("deals", "contacts").json()["results"][0]["typeId"] == 3

    kinds = [c["kind"] for c in hubspot.calls]
    assert kinds == [
        "objects_read",
        "search",
        "associations_read",
        "associations_create",
        "associations_default",
        "associations_read",
        "labels",
    ]


# Faults and rate limits


def test_fail_next_answers_the_injected_status_once(hubspot, api):
    hubspot.fail_next.append((None, 429, {"Retry-After": "1"}))

    refused = api.request("GET", "/account-info/v3/details")
    served = api.request("GET", "/account-info/v3/details")

    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "1"
    assert refused.json()["policyName"] == "TEN_SECONDLY_ROLLING"
    assert served.status_code == 200
    assert hubspot.fail_next == []


def test_fail_next_waits_for_a_request_of_its_kind(hubspot, api):
    hubspot.fail_next.append(("associations_create", 502, {}))
    hubspot.fail_next.append(("labels", 429, {}, {"policyName": "DAILY"}))
    contact, company = contact_and_company(hubspot)

    assert api.read("contacts", [contact]).status_code == 200
    labels = api.labels("contacts", "companies")
    create = api.create("contacts", "companies", (contact, company, [UNLABELED]))

    assert labels.status_code == 429
    assert labels.json()["policyName"] == "DAILY"
    assert create.status_code == 502
    assert create.json()["status"] == "error"
    assert hubspot.associations("contacts", contact, "companies") == {}


def test_every_answer_but_a_search_carries_rate_limit_headers(hubspot, api):
    answer = api.read("contacts", [1])

    assert answer.headers["X-HubSpot-RateLimit-Max"] == "190"
    assert answer.headers["X-HubSpot-RateLimit-Remaining"] == "189"
    assert answer.headers["X-HubSpot-RateLimit-Interval-Milliseconds"] == "10000"
    assert "X-HubSpot-RateLimit-Max" not in api.search("contacts", {}).headers


def test_the_ten_second_window_answers_429_beyond_its_limit(hubspot, api):
    hubspot.rate_limit_per_10s = 3

    answers = [api.request("GET", "/account-info/v3/details") for _ in range(4)]

    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert [a.headers["X-HubSpot-RateLimit-Remaining"] for a in answers] == [
        "2",
        "1",
        "0",
        "0",
    ]
    assert answers[-1].headers["X-HubSpot-RateLimit-Max"] == "3"
    assert answers[-1].json()["policyName"] == "TEN_SECONDLY_ROLLING"
    assert answers[-1].json()["errorType"] == "RATE_LIMIT"
    assert hubspot.rate_limited == 1


# Injected faults


ACCOUNT = "/account-info/v3/details"
USAGE = "/account-info/v3/api-usage/daily/private-apps"


def test_fail_always_answers_until_the_entry_is_removed(hubspot, api):
    hubspot.fail_always.append((None, 403, {}))

    refused = [api.request("GET", ACCOUNT) for _ in range(3)]
    hubspot.fail_always.clear()
    served = api.request("GET", ACCOUNT)

    assert [a.status_code for a in refused] == [403, 403, 403]
    assert refused[0].json()["category"] == "MISSING_SCOPES"
    assert served.status_code == 200


def test_throttle_answers_429_to_the_same_seeded_share_of_calls_each_time(hubspot, api):
    def statuses(n=40):
        return [api.request("GET", ACCOUNT).status_code for _ in range(n)]

    hubspot.throttle(0.3, seed=7, retry_after=2)
    first = statuses()
    hubspot.throttle(0.3, seed=7, retry_after=2)
    again = statuses()
    hubspot.throttle(0.0)
    after = statuses(5)

    assert first == again
    assert 6 <= first.count(429) <= 20
    assert after == [200] * 5
    assert hubspot.rate_limited == 2 * first.count(429)
    refused = next(c for c in hubspot.calls if c["status"] == 429)
    assert refused["kind"] == "account"


def test_a_throttled_429_says_retry_after_and_a_spent_window(hubspot, api):
    hubspot.throttle(1.0, retry_after=3)

    refused = api.request("GET", ACCOUNT)
    search = api.search("contacts", {})
    usage = api.request("GET", USAGE)

    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "3"
    assert refused.headers["X-HubSpot-RateLimit-Remaining"] == "0"
    assert refused.json()["policyName"] == "TEN_SECONDLY_ROLLING"
    assert search.status_code == 429
    assert search.json()["policyName"] == "SECONDLY"
    assert "X-HubSpot-RateLimit-Max" not in search.headers
    assert usage.status_code == 200


@pytest.mark.parametrize("applied", [False, True], ids=["not-applied", "applied"])
def test_a_hung_call_times_out_the_client_with_or_without_its_write(
    hubspot, api, applied
):
    contact, company = contact_and_company(hubspot)
    hubspot.hang_next.append(("associations_default", 0.6, applied))
    api.timeout = 0.2

    with pytest.raises(requests.ReadTimeout):
        api.default("contacts", "companies", (contact, company))
    # Even once the hang is over, a write not applied stays undone.
    time.sleep(0.6)

    written = hubspot.associations("contacts", contact, "companies")
    assert bool(written) is applied
    hung = hubspot.calls[-1]
    assert (hung["kind"], hung["fault"]) == ("associations_default", "hang")
    assert hung["status"] == (200 if applied else None)
    assert hung["at"] == pytest.approx(time.time(), abs=2)
    api.timeout = 5.0
    assert api.request("GET", ACCOUNT).status_code == 200


def test_a_hung_call_that_was_applied_answers_late(hubspot, api):
    contact, company = contact_and_company(hubspot)
    hubspot.hang_next.append((None, 0.4, True))

    started = time.monotonic()
    answer = api.default("contacts", "companies", (contact, company))

    assert answer.status_code == 200
    assert time.monotonic() - started >= 0.4
    assert hubspot.associations("contacts", contact, "companies")


@pytest.mark.parametrize("applied", [False, True], ids=["not-applied", "applied"])
def test_a_disconnect_closes_the_connection_without_an_answer(hubspot, api, applied):
    contact, company = contact_and_company(hubspot)
    hubspot.disconnect_next.append(("associations_default", applied))

    with pytest.raises(requests.ConnectionError):
        api.default("contacts", "companies", (contact, company))

    written = hubspot.associations("contacts", contact, "companies")
    assert bool(written) is applied
    dropped = hubspot.calls[-1]
    assert dropped["fault"] == "disconnect"
    assert dropped["status"] == (200 if applied else None)
    assert api.request("GET", ACCOUNT).status_code == 200


def test_a_spent_daily_budget_answers_429_until_the_reset_its_report_gives(
    hubspot, api
):
    hubspot.daily_limit_until = time.time() + 0.5

    refused = api.read("contacts", [1])
    usage = api.request("GET", USAGE).json()["results"][0]
    time.sleep(max(hubspot.daily_limit_until - time.time(), 0) + 0.05)
    served = api.read("contacts", [1])

    assert refused.status_code == 429
    assert refused.json()["policyName"] == "DAILY"
    assert refused.headers["X-HubSpot-RateLimit-Daily-Remaining"] == "0"
    resets_at = datetime.fromisoformat(usage["resetsAt"]).timestamp()
    assert 0 <= resets_at - hubspot.daily_limit_until <= 0.002
    assert usage["currentUsage"] == usage["usageLimit"]
    assert served.status_code == 207
    assert hubspot.rate_limited == 1


def test_the_window_length_and_other_integrations_calls_show_in_the_headers(
    hubspot, api
):
    hubspot.rate_limit_per_10s = 5
    hubspot.rate_limit_interval_ms = 300
    hubspot.spend_rate_limit(4)

    answers = [api.request("GET", ACCOUNT) for _ in range(2)]
    time.sleep(0.35)
    later = api.request("GET", ACCOUNT)

    assert [a.status_code for a in answers] == [200, 429]
    assert answers[0].headers["X-HubSpot-RateLimit-Remaining"] == "0"
    assert answers[0].headers["X-HubSpot-RateLimit-Interval-Milliseconds"] == "300"
    assert later.status_code == 200
    assert later.headers["X-HubSpot-RateLimit-Remaining"] == "4"
    # The other integration's calls are counted, not listed.
    assert hubspot.call_count() == 3


@pytest.mark.parametrize("write", ["create", "default"])
def test_an_association_limit_fails_only_the_inputs_beyond_it(hubspot, api, write):
    company = hubspot.add_record("companies", {"domain": "limit.example"})
    contacts = [hubspot.add_record("contacts", {}) for _ in range(3)]
    hubspot.association_limit = 2

    if write == "create":
        answer = api.create(
            "contacts", "companies", *[(c, company, [UNLABELED]) for c in contacts]
        )
    else:
        answer = api.default("contacts", "companies", *[(c, company) for c in contacts])

    assert answer.status_code == (207 if write == "create" else 200)
    (error,) = answer.json()["errors"]
    assert error["category"] == "VALIDATION_ERROR"
    assert error["context"] == {
        "fromObjectId": [str(contacts[2])],
        "toObjectId": [str(company)],
    }
    assert set(hubspot.associations("companies", company, "contacts")) == set(
        contacts[:2]
    )
    hubspot.association_limit = None
    assert api.default("contacts", "companies", (contacts[2], company)).ok
    assert len(hubspot.associations("companies", company, "contacts")) == 3


def test_clear_faults_turns_every_fault_off(hubspot, api):
    hubspot.fail_always.append((None, 500, {}))
    hubspot.fail_next.append((None, 502, {}))
    hubspot.hang_next.append((None, 5, False))
    hubspot.disconnect_next.append((None, False))
    hubspot.throttle(1.0)
    hubspot.rate_limit_per_10s = 1
    hubspot.rate_limit_interval_ms = 100
    hubspot.daily_limit_until = time.time() + 60
    hubspot.association_limit = 0

    hubspot.clear_faults()

    answers = [api.request("GET", ACCOUNT) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert answers[0].headers["X-HubSpot-RateLimit-Interval-Milliseconds"] == "10000"
    assert hubspot.association_limit is None


# Records of the calls


def test_logs_every_request_without_the_token(tmp_path):
    log_path = tmp_path / "hubspot.jsonl"
    with FakeHubSpot(log_path=log_path) as hubspot:
        api = Api(hubspot)
        api.read("contacts", [1], ["email"])
        api.request("GET", "/crm/v4/objects/contacts/1/associations/companies", limit=5)

    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [(line["method"], line["path"], line["status"]) for line in lines] == [
        ("POST", "/crm/v3/objects/contacts/batch/read", 207),
        ("GET", "/crm/v4/objects/contacts/1/associations/companies", 200),
    ]
    assert lines[0]["body"] == {"inputs": [{"id": "1"}], "properties": ["email"]}
    assert lines[0]["headers"]["content-type"] == "application/json"
    assert lines[1]["query"] == {"limit": ["5"]}
    assert lines[1]["body"] is None
    assert "pat-na1" not in log_path.read_text()
    assert all("authorization" not in line["headers"] for line in lines)
