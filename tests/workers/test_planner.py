"""The planner against the HubSpot fake: what it associates, what it writes, what
it refuses to touch, and how many calls a batch costs.

Each test puts records into a :class:`FakeHubSpot`, plans HubSpot-shaped events
and looks at the plan's result and at the fake's state afterwards.
"""

import textwrap
import threading
import time

import fakeredis
import pytest

from tests.hubspot_fake import FakeHubSpot, input_error, object_type_id
from tests.support import event
from webhook.payload import parse_event
from workers.hubspot import (
    INPUTS_PER_ASSOCIATION_WRITE,
    HubSpotClient,
    PermanentError,
    TransientError,
)
from workers.labels import LabelResolver
from workers.planner import Pair, PairBusy, Planner
from workers.rules import DEFAULT_RULES_TOML, UNLABELED, RulesError, load_rules

API_VERSIONS = ("v4", "2026-03")
CONTACT, COMPANY, DEAL, TICKET = "0-1", "0-2", "0-3", "0-5"
CONTACT_RULE = "contact-company-by-email-domain"
DEAL_RULE = "deal-companies-via-contacts"

# Association types as the fake stores them: (category, type id), HUBSPOT.md 3.
DEFINED = "HUBSPOT_DEFINED"
CONTACT_COMPANY = (DEFINED, 279)
CONTACT_COMPANY_PRIMARY = (DEFINED, 1)
COMPANY_CONTACT = (DEFINED, 280)
COMPANY_CONTACT_PRIMARY = (DEFINED, 2)
DEAL_COMPANY = (DEFINED, 341)
DEAL_COMPANY_PRIMARY = (DEFINED, 5)
TICKET_COMPANY = (DEFINED, 339)
TICKET_COMPANY_PRIMARY = (DEFINED, 26)
LINE_ITEM_DEAL = (DEFINED, 20)
BILLING = ("USER_DEFINED", 901)
DECISION_MAKER = ("USER_DEFINED", 903)

WRITE_KINDS = (
    "associations_create",
    "associations_default",
    "associations_put",
    "associations_put_default",
)


@pytest.fixture
def hubspot():
    with FakeHubSpot() as fake:
        yield fake


@pytest.fixture
def redis():
    return fakeredis.FakeRedis(decode_responses=True)


class RacingClient(HubSpotClient):
    """A client that lets ``race`` run once, just before its first write.

    The other plan then reads and claims after this one has read and claimed
    and before it writes, as when two workers plan the same records at once.
    """

    race = None

    def create_associations(self, *args, **kwargs):
        self._run_race()
        return super().create_associations(*args, **kwargs)

    def associate_default(self, *args, **kwargs):
        self._run_race()
        return super().associate_default(*args, **kwargs)

    def _run_race(self):
        race, self.race = self.race, None
        if race is not None:
            race()


@pytest.fixture
def make_planner(hubspot, redis):
    """A planner of the fake's portal; the defaults unless ``rules`` is given."""
    clients = []

    def make(
        rules=None,
        *,
        api_version="2026-03",
        dry_run=False,
        client=HubSpotClient,
        claim_owner=None,
        claim_wait_seconds=0.0,
    ):
        clients.append(
            client(
                token=hubspot.token,
                base_url=hubspot.url,
                api_version=api_version,
                timeout=5,
            )
        )
        return Planner(
            client=clients[-1],
            portal_id=hubspot.portal_id,
            rules=load_rules(None) if rules is None else rules,
            labels=LabelResolver(redis, refresh_seconds=3600),
            redis=redis,
            claim_seconds=600,
            claim_owner=claim_owner,
            claim_wait_seconds=claim_wait_seconds,
            dry_run=dry_run,
        )

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def rules_file(tmp_path):
    """The rules of a rules file with this text, loaded as the worker loads them."""

    def load(text: str):
        path = tmp_path / "rules.toml"
        path.write_text(textwrap.dedent(text))
        return load_rules(path)

    return load


def created(object_id, object_type="contact"):
    """A creation event as HubSpot delivers it; custom objects by type id."""
    if object_type.startswith("2-"):
        raw = event(object_id, kind="object.creation", objectTypeId=object_type)
    else:
        raw = event(object_id, kind=f"{object_type}.creation")
    return parse_event(raw)


def associated(from_type, from_id, to_type, to_id, *, removed=False):
    """The association-change event HubSpot sends for one side of a pair."""
    return parse_event(
        event(
            from_id,
            kind=f"{from_type}.associationChange",
            associationType=f"{from_type.upper()}_TO_{to_type.upper()}",
            fromObjectId=from_id,
            toObjectId=to_id,
            associationRemoved=removed,
            isPrimaryAssociation=False,
        )
    )


def generic_associated(from_type, from_id, to_type, to_id):
    """The generic ``object.associationChange`` form of one side of a pair."""
    return parse_event(
        event(
            from_id,
            kind="object.associationChange",
            fromObjectTypeId=object_type_id(from_type),
            toObjectTypeId=object_type_id(to_type),
            fromObjectId=from_id,
            toObjectId=to_id,
            associationRemoved=False,
            isPrimaryAssociation=False,
        )
    )


def both_sides(from_type, from_id, to_type, to_id):
    """The two events HubSpot sends for a new pair, one from each side."""
    return [
        associated(from_type, from_id, to_type, to_id),
        associated(to_type, to_id, from_type, from_id),
    ]


def write_calls(hubspot):
    return [c for c in hubspot.calls if c["kind"] in WRITE_KINDS]


def association_reads(hubspot):
    """(from type id, to type id, sorted ids) of every batch association read."""
    reads = []
    for call in hubspot.calls:
        if call["kind"] != "associations_read":
            continue
        from_type, to_type = call["path"].split("/")[-4:-2]
        ids = sorted(int(item["id"]) for item in call["body"]["inputs"])
        reads.append((object_type_id(from_type), object_type_id(to_type), ids))
    return reads


def searched_values(hubspot):
    """The values of each search's IN filters (one a group), in the order sent."""
    return [
        [
            value
            for group in call["body"]["filterGroups"]
            for value in group["filters"][0]["values"]
        ]
        for call in hubspot.calls
        if call["kind"] == "search"
    ]


def sent_inputs(hubspot):
    """(from id, to id, {(category, type id)}) of every association input sent."""
    return [
        (
            int(item["from"]["id"]),
            int(item["to"]["id"]),
            {(t["associationCategory"], t["associationTypeId"]) for t in item["types"]}
            if "types" in item
            else None,
        )
        for call in write_calls(hubspot)
        for item in call["body"]["inputs"]
    ]


def applied(created=0, present=0, *, rules, written=()):
    return {
        "outcome": "applied",
        "rules": list(rules),
        "created": created,
        "present": present,
        "written": list(written),
    }


def skipped(reason):
    return {"outcome": "skipped", "reason": reason}


# -- contacts and companies by email domain ------------------------------------


@pytest.mark.parametrize("api_version", API_VERSIONS)
def test_a_contact_gets_its_company_by_email_domain(hubspot, make_planner, api_version):
    company = hubspot.add_record("company", {"domain": "acme.com", "name": "Acme"})
    contact = hubspot.add_record("contact", {"email": "Ann.Lee@WWW.Acme.COM"})
    new = created(contact)

    result = make_planner(api_version=api_version).run([new])

    assert result.outcomes == {
        new.dedup_key: applied(
            1,
            rules=[CONTACT_RULE],
            written=[f"contact:{contact}→company:{company} type=1,279"],
        )
    }
    assert result.created == 1
    assert (result.recheck, result.retry, result.dead) == ([], [], [])
    assert hubspot.associations("contact", contact, "company") == {
        company: {CONTACT_COMPANY, CONTACT_COMPANY_PRIMARY}
    }
    assert hubspot.associations("company", company, "contact") == {
        contact: {COMPANY_CONTACT, COMPANY_CONTACT_PRIMARY}
    }
    assert hubspot.redundant_writes == 0
    assert hubspot.internal_errors == []


@pytest.mark.parametrize("api_version", API_VERSIONS)
def test_replanning_after_its_own_writes_finds_nothing_missing(
    hubspot, make_planner, api_version
):
    company = hubspot.add_record("company", {"domain": "acme.com"})
    other = hubspot.add_record("company", {"domain": "other.example"})
    ann = hubspot.add_record("contact", {"email": "ann@acme.com"})
    bob = hubspot.add_record("contact", {"email": "bob@other.example"})
    deal = hubspot.add_record("deal", {"dealname": "Renewal"})
    hubspot.associate("deal", deal, "contact", ann)
    hubspot.associate("deal", deal, "contact", bob)
    events = [created(ann), created(bob), created(deal, "deal")]
    make_planner(api_version=api_version).run(events)
    hubspot.reset_counters()

    result = make_planner(api_version=api_version).run(events)

    assert result.outcomes == {
        events[0].dedup_key: applied(present=1, rules=[CONTACT_RULE]),
        events[1].dedup_key: applied(present=1, rules=[CONTACT_RULE]),
        events[2].dedup_key: applied(present=2, rules=[DEAL_RULE]),
    }
    assert result.created == 0
    assert write_calls(hubspot) == []
    assert hubspot.redundant_writes == 0
    assert hubspot.associations("deal", deal, "company") == {
        company: {DEAL_COMPANY},
        other: {DEAL_COMPANY},
    }


@pytest.mark.parametrize(
    "email", ["ann@sales.acme.com", "ann@acme.com.au", "ann@notacme.com"]
)
def test_only_the_exact_email_host_matches_a_company_domain(
    hubspot, make_planner, email
):
    hubspot.add_record("company", {"domain": "acme.com"})
    contact = hubspot.add_record("contact", {"email": email})
    new = created(contact)

    result = make_planner().run([new])

    assert result.recheck == [new]
    assert result.outcomes == {}
    assert hubspot.associations("contact", contact, "company") == {}


def test_a_contact_without_a_company_yet_is_rechecked_once(hubspot, make_planner):
    contact = hubspot.add_record("contact", {"email": "ann@acme.com"})
    new = created(contact)

    first = make_planner().run([new])
    again = make_planner().run([new], recheck=True)

    assert first.recheck == [new]
    assert first.outcomes == {}
    assert again.recheck == []
    assert again.outcomes == {new.dedup_key: skipped("no_candidate")}


def test_a_company_created_before_the_recheck_is_found_by_it(hubspot, make_planner):
    contact = hubspot.add_record("contact", {"email": "ann@acme.com"})
    new = created(contact)
    make_planner().run([new])
    company = hubspot.add_record("company", {"domain": "acme.com"})

    result = make_planner().run([new], recheck=True)

    assert result.outcomes[new.dedup_key]["created"] == 1
    assert set(hubspot.associations("contact", contact, "company")) == {company}


def test_free_mail_contacts_are_skipped_without_a_search(hubspot, make_planner):
    domains = [
        "gmail.com",
        "outlook.com",
        "yahoo.com",
        "hotmail.com",
        "icloud.com",
        "aol.com",
        "proton.me",
        "gmx.com",
    ]
    for domain in domains:
        hubspot.add_record("company", {"domain": domain})
    contacts = [
        hubspot.add_record("contact", {"email": f"someone@{domain.upper()}"})
        for domain in domains
    ]
    events = [created(contact) for contact in contacts]

    result = make_planner().run(events)

    assert result.outcomes == {e.dedup_key: skipped("free_mail_domain") for e in events}
    assert result.recheck == []
    assert hubspot.call_count("search") == 0
    assert all(hubspot.associations("contact", c, "company") == {} for c in contacts)


def test_a_rules_file_adds_free_mail_domains(hubspot, make_planner, rules_file):
    rules = rules_file('free_mail_domains = ["post.example"]\n' + DEFAULT_RULES_TOML)
    hubspot.add_record("company", {"domain": "post.example"})
    contact = hubspot.add_record("contact", {"email": "ann@post.example"})
    new = created(contact)

    result = make_planner(rules).run([new])

    assert result.outcomes == {new.dedup_key: skipped("free_mail_domain")}
    assert hubspot.associations("contact", contact, "company") == {}


def test_a_contact_without_an_email_has_no_candidate(hubspot, make_planner):
    contact = hubspot.add_record("contact", {"email": None, "firstname": "Ann"})
    new = created(contact)

    result = make_planner().run([new])

    assert result.outcomes == {new.dedup_key: skipped("no_candidate")}
    assert result.recheck == []


def test_a_contact_with_a_primary_company_keeps_it(hubspot, make_planner):
    old = hubspot.add_record("company", {"domain": "old.example"})
    acme = hubspot.add_record("company", {"domain": "acme.com"})
    contact = hubspot.add_record("contact", {"email": "ann@acme.com"})
    hubspot.associate("contact", contact, "company", old, [CONTACT_COMPANY_PRIMARY])
    new = created(contact)

    result = make_planner().run([new])

    assert result.outcomes[new.dedup_key]["written"] == [
        f"contact:{contact}→company:{acme} type=279"
    ]
    assert hubspot.associations("contact", contact, "company") == {
        old: {CONTACT_COMPANY, CONTACT_COMPANY_PRIMARY},
        acme: {CONTACT_COMPANY},
    }


def test_a_contact_matching_two_companies_gets_both_and_no_primary(
    hubspot, make_planner
):
    first = hubspot.add_record("company", {"domain": "acme.com"})
    second = hubspot.add_record("company", {"domain": "ACME.com"})
    contact = hubspot.add_record("contact", {"email": "ann@acme.com"})
    new = created(contact)

    result = make_planner().run([new])

    assert result.outcomes[new.dedup_key]["created"] == 2
    assert hubspot.associations("contact", contact, "company") == {
        first: {CONTACT_COMPANY},
        second: {CONTACT_COMPANY},
    }


def test_primary_goes_to_the_single_match_beside_other_companies(hubspot, make_planner):
    partner = hubspot.add_record("company", {"domain": "partner.example"})
    acme = hubspot.add_record("company", {"domain": "acme.com"})
    contact = hubspot.add_record("contact", {"email": "ann@acme.com"})
    hubspot.associate("contact", contact, "company", partner)
    new = created(contact)

    make_planner().run([new])

    assert hubspot.associations("contact", contact, "company") == {
        partner: {CONTACT_COMPANY},
        acme: {CONTACT_COMPANY, CONTACT_COMPANY_PRIMARY},
    }


def test_adding_primary_to_a_pair_sends_its_existing_types_too(hubspot, make_planner):
    acme = hubspot.add_record("company", {"domain": "acme.com"})
    contact = hubspot.add_record("contact", {"email": "ann@acme.com"})
    hubspot.associate("contact", contact, "company", acme)
    new = created(contact)

    result = make_planner().run([new])

    assert result.outcomes[new.dedup_key] == applied(
        1,
        rules=[CONTACT_RULE],
        written=[f"contact:{contact}→company:{acme} type=1"],
    )
    assert sent_inputs(hubspot) == [
        (contact, acme, {CONTACT_COMPANY, CONTACT_COMPANY_PRIMARY})
    ]
    assert hubspot.associations("contact", contact, "company") == {
        acme: {CONTACT_COMPANY, CONTACT_COMPANY_PRIMARY}
    }
    assert hubspot.redundant_writes == 0


def test_a_new_company_finds_its_contacts_by_email_domain(hubspot, make_planner):
    elsewhere = hubspot.add_record("company", {"domain": "elsewhere.example"})
    ann = hubspot.add_record("contact", {"email": "ann@acme.com"})
    bob = hubspot.add_record("contact", {"email": "Bob@Acme.com"})
    cy = hubspot.add_record("contact", {"email": "cy@acme.com"})
    dee = hubspot.add_record("contact", {"email": "dee@other.example"})
    hubspot.associate("contact", bob, "company", elsewhere, [CONTACT_COMPANY_PRIMARY])
    hubspot.associate("contact", cy, "company", elsewhere)
    acme = hubspot.add_record("company", {"domain": "www.ACME.com"})
    new = created(acme, "company")

    result = make_planner().run([new])

    assert result.outcomes == {
        new.dedup_key: applied(
            3,
            rules=[CONTACT_RULE],
            written=[
                f"contact:{ann}→company:{acme} type=1,279",
                f"contact:{bob}→company:{acme} type=279",
                f"contact:{cy}→company:{acme} type=279",
            ],
        )
    }
    assert hubspot.associations("company", acme, "contact") == {
        ann: {COMPANY_CONTACT, COMPANY_CONTACT_PRIMARY},
        bob: {COMPANY_CONTACT},
        cy: {COMPANY_CONTACT},
    }
    assert hubspot.associations("contact", bob, "company")[elsewhere] == {
        CONTACT_COMPANY,
        CONTACT_COMPANY_PRIMARY,
    }
    assert hubspot.associations("contact", dee, "company") == {}


@pytest.mark.parametrize("api_version", API_VERSIONS)
def test_a_contact_finds_its_company_stored_with_www(
    hubspot, make_planner, api_version
):
    late = hubspot.add_record("company", {"domain": "www.Late.example"})
    contact = hubspot.add_record("contact", {"email": "lea@late.example"})
    new = created(contact)

    result = make_planner(api_version=api_version).run([new])

    assert result.outcomes == {
        new.dedup_key: applied(
            1,
            rules=[CONTACT_RULE],
            written=[f"contact:{contact}→company:{late} type=1,279"],
        )
    }
    # One search asks for both forms of the domain.
    assert searched_values(hubspot) == [["late.example", "www.late.example"]]
    assert hubspot.associations("contact", contact, "company") == {
        late: {CONTACT_COMPANY, CONTACT_COMPANY_PRIMARY}
    }


def test_a_contact_matches_a_company_with_and_one_without_www(hubspot, make_planner):
    bare = hubspot.add_record("company", {"domain": "acme.com"})
    with_www = hubspot.add_record("company", {"domain": "WWW.acme.com"})
    elsewhere = hubspot.add_record("company", {"domain": "www.www.acme.com"})
    contact = hubspot.add_record("contact", {"email": "ann@www.acme.com"})
    new = created(contact)

    result = make_planner().run([new])

    assert result.outcomes[new.dedup_key]["created"] == 2
    assert hubspot.associations("contact", contact, "company") == {
        bare: {CONTACT_COMPANY},
        with_www: {CONTACT_COMPANY},
    }
    assert hubspot.associations("company", elsewhere, "contact") == {}


def test_a_website_host_matches_a_company_stored_with_www(
    hubspot, make_planner, rules_file
):
    rules = rules_file(
        """
        [[rule]]
        name = "contact-company-by-website"
        kind = "match"
        from = "contact"
        to = "company"
        property = "website"
        transform = "url_host"
        to_property = "domain"
        """
    )
    stored_with_www = hubspot.add_record("company", {"domain": "www.acme.com"})
    contact = hubspot.add_record("contact", {"website": "acme.com"})
    new = created(contact)

    result = make_planner(rules).run([new])

    assert result.outcomes[new.dedup_key]["written"] == [
        f"contact:{contact}→company:{stored_with_www} type=279"
    ]


def test_a_new_company_finds_contacts_whose_email_host_has_www(hubspot, make_planner):
    ann = hubspot.add_record("contact", {"email": "ann@www.acme.com"})
    bob = hubspot.add_record("contact", {"email": "bob@acme.com"})
    acme = hubspot.add_record("company", {"domain": "acme.com"})
    new = created(acme, "company")

    result = make_planner().run([new])

    assert result.outcomes[new.dedup_key]["created"] == 2
    assert searched_values(hubspot) == [["acme.com", "www.acme.com"]]
    assert set(hubspot.associations("company", acme, "contact")) == {ann, bob}


def test_values_of_other_transforms_are_searched_without_a_www_form(
    hubspot, make_planner, rules_file
):
    rules = rules_file(
        """
        [[rule]]
        name = "contact-company-by-code"
        kind = "match"
        from = "contact"
        to = "company"
        property = "company_code"
        transform = "lower"
        to_property = "code"
        """
    )
    hubspot.add_record("company", {"code": "www.acme"})
    contact = hubspot.add_record("contact", {"company_code": "ACME"})
    new = created(contact)

    result = make_planner(rules).run([new])

    assert searched_values(hubspot) == [["acme"]]
    assert result.recheck == [new]


def test_a_domain_and_its_www_form_are_searched_in_the_same_call(hubspot, make_planner):
    # 60 domains make 120 values: more than one IN filter takes (VALUES_PER_FILTER).
    companies = {}
    for n in range(60):
        domain = f"firm{n:02}.example"
        stored = f"www.{domain}" if n % 2 else domain
        companies[domain] = hubspot.add_record("company", {"domain": stored})
    contacts = {
        hubspot.add_record("contact", {"email": f"someone@{domain}"}): company
        for domain, company in companies.items()
    }

    result = make_planner().run([created(contact) for contact in contacts])

    [search] = [call for call in hubspot.calls if call["kind"] == "search"]
    groups = [g["filters"][0]["values"] for g in search["body"]["filterGroups"]]
    assert [len(values) for values in groups] == [100, 20]
    for values in groups:
        assert {f"www.{v}" for v in values if not v.startswith("www.")} == {
            v for v in values if v.startswith("www.")
        }
    assert result.created == 60
    for contact, company in contacts.items():
        assert set(hubspot.associations("contact", contact, "company")) == {company}


def test_a_new_free_mail_company_finds_no_contacts(hubspot, make_planner):
    hubspot.add_record("contact", {"email": "ann@gmail.com"})
    company = hubspot.add_record("company", {"domain": "gmail.com"})
    new = created(company, "company")

    result = make_planner().run([new])

    assert result.outcomes == {new.dedup_key: skipped("free_mail_domain")}
    assert result.recheck == []
    assert hubspot.associations("company", company, "contact") == {}


def test_a_contact_and_its_company_created_together_are_associated_once(
    hubspot, make_planner
):
    company = hubspot.add_record("company", {"domain": "acme.com"})
    contact = hubspot.add_record("contact", {"email": "ann@acme.com"})
    events = [created(contact), created(company, "company")]

    result = make_planner().run(events)

    assert [result.outcomes[e.dedup_key]["outcome"] for e in events] == [
        "applied",
        "applied",
    ]
    assert result.created == 1
    assert sent_inputs(hubspot) == [
        (contact, company, {CONTACT_COMPANY, CONTACT_COMPANY_PRIMARY})
    ]
    assert hubspot.redundant_writes == 0


# -- deals through their contacts -----------------------------------------------


def test_a_deal_gets_the_companies_of_its_contacts(hubspot, make_planner):
    acme = hubspot.add_record("company", {"domain": "acme.com"})
    globex = hubspot.add_record("company", {"domain": "globex.example"})
    ann = hubspot.add_record("contact", {"email": "ann@acme.com"})
    bob = hubspot.add_record("contact", {"email": "bob@globex.example"})
    hubspot.associate("contact", ann, "company", acme)
    hubspot.associate("contact", bob, "company", globex)
    deal = hubspot.add_record("deal", {"dealname": "Renewal"})
    hubspot.associate("deal", deal, "contact", ann)
    hubspot.associate("deal", deal, "contact", bob)
    new = created(deal, "deal")

    result = make_planner().run([new])

    assert result.outcomes == {
        new.dedup_key: applied(
            2,
            rules=[DEAL_RULE],
            written=[
                f"deal:{deal}→company:{acme} type=341",
                f"deal:{deal}→company:{globex} type=341",
            ],
        )
    }
    assert hubspot.associations("deal", deal, "company") == {
        acme: {DEAL_COMPANY},
        globex: {DEAL_COMPANY},
    }


def test_a_deal_whose_contacts_share_one_company_gets_it_as_primary(
    hubspot, make_planner
):
    acme = hubspot.add_record("company", {"domain": "acme.com"})
    deal = hubspot.add_record("deal", {"dealname": "Renewal"})
    for name in ("ann", "bob"):
        contact = hubspot.add_record("contact", {"email": f"{name}@acme.com"})
        hubspot.associate("contact", contact, "company", acme)
        hubspot.associate("deal", deal, "contact", contact)
    new = created(deal, "deal")

    result = make_planner().run([new])

    assert result.outcomes[new.dedup_key]["written"] == [
        f"deal:{deal}→company:{acme} type=5,341"
    ]
    assert hubspot.associations("deal", deal, "company") == {
        acme: {DEAL_COMPANY, DEAL_COMPANY_PRIMARY}
    }


def test_a_deal_that_has_a_primary_company_keeps_it(hubspot, make_planner):
    acme = hubspot.add_record("company", {"domain": "acme.com"})
    holding = hubspot.add_record("company", {"domain": "holding.example"})
    contact = hubspot.add_record("contact", {"email": "ann@acme.com"})
    hubspot.associate("contact", contact, "company", acme)
    deal = hubspot.add_record("deal", {"dealname": "Renewal"})
    hubspot.associate("deal", deal, "contact", contact)
    hubspot.associate("deal", deal, "company", holding, [DEAL_COMPANY_PRIMARY])
    new = created(deal, "deal")

    make_planner().run([new])

    assert hubspot.associations("deal", deal, "company") == {
        holding: {DEAL_COMPANY, DEAL_COMPANY_PRIMARY},
        acme: {DEAL_COMPANY},
    }


def test_a_deal_created_with_its_contacts_gets_their_new_companies(
    hubspot, make_planner
):
    acme = hubspot.add_record("company", {"domain": "acme.com"})
    contact = hubspot.add_record("contact", {"email": "ann@acme.com"})
    deal = hubspot.add_record("deal", {"dealname": "First order"})
    hubspot.associate("deal", deal, "contact", contact)
    events = [created(contact), created(deal, "deal")]

    result = make_planner().run(events)

    assert result.outcomes[events[1].dedup_key]["written"] == [
        f"deal:{deal}→company:{acme} type=5,341"
    ]
    assert hubspot.associations("deal", deal, "company") == {
        acme: {DEAL_COMPANY, DEAL_COMPANY_PRIMARY}
    }


def test_a_deal_without_contacts_has_no_candidate_and_no_recheck(hubspot, make_planner):
    deal = hubspot.add_record("deal", {"dealname": "Cold"})
    new = created(deal, "deal")

    result = make_planner().run([new])

    assert result.outcomes == {new.dedup_key: skipped("no_candidate")}
    assert result.recheck == []


@pytest.mark.parametrize("api_version", API_VERSIONS)
def test_a_contact_associated_with_a_deal_later_replans_the_deal(
    hubspot, make_planner, api_version
):
    acme = hubspot.add_record("company", {"domain": "acme.com"})
    contact = hubspot.add_record("contact", {"email": "ann@acme.com"})
    hubspot.associate("contact", contact, "company", acme, [CONTACT_COMPANY_PRIMARY])
    deal = hubspot.add_record("deal", {"dealname": "Renewal"})
    make_planner(api_version=api_version).run([created(deal, "deal")])
    hubspot.associate("deal", deal, "contact", contact)
    # HubSpot sends one event for each side of the new pair.
    changes = [
        associated("deal", deal, "contact", contact),
        associated("contact", contact, "deal", deal),
    ]

    result = make_planner(api_version=api_version).run(changes)

    assert result.outcomes == {
        changes[0].dedup_key: applied(
            1, rules=[DEAL_RULE], written=[f"deal:{deal}→company:{acme} type=5,341"]
        ),
        changes[1].dedup_key: applied(present=1, rules=[DEAL_RULE]),
    }
    assert result.created == 1
    assert len(write_calls(hubspot)) == 1
    assert hubspot.associations("deal", deal, "company") == {
        acme: {DEAL_COMPANY, DEAL_COMPANY_PRIMARY}
    }


@pytest.mark.parametrize("api_version", API_VERSIONS)
def test_a_contact_that_gets_a_company_later_gives_it_to_its_deals(
    hubspot, make_planner, api_version
):
    ann = hubspot.add_record("contact", {"email": "ann@acme.com"})
    deal = hubspot.add_record("deal", {"dealname": "Renewal"})
    hubspot.associate("deal", deal, "contact", ann)
    planned = created(deal, "deal")
    first = make_planner(api_version=api_version).run([planned])
    assert first.outcomes == {planned.dedup_key: skipped("no_candidate")}
    # A user associates the contact with a company of another domain; HubSpot
    # tells both sides.
    partner = hubspot.add_record("company", {"domain": "partner.example"})
    hubspot.associate("contact", ann, "company", partner)
    changes = both_sides("contact", ann, "company", partner)
    hubspot.reset_counters()

    result = make_planner(api_version=api_version).run(changes)

    assert result.outcomes == {
        changes[0].dedup_key: applied(
            1, rules=[DEAL_RULE], written=[f"deal:{deal}→company:{partner} type=5,341"]
        ),
        changes[1].dedup_key: applied(present=1, rules=[DEAL_RULE]),
    }
    assert result.created == 1
    # The contact's deals, then the deal planned as a re-planned deal is.
    assert association_reads(hubspot) == [
        (CONTACT, DEAL, [ann]),
        (DEAL, CONTACT, [deal]),
        (CONTACT, COMPANY, [ann]),
        (DEAL, COMPANY, [deal]),
    ]
    assert len(write_calls(hubspot)) == 1
    assert hubspot.associations("deal", deal, "company") == {
        partner: {DEAL_COMPANY, DEAL_COMPANY_PRIMARY}
    }


def test_a_company_created_later_reaches_the_deals_of_the_contacts_it_finds(
    hubspot, make_planner
):
    ann = hubspot.add_record("contact", {"email": "ann@acme.com"})
    bob = hubspot.add_record("contact", {"email": "bob@acme.com"})
    cy = hubspot.add_record("contact", {"email": "cy@globex.example"})
    globex = hubspot.add_record("company", {"domain": "globex.example"})
    hubspot.associate("contact", cy, "company", globex)
    anns = hubspot.add_record("deal", {"dealname": "Ann's"})
    shared = hubspot.add_record("deal", {"dealname": "Shared"})
    mixed = hubspot.add_record("deal", {"dealname": "Mixed"})
    hubspot.associate("deal", anns, "contact", ann)
    for contact in (ann, bob):
        hubspot.associate("deal", shared, "contact", contact)
    for contact in (bob, cy):
        hubspot.associate("deal", mixed, "contact", contact)
    hubspot.associate("deal", mixed, "company", globex, [DEAL_COMPANY_PRIMARY])
    acme = hubspot.add_record("company", {"domain": "acme.com"})
    make_planner().run([created(acme, "company")])
    # The reverse rule's writes come back as generic changes, from both sides.
    changes = [
        generic_associated(from_type, from_id, to_type, to_id)
        for contact in (ann, bob)
        for from_type, from_id, to_type, to_id in (
            ("contact", contact, "company", acme),
            ("company", acme, "contact", contact),
        )
    ]
    hubspot.reset_counters()

    result = make_planner().run(changes)

    # The first change of each deal's contact counts what its deals got.
    assert [result.outcomes[c.dedup_key] for c in changes] == [
        applied(
            2,
            rules=[DEAL_RULE],
            written=[
                f"deal:{anns}→company:{acme} type=5,341",
                f"deal:{shared}→company:{acme} type=5,341",
            ],
        ),
        applied(present=2, rules=[DEAL_RULE]),
        # Bob's deals: the shared one, and the mixed one with both companies.
        applied(
            1,
            2,
            rules=[DEAL_RULE],
            written=[f"deal:{mixed}→company:{acme} type=341"],
        ),
        applied(present=3, rules=[DEAL_RULE]),
    ]
    assert result.created == 3
    # One read of both contacts' deals for the whole plan.
    assert association_reads(hubspot)[0] == (CONTACT, DEAL, sorted([ann, bob]))
    assert hubspot.associations("deal", anns, "company") == {
        acme: {DEAL_COMPANY, DEAL_COMPANY_PRIMARY}
    }
    assert hubspot.associations("deal", shared, "company") == {
        acme: {DEAL_COMPANY, DEAL_COMPANY_PRIMARY}
    }
    # A deal's Primary stays where it is.
    assert hubspot.associations("deal", mixed, "company") == {
        globex: {DEAL_COMPANY, DEAL_COMPANY_PRIMARY},
        acme: {DEAL_COMPANY},
    }
    assert hubspot.redundant_writes == 0


def test_a_contact_without_deals_that_gets_a_company_has_no_candidate(
    hubspot, make_planner
):
    acme = hubspot.add_record("company", {"domain": "acme.com"})
    ann = hubspot.add_record("contact", {"email": "ann@acme.com"})
    hubspot.associate("contact", ann, "company", acme)
    changes = both_sides("contact", ann, "company", acme)

    result = make_planner().run(changes)

    assert result.outcomes == {c.dedup_key: skipped("no_candidate") for c in changes}
    assert association_reads(hubspot) == [(CONTACT, DEAL, [ann])]
    assert hubspot.call_count() == 1


VIA_CONTACTS_TO_TICKETS = """
[[rule]]
name = "ticket-company-via-contact"
kind = "via"
from = "ticket"
through = "contact"
to = "company"
"""


def test_every_via_rule_through_the_contact_replans_its_records(
    hubspot, make_planner, rules_file
):
    rules = rules_file(DEFAULT_RULES_TOML + VIA_CONTACTS_TO_TICKETS)
    ann = hubspot.add_record("contact", {"email": "ann@acme.com"})
    deal = hubspot.add_record("deal", {"dealname": "Renewal"})
    ticket = hubspot.add_record("ticket", {"subject": "Broken"})
    hubspot.associate("deal", deal, "contact", ann)
    hubspot.associate("ticket", ticket, "contact", ann)
    acme = hubspot.add_record("company", {"domain": "acme.com"})
    hubspot.associate("contact", ann, "company", acme)
    change = associated("company", acme, "contact", ann)

    result = make_planner(rules).run([change])

    assert result.outcomes[change.dedup_key] == applied(
        2,
        rules=[DEAL_RULE, "ticket-company-via-contact"],
        written=[
            f"deal:{deal}→company:{acme} type=5,341",
            f"ticket:{ticket}→company:{acme} type=339",
        ],
    )
    assert (CONTACT, DEAL, [ann]) in association_reads(hubspot)
    assert (CONTACT, TICKET, [ann]) in association_reads(hubspot)


def test_a_contacts_change_replans_only_the_deals_a_rules_filters_let_through(
    hubspot, make_planner, rules_file
):
    rules = rules_file(
        """
        [[rule]]
        name = "won-deal-companies-via-contacts"
        kind = "via"
        from = "deal"
        through = "contact"
        to = "company"

        [rule.when]
        dealstage = "closedwon"
        """
    )
    ann = hubspot.add_record("contact", {"email": "ann@acme.com"})
    won = hubspot.add_record("deal", {"dealstage": "closedwon"})
    open_deal = hubspot.add_record("deal", {"dealstage": "appointmentscheduled"})
    for deal in (won, open_deal):
        hubspot.associate("deal", deal, "contact", ann)
    bob = hubspot.add_record("contact", {"email": "bob@acme.com"})
    hubspot.associate("deal", open_deal, "contact", bob)
    acme = hubspot.add_record("company", {"domain": "acme.com"})
    for contact in (ann, bob):
        hubspot.associate("contact", contact, "company", acme)
    changes = [
        associated("contact", ann, "company", acme),
        associated("contact", bob, "company", acme),
    ]

    result = make_planner(rules).run(changes)

    assert result.outcomes == {
        changes[0].dedup_key: applied(
            1,
            rules=["won-deal-companies-via-contacts"],
            written=[f"deal:{won}→company:{acme} type=341"],
        ),
        changes[1].dedup_key: skipped("filtered_out"),
    }
    assert hubspot.associations("deal", open_deal, "company") == {}


def test_association_changes_no_rule_feeds_are_skipped(hubspot, make_planner):
    acme = hubspot.add_record("company", {"domain": "acme.com"})
    contact = hubspot.add_record("contact", {"email": "ann@acme.com"})
    deal = hubspot.add_record("deal", {"dealname": "Renewal"})
    hubspot.associate("deal", deal, "contact", contact)
    changes = [
        associated("deal", deal, "contact", contact, removed=True),
        associated("contact", contact, "company", acme, removed=True),
        associated("company", acme, "contact", contact, removed=True),
        associated("deal", deal, "company", acme),
        associated("company", acme, "deal", deal),
    ]

    result = make_planner().run(changes)

    assert result.outcomes == {c.dedup_key: skipped("no_rule") for c in changes}
    assert hubspot.calls == []


# -- rules from a file ----------------------------------------------------------


def test_a_custom_object_matches_companies_by_a_lower_cased_property(
    hubspot, make_planner, rules_file
):
    rules = rules_file(
        """
        [[rule]]
        name = "widget-company-by-code"
        kind = "match"
        from = "2-123"
        to = "company"
        property = "company_code"
        transform = "lower"
        to_property = "code"
        """
    )
    company = hubspot.add_record("company", {"code": "acme-7"})
    widget = hubspot.add_record("2-123", {"company_code": " ACME-7 "})
    new = created(widget, "2-123")

    result = make_planner(rules).run([new])

    assert result.outcomes[new.dedup_key]["created"] == 1
    companies = hubspot.associations("2-123", widget, "company")
    assert list(companies) == [company]
    # A custom object's unlabeled type is one of the portal's own.
    assert [category for category, _ in companies[company]] == ["USER_DEFINED"]


def test_a_contact_matches_companies_by_the_host_of_its_website(
    hubspot, make_planner, rules_file
):
    rules = rules_file(
        """
        [[rule]]
        name = "contact-company-by-website"
        kind = "match"
        from = "contacts"
        to = "companies"
        property = "website"
        transform = "url_host"
        to_property = "domain"
        """
    )
    company = hubspot.add_record("company", {"domain": "acme.com"})
    contact = hubspot.add_record("contact", {"website": "https://WWW.acme.com/team"})
    new = created(contact)

    result = make_planner(rules).run([new])

    assert result.outcomes[new.dedup_key]["written"] == [
        f"contact:{contact}→company:{company} type=279"
    ]


def test_a_reverse_match_without_reverse_property_searches_the_property(
    hubspot, make_planner, rules_file
):
    rules = rules_file(
        """
        [[rule]]
        name = "contact-company-by-code"
        kind = "match"
        from = "contact"
        to = "company"
        property = "company_code"
        transform = "lower"
        to_property = "code"
        reverse = true
        """
    )
    contact = hubspot.add_record("contact", {"company_code": "acme"})
    company = hubspot.add_record("company", {"code": "ACME"})
    new = created(company, "company")

    result = make_planner(rules).run([new])

    assert result.outcomes[new.dedup_key]["written"] == [
        f"contact:{contact}→company:{company} type=279"
    ]


LINE_ITEM_BY_DEAL_ID = """
[[rule]]
name = "line-item-deal-by-id"
kind = "reference"
from = "line_item"
to = "deal"
property = "external_deal_id"
"""


def test_a_line_item_belongs_with_the_deal_whose_id_it_holds(
    hubspot, make_planner, rules_file
):
    deal = hubspot.add_record("deal", {"dealname": "Order"})
    line_item = hubspot.add_record("line_item", {"external_deal_id": str(deal)})
    new = created(line_item, "line_item")

    result = make_planner(rules_file(LINE_ITEM_BY_DEAL_ID)).run([new])

    assert result.outcomes[new.dedup_key] == applied(
        1,
        rules=["line-item-deal-by-id"],
        written=[f"line_item:{line_item}→deal:{deal} type=20"],
    )
    assert hubspot.associations("line_item", line_item, "deal") == {
        deal: {LINE_ITEM_DEAL}
    }
    assert hubspot.call_count("search") == 0


@pytest.mark.parametrize("held", ["999999", "not-an-id"])
def test_a_line_item_naming_no_deal_has_no_candidate(
    hubspot, make_planner, rules_file, held
):
    line_item = hubspot.add_record("line_item", {"external_deal_id": held})
    new = created(line_item, "line_item")

    result = make_planner(rules_file(LINE_ITEM_BY_DEAL_ID)).run([new])

    assert result.outcomes == {new.dedup_key: skipped("no_candidate")}
    assert result.recheck == []


def test_a_line_item_belongs_with_the_deal_of_its_order_number(
    hubspot, make_planner, rules_file
):
    rules = rules_file(
        """
        [[rule]]
        name = "line-item-deal-by-order-number"
        kind = "reference"
        from = "line_item"
        to = "deal"
        property = "order_number"
        to_property = "order_number"
        """
    )
    hubspot.add_record("deal", {"order_number": "SO-1001"})
    deal = hubspot.add_record("deal", {"order_number": "SO-1002"})
    line_item = hubspot.add_record("line_item", {"order_number": "SO-1002"})
    new = created(line_item, "line_item")

    result = make_planner(rules).run([new])

    assert result.outcomes[new.dedup_key]["written"] == [
        f"line_item:{line_item}→deal:{deal} type=20"
    ]


def test_a_ticket_gets_the_companies_of_its_contacts(hubspot, make_planner, rules_file):
    rules = rules_file(
        """
        [[rule]]
        name = "ticket-company-via-contact"
        kind = "via"
        from = "ticket"
        through = "contact"
        to = "company"
        primary_when_single = true
        """
    )
    acme = hubspot.add_record("company", {"domain": "acme.com"})
    contact = hubspot.add_record("contact", {"email": "ann@acme.com"})
    hubspot.associate("contact", contact, "company", acme)
    ticket = hubspot.add_record("ticket", {"subject": "Broken"})
    hubspot.associate("ticket", ticket, "contact", contact)
    new = created(ticket, "ticket")

    make_planner(rules).run([new])

    assert hubspot.associations("ticket", ticket, "company") == {
        acme: {TICKET_COMPANY, TICKET_COMPANY_PRIMARY}
    }


CONTACT_COMPANY_LABELED = """
[[rule]]
name = "billing-contact"
kind = "match"
from = "contact"
to = "company"
property = "billing_domain"
transform = "url_host"
to_property = "domain"
association = "billing contact"
"""


def test_a_labeled_write_keeps_the_labels_the_pair_has(
    hubspot, make_planner, rules_file
):
    hubspot.add_label("contact", "company", "Billing contact", 901, 902)
    hubspot.add_label("contact", "company", "Decision maker", 903, 904)
    acme = hubspot.add_record("company", {"domain": "acme.com"})
    contact = hubspot.add_record("contact", {"billing_domain": "acme.com"})
    hubspot.associate("contact", contact, "company", acme, [DECISION_MAKER])
    new = created(contact)

    result = make_planner(rules_file(CONTACT_COMPANY_LABELED)).run([new])

    assert result.outcomes[new.dedup_key]["written"] == [
        f"contact:{contact}→company:{acme} type=901"
    ]
    assert sent_inputs(hubspot) == [
        (contact, acme, {CONTACT_COMPANY, DECISION_MAKER, BILLING})
    ]
    assert hubspot.associations("contact", contact, "company") == {
        acme: {CONTACT_COMPANY, DECISION_MAKER, BILLING}
    }
    assert hubspot.redundant_writes == 0


DECISION_MAKER_RULE = """
[[rule]]
name = "contact-company-decision-maker"
kind = "match"
from = "contact"
to = "company"
property = "billing_domain"
transform = "url_host"
to_property = "domain"
association = "decision maker"
"""


def test_two_plans_labeling_one_pair_at_once_never_drop_a_label(
    hubspot, make_planner, rules_file, redis
):
    hubspot.add_label("contact", "company", "Billing contact", 901, 902)
    hubspot.add_label("contact", "company", "Decision maker", 903, 904)
    acme = hubspot.add_record("company", {"domain": "acme.com"})
    contact = hubspot.add_record("contact", {"billing_domain": "acme.com"})
    new = created(contact)
    # The second plan reads the pair before the first one's write lands.
    first = make_planner(rules_file(CONTACT_COMPANY_LABELED), client=RacingClient)
    second = make_planner(rules_file(DECISION_MAKER_RULE))
    raced = []
    first.client.race = lambda: raced.append(second.run([new]))

    first.run([new])

    ((waiting, error),) = raced[0].retry
    assert waiting == new
    assert isinstance(error, PairBusy)
    # Its retry waits for the first plan's claim rather than spending attempts
    # while the claim holds.
    assert 590 < error.retry_after <= 600
    assert hubspot.associations("contact", contact, "company") == {
        acme: {CONTACT_COMPANY, BILLING}
    }

    # Once the first plan's claim has expired, the retry reads the pair again.
    for key in redis.scan_iter("associator:write:*:labeling"):
        redis.delete(key)
    again = make_planner(rules_file(DECISION_MAKER_RULE)).run([new])

    assert again.outcomes[new.dedup_key]["created"] == 1
    assert hubspot.associations("contact", contact, "company") == {
        acme: {CONTACT_COMPANY, BILLING, DECISION_MAKER}
    }
    assert hubspot.redundant_writes == 0


def test_a_label_unknown_to_the_portal_is_a_configuration_error(
    hubspot, make_planner, rules_file
):
    hubspot.add_record("company", {"domain": "acme.com"})
    contact = hubspot.add_record("contact", {"billing_domain": "acme.com"})

    planner = make_planner(rules_file(CONTACT_COMPANY_LABELED))

    with pytest.raises(RulesError, match="'billing contact' is not defined"):
        planner.run([created(contact)])
    assert write_calls(hubspot) == []


def test_a_users_label_waits_while_the_labels_cannot_be_read(
    hubspot, make_planner, rules_file
):
    hubspot.add_label("contact", "company", "Billing contact", 901, 902)
    hubspot.add_record("company", {"domain": "acme.com"})
    contact = hubspot.add_record("contact", {"billing_domain": "acme.com"})
    hubspot.fail_next.append(("labels", 503, {}))

    planner = make_planner(rules_file(CONTACT_COMPANY_LABELED))

    # HubSpot's defined types know no user label: a retry, not a rules error.
    with pytest.raises(TransientError):
        planner.run([created(contact)])
    assert write_calls(hubspot) == []


def test_a_primary_rule_adds_primary_only_where_there_is_none(
    hubspot, make_planner, rules_file
):
    rules = rules_file(
        """
        [[rule]]
        name = "contact-company-primary"
        kind = "match"
        from = "contact"
        to = "company"
        property = "email"
        transform = "email_domain"
        to_property = "domain"
        association = "Primary"
        """
    )
    old = hubspot.add_record("company", {"domain": "old.example"})
    acme = hubspot.add_record("company", {"domain": "acme.com"})
    ann = hubspot.add_record("contact", {"email": "ann@acme.com"})
    bob = hubspot.add_record("contact", {"email": "bob@acme.com"})
    hubspot.associate("contact", bob, "company", old, [CONTACT_COMPANY_PRIMARY])

    make_planner(rules).run([created(ann), created(bob)])

    assert hubspot.associations("contact", ann, "company") == {
        acme: {CONTACT_COMPANY, CONTACT_COMPANY_PRIMARY}
    }
    assert hubspot.associations("contact", bob, "company") == {
        old: {CONTACT_COMPANY, CONTACT_COMPANY_PRIMARY},
        acme: {CONTACT_COMPANY},
    }


CUSTOMERS_ONLY = """
[[rule]]
name = "customer-company-by-email-domain"
kind = "match"
from = "contact"
to = "company"
property = "email"
transform = "email_domain"
to_property = "domain"
reverse = true
reverse_property = "hs_email_domain"

[rule.when]
lifecyclestage = ["customer", "evangelist"]
"""


def test_when_filters_decide_which_new_records_a_rule_plans(
    hubspot, make_planner, rules_file
):
    acme = hubspot.add_record("company", {"domain": "acme.com"})
    customer = hubspot.add_record(
        "contact", {"email": "ann@acme.com", "lifecyclestage": "Customer"}
    )
    lead = hubspot.add_record(
        "contact", {"email": "bob@acme.com", "lifecyclestage": "lead"}
    )
    unknown = hubspot.add_record(
        "contact", {"email": "cy@acme.com", "lifecyclestage": None}
    )
    events = [created(customer), created(lead), created(unknown)]

    result = make_planner(rules_file(CUSTOMERS_ONLY)).run(events)

    assert result.outcomes[events[0].dedup_key]["created"] == 1
    assert result.outcomes[events[1].dedup_key] == skipped("filtered_out")
    assert result.outcomes[events[2].dedup_key] == skipped("filtered_out")
    assert set(hubspot.associations("company", acme, "contact")) == {customer}


def test_when_filters_hold_for_the_records_a_reverse_match_finds(
    hubspot, make_planner, rules_file
):
    customer = hubspot.add_record(
        "contact", {"email": "ann@acme.com", "lifecyclestage": "evangelist"}
    )
    hubspot.add_record("contact", {"email": "bob@acme.com", "lifecyclestage": "lead"})
    acme = hubspot.add_record("company", {"domain": "acme.com"})

    make_planner(rules_file(CUSTOMERS_ONLY)).run([created(acme, "company")])

    assert set(hubspot.associations("company", acme, "contact")) == {customer}


# -- outcomes -------------------------------------------------------------------


def test_every_event_ends_in_one_outcome_or_a_recheck(hubspot, make_planner):
    acme = hubspot.add_record("company", {"domain": "acme.com"})
    matched = hubspot.add_record("contact", {"email": "ann@acme.com"})
    free_mail = hubspot.add_record("contact", {"email": "bob@gmail.com"})
    unmatched = hubspot.add_record("contact", {"email": "cy@unknown.example"})
    lonely_deal = hubspot.add_record("deal", {"dealname": "Cold"})
    product = hubspot.add_record("product", {"name": "Widget"})
    events = {
        "applied": created(matched),
        "record_missing": created(404),
        "free_mail_domain": created(free_mail),
        "recheck": created(unmatched),
        "no_candidate": created(lonely_deal, "deal"),
        "no_rule": created(product, "product"),
    }

    result = make_planner().run(list(events.values()))

    assert result.outcomes == {
        events["applied"].dedup_key: applied(
            1,
            rules=[CONTACT_RULE],
            written=[f"contact:{matched}→company:{acme} type=1,279"],
        ),
        events["record_missing"].dedup_key: skipped("record_missing"),
        events["free_mail_domain"].dedup_key: skipped("free_mail_domain"),
        events["no_candidate"].dedup_key: skipped("no_candidate"),
        events["no_rule"].dedup_key: skipped("no_rule"),
    }
    assert result.recheck == [events["recheck"]]
    assert (result.retry, result.dead) == ([], [])
    assert result.api_calls == hubspot.call_count()


@pytest.mark.parametrize("company_first", [True, False])
def test_a_pair_two_events_want_counts_as_created_for_the_first_of_them(
    hubspot, make_planner, company_first
):
    acme = hubspot.add_record("company", {"domain": "acme.com"})
    ann = hubspot.add_record("contact", {"email": "ann@acme.com"})
    bob = hubspot.add_record("contact", {"email": "bob@acme.com"})
    company_event = created(acme, "company")
    contact_events = [created(ann), created(bob)]
    events = (
        [company_event, *contact_events]
        if company_first
        else [*contact_events, company_event]
    )

    result = make_planner().run(events)

    written = {
        ann: f"contact:{ann}→company:{acme} type=1,279",
        bob: f"contact:{bob}→company:{acme} type=1,279",
    }
    if company_first:
        expected = {
            company_event: applied(2, rules=[CONTACT_RULE], written=written.values()),
            contact_events[0]: applied(present=1, rules=[CONTACT_RULE]),
            contact_events[1]: applied(present=1, rules=[CONTACT_RULE]),
        }
    else:
        expected = {
            company_event: applied(present=2, rules=[CONTACT_RULE]),
            contact_events[0]: applied(1, rules=[CONTACT_RULE], written=[written[ann]]),
            contact_events[1]: applied(1, rules=[CONTACT_RULE], written=[written[bob]]),
        }
    assert result.outcomes == {e.dedup_key: o for e, o in expected.items()}
    assert result.created == 2
    assert sum(o["created"] for o in result.outcomes.values()) == result.created


def test_a_pair_is_created_for_the_first_event_that_ends_applied(hubspot, make_planner):
    acme = hubspot.add_record("company", {"domain": "acme.com"})
    ann = hubspot.add_record("contact", {"email": "ann@acme.com"})
    bob = hubspot.add_record("contact", {"email": "bob@acme.com"})
    company_event, ann_event = created(acme, "company"), created(ann)
    # Ann's pair is written, Bob's waits for a retry: so does the company's event.
    hubspot.fail_next = [
        (
            "associations_create",
            207,
            {},
            {
                "status": "COMPLETE",
                "results": [
                    {
                        "fromObjectTypeId": CONTACT,
                        "fromObjectId": ann,
                        "toObjectTypeId": COMPANY,
                        "toObjectId": acme,
                        "labels": ["Primary"],
                    }
                ],
                "errors": [
                    {
                        **input_error(
                            "INTERNAL_ERROR",
                            "Try again.",
                            {"fromObjectId": [str(bob)], "toObjectId": [str(acme)]},
                        ),
                        "status": "503",
                    }
                ],
                "numErrors": 1,
            },
        )
    ]

    result = make_planner().run([company_event, ann_event])

    assert [retried for retried, _ in result.retry] == [company_event]
    assert result.outcomes == {
        ann_event.dedup_key: applied(
            1,
            rules=[CONTACT_RULE],
            written=[f"contact:{ann}→company:{acme} type=1,279"],
        )
    }
    assert result.created == 1


def test_a_dry_run_plans_everything_and_writes_nothing(hubspot, make_planner):
    acme = hubspot.add_record("company", {"domain": "acme.com"})
    contact = hubspot.add_record("contact", {"email": "ann@acme.com"})
    new = created(contact)

    result = make_planner(dry_run=True).run([new])

    assert result.outcomes == {
        new.dedup_key: {
            "outcome": "skipped",
            "reason": "dry_run",
            "rules": [CONTACT_RULE],
            "planned": [f"contact:{contact}→company:{acme}"],
        }
    }
    assert result.created == 0
    assert write_calls(hubspot) == []
    assert hubspot.associations("contact", contact, "company") == {}

    # It claimed nothing for good: a real run afterwards writes the pair.
    make_planner().run([new])
    assert hubspot.associations("contact", contact, "company") == {
        acme: {CONTACT_COMPANY, CONTACT_COMPANY_PRIMARY}
    }


# -- nothing written twice ------------------------------------------------------


def test_a_pair_has_one_claim_key_whichever_side_planned_it():
    from_contact = Pair(CONTACT, 1, COMPANY, 2)
    from_company = Pair(COMPANY, 2, CONTACT, 1)

    assert from_contact.claim_key(62515) == from_company.claim_key(62515)
    assert from_contact.claim_key(62515) != from_contact.claim_key(62516)
    assert from_contact.claim_key(62515) != Pair(CONTACT, 1, COMPANY, 3).claim_key(
        62515
    )


def test_a_second_plan_racing_for_the_same_pair_does_not_write_it(
    hubspot, make_planner
):
    acme = hubspot.add_record("company", {"domain": "acme.com"})
    contact = hubspot.add_record("contact", {"email": "ann@acme.com"})
    # The contact's creation and the company's, planned by two workers at once.
    contact_created, company_created = created(contact), created(acme, "company")
    first = make_planner(client=RacingClient)
    second = make_planner()
    raced = []
    first.client.race = lambda: raced.append(second.run([company_created]))

    result = first.run([contact_created])

    # The second plan does not count on the first one's write, which may still
    # fail: it reads the pair again later, and then finds it present.
    (second_result,) = raced
    assert second_result.outcomes == {}
    ((waiting, error),) = second_result.retry
    assert waiting == company_created
    assert isinstance(error, PairBusy)
    assert result.outcomes[contact_created.dedup_key]["created"] == 1
    again = make_planner().run([company_created])
    assert again.outcomes == {
        company_created.dedup_key: applied(present=1, rules=[CONTACT_RULE])
    }
    assert len(write_calls(hubspot)) == 1
    assert hubspot.redundant_writes == 0
    assert hubspot.associations("contact", contact, "company") == {
        acme: {CONTACT_COMPANY, CONTACT_COMPANY_PRIMARY}
    }


def test_a_plan_waits_briefly_for_another_plans_write_of_the_same_pair(
    hubspot, make_planner
):
    acme = hubspot.add_record("company", {"domain": "acme.com"})
    contact = hubspot.add_record("contact", {"email": "ann@acme.com"})
    contact_created, company_created = created(contact), created(acme, "company")
    first = make_planner(client=RacingClient)
    second = make_planner(claim_wait_seconds=5.0)
    results = []
    waiting = threading.Thread(
        target=lambda: results.append(second.run([company_created]))
    )
    # The second plan reads and claims while the first one is writing.
    first.client.race = lambda: (waiting.start(), time.sleep(0.3))

    first.run([contact_created])
    waiting.join(timeout=10)

    (second_result,) = results
    assert second_result.retry == []
    assert second_result.outcomes == {
        company_created.dedup_key: applied(present=1, rules=[CONTACT_RULE])
    }
    assert len(write_calls(hubspot)) == 1
    assert hubspot.redundant_writes == 0


def test_two_plans_choosing_different_primaries_never_move_one(
    hubspot, make_planner, rules_file
):
    by_code = rules_file(
        """
        [[rule]]
        name = "contact-company-by-code"
        kind = "match"
        from = "contact"
        to = "company"
        property = "company_code"
        to_property = "code"
        primary_when_single = true
        """
    )
    by_domain = hubspot.add_record("company", {"domain": "acme.com"})
    by_code_company = hubspot.add_record("company", {"code": "ACME-EU"})
    contact = hubspot.add_record(
        "contact", {"email": "ann@acme.com", "company_code": "ACME-EU"}
    )
    new = created(contact)
    # Each plan finds one company (as two plans whose searches saw different
    # companies would), and neither sees a primary yet.
    first = make_planner(client=RacingClient)
    second = make_planner(by_code)
    first.client.race = lambda: second.run([new])

    first.run([new])

    primaries_sent = [
        (from_id, to_id)
        for from_id, to_id, types in sent_inputs(hubspot)
        if types and CONTACT_COMPANY_PRIMARY in types
    ]
    assert primaries_sent == [(contact, by_domain)]
    assert hubspot.associations("contact", contact, "company") == {
        by_domain: {CONTACT_COMPANY, CONTACT_COMPANY_PRIMARY},
        by_code_company: {CONTACT_COMPANY},
    }


def test_a_failed_write_releases_its_claim_for_the_retry(hubspot, make_planner):
    acme = hubspot.add_record("company", {"domain": "acme.com"})
    contact = hubspot.add_record("contact", {"email": "ann@acme.com"})
    new = created(contact)
    hubspot.fail_next = [("associations_create", 503, {})]

    result = make_planner().run([new])

    ((retried, error),) = result.retry
    assert retried == new
    assert isinstance(error, TransientError)
    assert error.status == 503
    assert result.outcomes == {}
    assert hubspot.associations("contact", contact, "company") == {}

    again = make_planner().run([new])
    assert again.outcomes[new.dedup_key]["created"] == 1
    assert hubspot.associations("contact", contact, "company") == {
        acme: {CONTACT_COMPANY, CONTACT_COMPANY_PRIMARY}
    }


class WorkerDied(BaseException):
    """The process ends in the middle of a call, as under SIGKILL."""


class DyingClient(HubSpotClient):
    def create_associations(self, *args, **kwargs):
        raise WorkerDied


def test_a_task_delivered_again_takes_back_the_claims_its_dead_worker_left(
    hubspot, make_planner
):
    acme = hubspot.add_record("company", {"domain": "acme.com"})
    contact = hubspot.add_record("contact", {"email": "ann@acme.com"})
    new = created(contact)
    with pytest.raises(WorkerDied):
        make_planner(client=DyingClient, claim_owner="task-1").run([new])

    # Another plan leaves the pair to the claim's owner, and reads it again later
    # rather than count it as written.
    other = make_planner(claim_owner="task-2").run([new])
    assert other.outcomes == {}
    assert [type(error) for _, error in other.retry] == [PairBusy]
    assert hubspot.associations("contact", contact, "company") == {}

    # The task's message, delivered again, writes it.
    again = make_planner(claim_owner="task-1").run([new])
    assert again.outcomes[new.dedup_key]["created"] == 1
    assert hubspot.associations("contact", contact, "company") == {
        acme: {CONTACT_COMPANY, CONTACT_COMPANY_PRIMARY}
    }


def test_a_refused_write_dead_letters_its_events(hubspot, make_planner):
    hubspot.add_record("company", {"domain": "acme.com"})
    contact = hubspot.add_record("contact", {"email": "ann@acme.com"})
    new = created(contact)
    hubspot.fail_next = [("associations_create", 403, {})]

    result = make_planner().run([new])

    ((dead, reason, details),) = result.dead
    assert (dead, reason) == (new, "hubspot_refused")
    assert "status=403" in details
    assert "category=MISSING_SCOPES" in details
    assert (result.outcomes, result.retry) == ({}, [])


def test_a_partly_refused_batch_fails_only_the_refused_inputs(hubspot, make_planner):
    companies = [
        hubspot.add_record("company", {"domain": f"firm{n}.example"}) for n in range(3)
    ]
    contacts = [
        hubspot.add_record("contact", {"email": f"someone@firm{n}.example"})
        for n in range(3)
    ]
    events = [created(contact) for contact in contacts]
    done, refused, locked = zip(contacts, companies, strict=True)

    def refusal(pair, **fields):
        from_id, to_id = pair
        return {
            **input_error(
                "VALIDATION_ERROR",
                "Refused.",
                {"fromObjectId": [str(from_id)], "toObjectId": [str(to_id)]},
            ),
            **fields,
        }

    hubspot.fail_next = [
        (
            "associations_create",
            207,
            {},
            {
                "status": "COMPLETE",
                "results": [
                    {
                        "fromObjectTypeId": CONTACT,
                        "fromObjectId": done[0],
                        "toObjectTypeId": COMPANY,
                        "toObjectId": done[1],
                        "labels": ["Primary"],
                    }
                ],
                "errors": [refusal(refused), refusal(locked, status="503")],
                "numErrors": 2,
            },
        )
    ]

    result = make_planner().run(events)

    assert result.outcomes == {
        events[0].dedup_key: applied(
            1,
            rules=[CONTACT_RULE],
            written=[f"contact:{done[0]}→company:{done[1]} type=1,279"],
        )
    }
    ((dead, reason, _),) = result.dead
    assert (dead, reason) == (events[1], "hubspot_refused")
    ((retried, error),) = result.retry
    assert retried == events[2]
    assert isinstance(error, TransientError)
    assert result.created == 1

    # The refused inputs' claims are released and the confirmed one's kept:
    # planned again, only the two refused pairs are written.
    hubspot.reset_counters()
    make_planner().run(events)
    assert sorted((f, t) for f, t, _ in sent_inputs(hubspot)) == [refused, locked]


def test_a_whole_call_failure_fails_every_pair_of_that_call_only(hubspot, make_planner):
    acme = hubspot.add_record("company", {"domain": "acme.com"})
    old = hubspot.add_record("company", {"domain": "old.example"})
    primary_less = hubspot.add_record("contact", {"email": "ann@acme.com"})
    has_primary = hubspot.add_record("contact", {"email": "bob@acme.com"})
    hubspot.associate("contact", has_primary, "company", old, [CONTACT_COMPANY_PRIMARY])
    events = [created(primary_less), created(has_primary)]
    # The Primary write goes in a labeled call, the plain one in a default call.
    hubspot.fail_next = [("associations_default", 400, {})]

    result = make_planner().run(events)

    assert result.outcomes[events[0].dedup_key]["created"] == 1
    ((dead, reason, _),) = result.dead
    assert (dead, reason) == (events[1], "hubspot_refused")
    assert set(hubspot.associations("company", acme, "contact")) == {primary_less}


class SecondWriteRefused(HubSpotClient):
    """A client whose second batch write HubSpot refuses as a whole."""

    writes = 0

    def _call_with_status(self, kind, method, path, **kwargs):
        if path.endswith("/batch/create"):
            self.writes += 1
            if self.writes == 2:
                raise PermanentError("Refused.", status=400)
        return super()._call_with_status(kind, method, path, **kwargs)


def test_a_refused_call_of_a_large_write_fails_only_the_pairs_it_held(
    hubspot, make_planner
):
    contacts = []
    for n in range(INPUTS_PER_ASSOCIATION_WRITE + 1):
        hubspot.add_record("company", {"domain": f"firm{n}.example"})
        contacts.append(hubspot.add_record("contact", {"email": f"a@firm{n}.example"}))
    events = [created(contact) for contact in contacts]

    result = make_planner(client=SecondWriteRefused).run(events)

    # The first call's hundred pairs were written: their events are applied.
    assert result.created == INPUTS_PER_ASSOCIATION_WRITE
    assert len(result.outcomes) == INPUTS_PER_ASSOCIATION_WRITE
    assert [reason for _, reason, _ in result.dead] == ["hubspot_refused"]


# -- what a batch costs ---------------------------------------------------------


def warm_label_cache(planner, from_type, to_type):
    planner.labels.resolve(
        planner.client, planner.portal_id, from_type, to_type, UNLABELED
    )


@pytest.mark.parametrize("domains", [20, 100])
@pytest.mark.parametrize("api_version", API_VERSIONS)
def test_a_hundred_contact_creations_cost_at_most_five_calls(
    hubspot, make_planner, api_version, domains
):
    companies = [
        hubspot.add_record("company", {"domain": f"company{n}.example"})
        for n in range(domains)
    ]
    contacts = {}
    for n in range(100):
        domain = ("WWW." if n % 3 == 0 else "") + f"Company{n % domains}.example"
        contact = hubspot.add_record("contact", {"email": f"person{n}@{domain}"})
        contacts[contact] = companies[n % domains]
    planner = make_planner(api_version=api_version)
    warm_label_cache(planner, CONTACT, COMPANY)
    hubspot.reset_counters()

    result = planner.run([created(contact) for contact in contacts])

    assert hubspot.call_count() <= 5
    assert result.api_calls == hubspot.call_count()
    assert result.created == 100
    assert all(outcome["created"] == 1 for outcome in result.outcomes.values())
    for contact, company in contacts.items():
        assert hubspot.associations("contact", contact, "company") == {
            company: {CONTACT_COMPANY, CONTACT_COMPANY_PRIMARY}
        }
    assert hubspot.redundant_writes == 0


def test_fifty_deals_get_their_contacts_companies_in_a_handful_of_calls(
    hubspot, make_planner
):
    companies = [
        hubspot.add_record("company", {"domain": f"company{n}.example"})
        for n in range(10)
    ]
    deals = {}
    for n in range(50):
        company = companies[n % 10]
        deal = hubspot.add_record("deal", {"dealname": f"Deal {n}"})
        for person in ("buyer", "user"):
            contact = hubspot.add_record(
                "contact", {"email": f"{person}{n}@company{n % 10}.example"}
            )
            hubspot.associate("contact", contact, "company", company)
            hubspot.associate("deal", deal, "contact", contact)
        deals[deal] = company
    planner = make_planner()
    warm_label_cache(planner, DEAL, COMPANY)
    hubspot.reset_counters()

    result = planner.run([created(deal, "deal") for deal in deals])

    assert hubspot.call_count() <= 5
    assert result.created == 50
    for deal, company in deals.items():
        assert hubspot.associations("deal", deal, "company") == {
            company: {DEAL_COMPANY, DEAL_COMPANY_PRIMARY}
        }


def test_the_echo_of_its_own_contact_company_writes_costs_one_read(
    hubspot, make_planner
):
    acme = hubspot.add_record("company", {"domain": "acme.com"})
    contacts = [
        hubspot.add_record("contact", {"email": f"person{n}@acme.com"})
        for n in range(50)
    ]
    make_planner().run([created(contact) for contact in contacts])
    echoes = [e for c in contacts for e in both_sides("contact", c, "company", acme)]
    hubspot.reset_counters()

    result = make_planner().run(echoes)

    assert result.outcomes == {e.dedup_key: skipped("no_candidate") for e in echoes}
    assert association_reads(hubspot) == [(CONTACT, DEAL, sorted(contacts))]
    assert hubspot.call_count() == 1


def test_the_echo_of_its_own_writes_replans_deals_without_writing(
    hubspot, make_planner
):
    acme = hubspot.add_record("company", {"domain": "acme.com"})
    contacts, deals = [], []
    for n in range(50):
        contact = hubspot.add_record("contact", {"email": f"person{n}@acme.com"})
        deal = hubspot.add_record("deal", {"dealname": f"Deal {n}"})
        hubspot.associate("deal", deal, "contact", contact)
        contacts.append(contact)
        deals.append(deal)
    first = make_planner().run(
        [created(c) for c in contacts] + [created(d, "deal") for d in deals]
    )
    assert first.created == 100
    echoes = [e for c in contacts for e in both_sides("contact", c, "company", acme)]
    hubspot.reset_counters()

    result = make_planner().run(echoes)

    assert result.outcomes == {
        e.dedup_key: applied(present=1, rules=[DEAL_RULE]) for e in echoes
    }
    # The contacts' deals, then the deals' contacts, the contacts' companies and
    # the deals' companies: the reads of a re-planned deal, once for them all.
    assert association_reads(hubspot) == [
        (CONTACT, DEAL, contacts),
        (DEAL, CONTACT, deals),
        (CONTACT, COMPANY, contacts),
        (DEAL, COMPANY, deals),
    ]
    assert hubspot.call_count() == 4
    assert write_calls(hubspot) == []
    assert hubspot.redundant_writes == 0
