"""The whole service end to end, once per HubSpot API version.

Signed deliveries go to a real gunicorn, through the embedded Redis to a real
Celery worker, which calls the HTTP fake of HubSpot. Each test checks the
outcome stored for every event, the exact association types the fake ends up
with, and (in the fixture) that nothing was written twice and that no process
logged an error.
"""

import itertools
import random
import time

import pytest

from tests.hubspot_fake import HUBSPOT_DEFINED, FakeHubSpot
from tests.stack import ServiceStack
from tests.support import event
from webhook.intake import DEDUP_PREFIX

API_VERSIONS = ("v4", "2026-03")
# Below the stack's settle delay, so that a settled event's search finds every
# record its event announced (HUBSPOT.md section 4: search lags writes).
SEARCH_LAG_SECONDS = 0.5

EMAIL_RULE = "contact-company-by-email-domain"
DEAL_RULE = "deal-companies-via-contacts"

# HUBSPOT.md section 3, as the fake reports a pair's types from either side.
CONTACT_TO_PRIMARY_COMPANY = {(HUBSPOT_DEFINED, 279), (HUBSPOT_DEFINED, 1)}
COMPANY_TO_PRIMARY_CONTACT = {(HUBSPOT_DEFINED, 280), (HUBSPOT_DEFINED, 2)}
DEAL_TO_COMPANY = {(HUBSPOT_DEFINED, 341)}
DEAL_TO_PRIMARY_COMPANY = {(HUBSPOT_DEFINED, 341), (HUBSPOT_DEFINED, 5)}
DEAL_TO_CONTACT_TYPE_ID = 3
CONTACT_TO_DEAL_TYPE_ID = 4
OBJECT_TYPE_IDS = {"contact": "0-1", "company": "0-2", "deal": "0-3"}
WRITE_KINDS = ("associations_create", "associations_default")

BURST_COMPANIES = 200
CONTACTS_PER_COMPANY = 5
EVENTS_PER_DELIVERY = 100
# 1,200 records come in 12 deliveries, so 12 plans of 100 events. A plan costs
# six calls: one batch read per object type, one search per rule direction, one
# read of the existing associations and one write, plus a second write when it
# writes more than 100 pairs; labels and the token's portal are looked up once.
# That is about 80 calls. The budget of 100 is still one call per 12 records,
# where one call per record (or per event) would take 1,200.
BURST_CALL_BUDGET = 100
BURST_TIMEOUT_SECONDS = 60

EVENT_IDS = itertools.count(1)


@pytest.fixture(scope="module", params=API_VERSIONS)
def stack(request, redis_server, tmp_path_factory):
    """One running service per API version; the versions run one after the other."""
    version = request.param
    hubspot = FakeHubSpot(search_lag_seconds=SEARCH_LAG_SECONDS).start()
    try:
        service = ServiceStack(
            redis_url=redis_server.url,
            hubspot=hubspot,
            directory=tmp_path_factory.mktemp(f"stack-{version}"),
            api_version=version,
        )
        assert service.settings.settle_seconds > SEARCH_LAG_SECONDS
        with service:
            yield service
    finally:
        hubspot.stop()


@pytest.fixture(autouse=True)
def clean_stack(stack):
    """A test starts with no stored state and ends having written nothing twice."""
    stack.reset()
    yield
    # Shown by pytest only when the test failed.
    print(stack.tails())
    assert stack.hubspot.internal_errors == []
    assert stack.hubspot.redundant_writes == 0
    assert stack.errors() == []


# Records and events


def company(hubspot: FakeHubSpot, domain: str) -> int:
    return hubspot.add_record("company", {"domain": domain, "name": domain})


def contact(hubspot: FakeHubSpot, email: str) -> int:
    return hubspot.add_record("contact", {"email": email})


def created(object_type: str, object_id: int) -> dict:
    """The creation event HubSpot sends for a record created just now."""
    return event(
        object_id,
        kind=f"{object_type}.creation",
        event_id=next(EVENT_IDS),
        occurredAt=int(time.time() * 1000),
    )


def association_change(
    from_type: str,
    from_id: int,
    to_type: str,
    to_id: int,
    *,
    generic: bool = False,
    removed: bool = False,
) -> dict:
    """One side of an association change, as HubSpot sends it (HUBSPOT.md 1)."""
    prefix = "object" if generic else from_type
    raw = event(
        from_id,
        kind=f"{prefix}.associationChange",
        event_id=next(EVENT_IDS),
        occurredAt=int(time.time() * 1000),
        changeSource="CRM_UI",
        associationType=f"{from_type.upper()}_TO_{to_type.upper()}",
        fromObjectId=from_id,
        toObjectId=to_id,
        associationRemoved=removed,
        isPrimaryAssociation=False,
    )
    # Association changes name their records in fromObjectId and toObjectId.
    del raw["objectId"], raw["changeFlag"]
    if generic:
        raw.update(
            fromObjectTypeId=OBJECT_TYPE_IDS[from_type],
            toObjectTypeId=OBJECT_TYPE_IDS[to_type],
            associationTypeId=(
                DEAL_TO_CONTACT_TYPE_ID
                if from_type == "deal"
                else CONTACT_TO_DEAL_TYPE_ID
            ),
            associationCategory=HUBSPOT_DEFINED,
        )
    return raw


def shuffled(items: list, seed: int) -> list:
    items = list(items)
    random.Random(seed).shuffle(items)
    return items


def deliver_all(stack: ServiceStack, *deliveries: list[dict]) -> None:
    statuses = [stack.deliver(delivery).status_code for delivery in deliveries]
    assert statuses == [204] * len(deliveries)


# Outcomes


def applied(outcome: dict) -> tuple[int, int]:
    """(created, present) of an ``applied`` outcome."""
    assert outcome["outcome"] == "applied", outcome
    return outcome["created"], outcome["present"]


def skip_reasons(outcomes: list[dict]) -> list[str]:
    assert {o["outcome"] for o in outcomes} == {"skipped"}, outcomes
    return [o["reason"] for o in outcomes]


def assert_contacts_of(hubspot: FakeHubSpot, company_id: int, contact_ids) -> None:
    """Each contact has the company as its one (so Primary) company, both ways."""
    for contact_id in contact_ids:
        assert hubspot.associations("contact", contact_id, "company") == {
            company_id: CONTACT_TO_PRIMARY_COMPANY
        }
    assert hubspot.associations("company", company_id, "contact") == {
        contact_id: COMPANY_TO_PRIMARY_CONTACT for contact_id in contact_ids
    }


# Tests


def test_contacts_and_companies_are_associated_whichever_is_created_first(stack):
    hubspot = stack.hubspot

    # Round one: a company without contacts yet, contacts without their company
    # yet, a company with its contacts in one delivery and in racing deliveries,
    # and contacts that must find nothing.
    early = company(hubspot, "early.example")
    late_contacts = [contact(hubspot, f"{n}@late.example") for n in ("lea", "leo")]
    together = company(hubspot, "together.example")
    together_contacts = [
        contact(hubspot, f"{n}@Together.example") for n in ("tia", "tom")
    ]
    racing = company(hubspot, "racing.example")
    racing_contacts = [contact(hubspot, f"{n}@racing.example") for n in ("rae", "rob")]
    free_mail = contact(hubspot, "fay@gmail.com")
    lonely = contact(hubspot, "lone@nowhere.example")
    never_stored = 1_999_999

    early_event = created("company", early)
    late_contact_events = [created("contact", c) for c in late_contacts]
    together_event = created("company", together)
    together_contact_events = [created("contact", c) for c in together_contacts]
    racing_event = created("company", racing)
    racing_contact_events = [created("contact", c) for c in racing_contacts]
    nothing_events = [
        created("contact", free_mail),
        created("contact", lonely),
        created("contact", never_stored),
    ]
    deliver_all(
        stack,
        [early_event],
        late_contact_events,
        shuffled([together_event, *together_contact_events], seed=1),
        [racing_event],
        racing_contact_events,
        nothing_events,
    )

    # One delivery is one plan: a pair is created for the first event of the
    # delivery that found it (here the contacts, shuffled before the company).
    together_outcomes = stack.wait_for_outcomes(
        [together_event, *together_contact_events]
    )
    assert [applied(o) for o in together_outcomes] == [(0, 2), (1, 0), (1, 0)]
    assert together_outcomes[1]["rules"] == [EMAIL_RULE]
    assert together_outcomes[1]["written"] == [
        f"contact:{together_contacts[0]}\u2192company:{together} type=1,279"
    ]
    # Racing plans write each pair once; which of them does is chance.
    racing_outcomes = stack.wait_for_outcomes([racing_event, *racing_contact_events])
    assert [sum(applied(o)) for o in racing_outcomes] == [2, 1, 1]
    assert skip_reasons(stack.wait_for_outcomes(nothing_events[::2])) == [
        "free_mail_domain",
        "record_missing",
    ]
    # A match that found nothing is planned once more after the recheck delay.
    rechecked = [early_event, *late_contact_events, nothing_events[1]]
    assert skip_reasons(stack.wait_for_outcomes(rechecked)) == ["no_candidate"] * 4

    # Round two: the early company's contacts, and the late contacts' company.
    early_contacts = [contact(hubspot, f"{n}@early.example") for n in ("eve", "eli")]
    # Its domain as a user may type it: the reverse rule drops the www.
    late = company(hubspot, "www.late.example")
    early_contact_events = [created("contact", c) for c in early_contacts]
    late_event = created("company", late)
    deliver_all(stack, early_contact_events, [late_event])

    outcomes = stack.wait_for_outcomes([*early_contact_events, late_event])
    assert [applied(o) for o in outcomes] == [(1, 0), (1, 0), (2, 0)]
    assert outcomes[2]["rules"] == [EMAIL_RULE]

    assert_contacts_of(hubspot, early, early_contacts)
    assert_contacts_of(hubspot, late, late_contacts)
    assert_contacts_of(hubspot, together, together_contacts)
    assert_contacts_of(hubspot, racing, racing_contacts)
    for nobody in (free_mail, lonely):
        assert hubspot.associations("contact", nobody, "company") == {}


def test_a_delivery_sent_again_has_one_outcome_and_writes_once(stack):
    hubspot = stack.hubspot
    firm = company(hubspot, "twice.example")
    person = contact(hubspot, "tess@twice.example")
    delivery = [created("company", firm), created("contact", person)]
    # HubSpot's retry of a delivery it thinks failed: the same events, counted up.
    retried = [{**raw, "attemptNumber": 1} for raw in delivery]

    # And one event twice in one delivery.
    deliver_all(stack, delivery, retried, [delivery[1], delivery[1]])
    outcomes = stack.wait_for_outcomes(delivery)

    # One pair, created for the delivery's first event and present for the other.
    assert [applied(o) for o in outcomes] == [(1, 0), (0, 1)]
    received = [
        (line["kept"], line["duplicates"])
        for line in stack.web.log(since=0)
        if line.get("event") == "webhook_received"
    ][-3:]
    assert received == [(2, 0), (0, 2), (0, 2)]
    assert hubspot.associations("contact", person, "company") == {
        firm: CONTACT_TO_PRIMARY_COMPANY
    }
    writes = sum(hubspot.call_count(kind) for kind in WRITE_KINDS)
    assert writes == 1

    # Days later the receiver has forgotten the events (its dedup keys expire)
    # and queues them again: the worker sees their outcomes and does nothing.
    for key in stack.redis.scan_iter(f"{DEDUP_PREFIX}*"):
        stack.redis.delete(key)
    calls_before = hubspot.call_count()
    mark = stack.worker.log_size()
    deliver_all(stack, delivery)

    stack.worker.wait_for_log(
        lambda line: line.get("event") == "events_picked_up", since=mark
    )
    # The task is acknowledged only once it has run (task_acks_late).
    stack.wait_until_idle()
    assert stack.wait_for_outcomes(delivery) == outcomes
    assert hubspot.call_count() == calls_before


def test_a_deal_gets_its_contacts_companies_also_when_contacts_come_later(stack):
    hubspot = stack.hubspot
    alpha = company(hubspot, "alpha.example")
    beta = company(hubspot, "beta.example")
    ann = contact(hubspot, "ann@alpha.example")
    bob = contact(hubspot, "bob@beta.example")
    people = [created("contact", ann), created("contact", bob)]
    firms = [created("company", alpha), created("company", beta)]
    deliver_all(stack, people, firms)
    stack.wait_for_outcomes(people + firms)

    # A deal created with its contact, and two created without any.
    with_ann = hubspot.add_record("deal", {"dealname": "with ann"})
    hubspot.associate("deal", with_ann, "contact", ann)
    single = hubspot.add_record("deal", {"dealname": "single"})
    double = hubspot.add_record("deal", {"dealname": "double"})
    deals = [created("deal", d) for d in (with_ann, single, double)]
    # The service's own contact-company write comes back as a change event.
    echo = association_change("contact", ann, "company", alpha)
    deliver_all(stack, [*deals, echo])

    outcomes = stack.wait_for_outcomes([*deals, echo])
    assert applied(outcomes[0]) == (1, 0)
    assert outcomes[0]["rules"] == [DEAL_RULE]
    assert skip_reasons(outcomes[1:3]) == ["no_candidate", "no_candidate"]
    # The echo re-plans the contact's deal, which the deal's own event planned.
    assert applied(outcomes[3]) == (0, 1)

    # A user adds contacts to the deals: HubSpot sends a change for each side.
    hubspot.associate("deal", single, "contact", ann)
    hubspot.associate("deal", double, "contact", ann)
    hubspot.associate("deal", double, "contact", bob)
    hubspot.associate("deal", with_ann, "contact", bob)
    single_changes = [
        association_change("deal", single, "contact", ann),
        association_change("contact", ann, "deal", single, generic=True),
    ]
    double_changes = [
        association_change("deal", double, "contact", ann),
        association_change("contact", ann, "deal", double),
        association_change("deal", double, "contact", bob, generic=True),
        association_change("contact", bob, "deal", double),
    ]
    second_contact = association_change("deal", with_ann, "contact", bob)
    removal = association_change("deal", single, "contact", bob, removed=True)
    changes = [*single_changes, *double_changes, second_contact, removal]
    deliver_all(stack, shuffled(changes, seed=2))

    outcomes = stack.wait_for_outcomes(changes)
    # One plan: each event finds every pair of its deal, and the four new pairs
    # are created once, each for the first event of the delivery that found it.
    assert [sum(applied(o)) for o in outcomes[:7]] == [1] * 2 + [2] * 4 + [2]
    assert sum(applied(o)[0] for o in outcomes[:7]) == 4
    assert {r for o in outcomes[:7] for r in o["rules"]} == {DEAL_RULE}
    assert skip_reasons(outcomes[7:]) == ["no_rule"]

    assert hubspot.associations("deal", single, "company") == {
        alpha: DEAL_TO_PRIMARY_COMPANY
    }
    # Two companies: neither is made Primary.
    assert hubspot.associations("deal", double, "company") == {
        alpha: DEAL_TO_COMPANY,
        beta: DEAL_TO_COMPANY,
    }
    # A deal with a Primary company keeps it when it gets a second company.
    assert hubspot.associations("deal", with_ann, "company") == {
        alpha: DEAL_TO_PRIMARY_COMPANY,
        beta: DEAL_TO_COMPANY,
    }


def test_a_deal_gets_the_company_its_contact_gets_later(stack):
    hubspot = stack.hubspot
    lea = contact(hubspot, "lea@later.example")
    loner = contact(hubspot, "lone@later.example")
    deal = hubspot.add_record("deal", {"dealname": "later"})
    hubspot.associate("deal", deal, "contact", lea)
    first = [created("contact", lea), created("contact", loner), created("deal", deal)]
    deliver_all(stack, first)
    # No company yet, also on the contacts' recheck.
    assert skip_reasons(stack.wait_for_outcomes(first)) == ["no_candidate"] * 3

    # The company comes later, its domain typed with www.: the reverse rule finds
    # the contacts.
    later = company(hubspot, "www.later.example")
    company_event = created("company", later)
    deliver_all(stack, [company_event])
    (outcome,) = stack.wait_for_outcomes([company_event])
    assert applied(outcome) == (2, 0)

    # HubSpot tells of those writes from both sides, classic and generic; and of
    # a removal, which re-plans nothing.
    echoes = [
        association_change("contact", lea, "company", later),
        {
            **association_change("company", later, "contact", lea, generic=True),
            "associationTypeId": 280,
        },
        association_change("contact", loner, "company", later),
        association_change("contact", loner, "company", later, removed=True),
    ]
    calls_before = hubspot.call_count()
    deliver_all(stack, echoes)

    outcomes = stack.wait_for_outcomes(echoes)
    assert applied(outcomes[0]) == (1, 0)
    assert outcomes[0]["rules"] == [DEAL_RULE]
    assert outcomes[0]["written"] == [f"deal:{deal}\u2192company:{later} type=5,341"]
    assert applied(outcomes[1]) == (0, 1)
    assert skip_reasons(outcomes[2:]) == ["no_candidate", "no_rule"]
    # The contacts' deals in one read, then the deal's reads as when it is
    # re-planned, and one write.
    kinds = [c["kind"] for c in hubspot.calls[calls_before:] if c["kind"] != "labels"]
    assert kinds == ["associations_read"] * 4 + ["associations_create"]

    # A contact created now finds the company by its domain without www.
    lou = contact(hubspot, "lou@later.example")
    lou_event = created("contact", lou)
    deliver_all(stack, [lou_event])
    (outcome,) = stack.wait_for_outcomes([lou_event])
    assert applied(outcome) == (1, 0)

    assert_contacts_of(hubspot, later, [lea, loner, lou])
    assert hubspot.associations("deal", deal, "company") == {
        later: DEAL_TO_PRIMARY_COMPANY
    }


def test_an_import_burst_is_associated_completely_within_a_call_budget(stack):
    hubspot = stack.hubspot
    members = {}
    records = []
    for number in range(BURST_COMPANIES):
        domain = f"burst-{number}.example"
        firm = company(hubspot, domain)
        people = [
            contact(hubspot, f"p{n}@{domain}") for n in range(CONTACTS_PER_COMPANY)
        ]
        members[firm] = people
        records += [("company", firm)] + [("contact", p) for p in people]
    events = shuffled([created(kind, record) for kind, record in records], seed=3)

    started = time.monotonic()
    deliver_all(
        stack,
        *[
            events[start : start + EVENTS_PER_DELIVERY]
            for start in range(0, len(events), EVENTS_PER_DELIVERY)
        ],
    )
    outcomes = stack.wait_for_outcomes(events, timeout_seconds=BURST_TIMEOUT_SECONDS)
    seconds = time.monotonic() - started

    assert {o["outcome"] for o in outcomes} == {"applied"}
    for firm, people in members.items():
        assert_contacts_of(hubspot, firm, people)
    calls = hubspot.call_count()
    print(
        f"import burst ({stack.api_version}): {len(events)} records in "
        f"{seconds:.1f} s, {calls} HubSpot calls, {hubspot.rate_limited} answered "
        f"429, {sum(hubspot.call_count(k) for k in WRITE_KINDS)} writes"
    )
    assert calls < BURST_CALL_BUDGET
