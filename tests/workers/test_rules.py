"""Rules files: what each kind of rule means, and what a bad file is told.

Every rule here comes from a TOML file through :func:`load_rules`, as the worker
reads ``ASSOCIATOR_RULES``; ``associator rules check`` prints what they do.
"""

import textwrap

import pytest

from workers.cli import main
from workers.rules import (
    FREE_MAIL_DOMAINS,
    MATCH,
    PRIMARY,
    REFERENCE,
    UNLABELED,
    VIA,
    RulesError,
    email_domain,
    load_rules,
    lower,
    url_host,
)

CONTACT, COMPANY, DEAL, TICKET, LINE_ITEM = "0-1", "0-2", "0-3", "0-5", "0-8"

MATCH_BY_EMAIL_DOMAIN = """
[[rule]]
name = "by-domain"
kind = "match"
from = "contact"
to = "company"
property = "email"
transform = "email_domain"
to_property = "domain"
"""


@pytest.fixture
def rules_file(tmp_path):
    """Write a rules file; answer its path."""

    def write(text: str, name: str = "rules.toml"):
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return path

    return write


@pytest.fixture
def one_rule(rules_file):
    """The only rule of a rules file with this text."""

    def load(text: str):
        (rule,) = load_rules(rules_file(text)).rules
        return rule

    return load


# -- the built-in defaults ------------------------------------------------------


def test_without_a_file_the_defaults_apply():
    contact_rule, deal_rule = load_rules(None).rules

    assert contact_rule.name == "contact-company-by-email-domain"
    assert contact_rule.kind == MATCH
    assert (contact_rule.from_type, contact_rule.to_type) == (CONTACT, COMPANY)
    assert (contact_rule.property, contact_rule.transform) == ("email", "email_domain")
    assert contact_rule.to_property == "domain"
    assert contact_rule.reverse
    assert contact_rule.reverse_property == "hs_email_domain"
    assert contact_rule.association == UNLABELED
    assert contact_rule.primary_when_single

    assert deal_rule.name == "deal-companies-via-contacts"
    assert deal_rule.kind == VIA
    assert (deal_rule.from_type, deal_rule.through_type, deal_rule.to_type) == (
        DEAL,
        CONTACT,
        COMPANY,
    )
    assert deal_rule.association == UNLABELED
    assert deal_rule.primary_when_single


def test_an_empty_setting_means_the_defaults():
    assert load_rules("") == load_rules(None)


def test_the_built_in_free_mail_domains_include_the_common_ones():
    common = {
        "gmail.com",
        "outlook.com",
        "yahoo.com",
        "hotmail.com",
        "icloud.com",
        "aol.com",
        "proton.me",
        "gmx.com",
    }

    assert common <= load_rules(None).free_mail_domains


def test_a_file_adds_free_mail_domains_to_the_built_in_ones(rules_file):
    path = rules_file(
        'free_mail_domains = ["Mail.Example", " post.example"]\n'
        + MATCH_BY_EMAIL_DOMAIN
    )

    assert load_rules(path).free_mail_domains == FREE_MAIL_DOMAINS | {
        "mail.example",
        "post.example",
    }


# -- transforms -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("email", "domain"),
    [
        ("ann@acme.com", "acme.com"),
        ("Ann@ACME.Com", "acme.com"),
        ("ann@www.acme.com", "acme.com"),
        ("  ann@WWW.Acme.com  ", "acme.com"),
        ("ann@acme.com.", "acme.com"),
        ("ann@sales.acme.com", "sales.acme.com"),
        ("ann@wwwacme.com", "wwwacme.com"),
        ('"ann@home"@acme.com', "acme.com"),
        ("ann", None),
        ("@acme.com", None),
        ("ann@", None),
        ("", None),
    ],
)
def test_email_domain_is_the_exact_host_lower_cased_without_www(email, domain):
    assert email_domain(email) == domain


@pytest.mark.parametrize(
    ("value", "host"),
    [
        ("https://www.Acme.com/about", "acme.com"),
        ("http://acme.com:8080/x?y=1", "acme.com"),
        ("acme.com", "acme.com"),
        ("WWW.ACME.COM", "acme.com"),
        ("acme.com/about", "acme.com"),
        ("shop.acme.com", "shop.acme.com"),
        ("   ", None),
        ("https://", None),
    ],
)
def test_url_host_is_the_host_of_a_url_or_a_bare_domain(value, host):
    assert url_host(value) == host


def test_lower_lower_cases_and_trims():
    assert lower("  ACME-42 ") == "acme-42"
    assert lower("   ") is None


def test_a_rule_compares_values_through_its_transform(one_rule):
    rule = one_rule(
        """
        [[rule]]
        name = "by-website"
        kind = "match"
        from = "contact"
        to = "company"
        property = "website"
        transform = "url_host"
        to_property = "domain"
        """
    )

    assert rule.transform == "url_host"
    assert rule.normalise("https://www.Acme.com/team") == "acme.com"
    assert rule.normalise(None) is None


def test_without_a_transform_values_are_compared_as_they_are(one_rule):
    rule = one_rule(
        """
        [[rule]]
        name = "by-code"
        kind = "match"
        from = "deal"
        to = "company"
        property = "company_code"
        to_property = "code"
        """
    )

    assert rule.transform == "none"
    assert rule.normalise(" ACME-1 ") == "ACME-1"
    assert rule.normalise(42) == "42"


# -- the three kinds ------------------------------------------------------------


def test_a_match_rule_names_both_properties_and_may_run_in_reverse(one_rule):
    rule = one_rule(
        """
        [[rule]]
        name = "contact-company-by-email-domain"
        kind = "match"
        from = "contact"
        to = "company"
        property = "email"
        transform = "email_domain"
        to_property = "domain"
        reverse = true
        reverse_property = "hs_email_domain"
        """
    )

    assert rule.kind == MATCH
    assert (rule.property, rule.to_property) == ("email", "domain")
    assert rule.reverse
    assert rule.reverse_property == "hs_email_domain"


def test_a_reverse_match_searches_the_property_itself_by_default(one_rule):
    rule = one_rule(
        """
        [[rule]]
        name = "by-code"
        kind = "match"
        from = "contact"
        to = "company"
        property = "company_code"
        transform = "lower"
        to_property = "code"
        reverse = true
        """
    )

    assert rule.reverse_property == "company_code"


def test_a_via_rule_names_the_type_in_between(one_rule):
    rule = one_rule(
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

    assert rule.kind == VIA
    assert (rule.from_type, rule.through_type, rule.to_type) == (
        TICKET,
        CONTACT,
        COMPANY,
    )
    assert rule.primary_when_single


def test_a_reference_rule_without_to_property_holds_the_target_id(one_rule):
    rule = one_rule(
        """
        [[rule]]
        name = "line-item-deal-by-id"
        kind = "reference"
        from = "line_item"
        to = "deal"
        property = "external_deal_id"
        """
    )

    assert rule.kind == REFERENCE
    assert (rule.from_type, rule.to_type) == (LINE_ITEM, DEAL)
    assert rule.property == "external_deal_id"
    assert rule.to_property is None


def test_a_reference_rule_with_to_property_holds_a_unique_value(one_rule):
    rule = one_rule(
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

    assert (rule.property, rule.to_property) == ("order_number", "order_number")


@pytest.mark.parametrize(
    ("name", "type_id"),
    [
        ("contact", CONTACT),
        ("contacts", CONTACT),
        ("Company", COMPANY),
        ("companies", COMPANY),
        ("deals", DEAL),
        ("line_item", LINE_ITEM),
        ("line_items", LINE_ITEM),
        ("0-5", TICKET),
        ("2-123", "2-123"),
        ("2-7654321", "2-7654321"),
    ],
)
def test_object_types_are_named_or_given_by_type_id(one_rule, name, type_id):
    rule = one_rule(
        f"""
        [[rule]]
        name = "custom"
        kind = "match"
        from = "{name}"
        to = "{name}"
        property = "code"
        to_property = "code"
        """
    )

    assert (rule.from_type, rule.to_type) == (type_id, type_id)


@pytest.mark.parametrize(
    ("written", "association"),
    [
        (None, UNLABELED),
        ("unlabeled", UNLABELED),
        ("Unlabeled", UNLABELED),
        ("Primary", PRIMARY),
        ("primary", PRIMARY),
        ("Billing contact", "Billing contact"),
        ("  Decision maker ", "Decision maker"),
    ],
)
def test_the_association_is_unlabeled_primary_or_a_label_name(
    one_rule, written, association
):
    line = "" if written is None else f'association = "{written}"'
    rule = one_rule(MATCH_BY_EMAIL_DOMAIN + line)

    assert rule.association == association


def test_when_filters_list_the_values_a_property_may_hold(one_rule):
    rule = one_rule(
        MATCH_BY_EMAIL_DOMAIN
        + """
        [rule.when]
        lifecyclestage = ["customer", "opportunity"]
        country = "NZ"
        hs_is_unworked = true
        """
    )

    assert rule.when == {
        "lifecyclestage": ("customer", "opportunity"),
        "country": ("NZ",),
        "hs_is_unworked": ("true",),
    }


def test_rules_run_forward_for_their_type_and_in_reverse_for_the_other():
    rules = load_rules(None)
    contact_rule, deal_rule = rules.rules

    assert rules.forward(CONTACT) == [contact_rule]
    assert rules.forward(DEAL) == [deal_rule]
    assert rules.forward(COMPANY) == []
    assert rules.reverse(COMPANY) == [contact_rule]
    assert rules.reverse(CONTACT) == []


def test_an_association_between_a_via_rules_ends_replans_its_record():
    rules = load_rules(None)
    deal_rule = rules.rules[1]

    assert rules.replan_triggers(DEAL, CONTACT) == [(deal_rule, "from")]
    assert rules.replan_triggers(CONTACT, DEAL) == [(deal_rule, "to")]
    assert rules.replan_triggers(CONTACT, COMPANY) == []
    assert rules.replan_triggers(DEAL, COMPANY) == []


def test_an_association_on_a_via_rules_second_hop_replans_through_its_record():
    rules = load_rules(None)
    deal_rule = rules.rules[1]

    assert rules.replan_through_triggers(CONTACT, COMPANY) == [(deal_rule, "from")]
    assert rules.replan_through_triggers(COMPANY, CONTACT) == [(deal_rule, "to")]
    assert rules.replan_through_triggers(DEAL, CONTACT) == []
    assert rules.replan_through_triggers(DEAL, COMPANY) == []


def test_each_via_rule_through_a_type_is_replanned_by_its_second_hop(rules_file):
    rules = load_rules(
        rules_file(
            """
            [[rule]]
            name = "deal-companies-via-contacts"
            kind = "via"
            from = "deal"
            through = "contact"
            to = "company"

            [[rule]]
            name = "ticket-companies-via-contacts"
            kind = "via"
            from = "ticket"
            through = "contact"
            to = "company"

            [[rule]]
            name = "line-item-companies-via-deals"
            kind = "via"
            from = "line_item"
            through = "deal"
            to = "company"
            """
        )
    )
    deals, tickets, line_items = rules.rules

    assert rules.replan_through_triggers(COMPANY, CONTACT) == [
        (deals, "to"),
        (tickets, "to"),
    ]
    assert rules.replan_through_triggers(DEAL, COMPANY) == [(line_items, "from")]
    assert rules.replan_triggers(DEAL, COMPANY) == []


# -- bad files ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[rule]\nname = 'x'", "rules.toml: not valid TOML"),
        ("rules = []", "rules.toml: unknown keys ['rules']"),
        ("", "rules.toml: no [[rule]] tables"),
        ("[rule]\nname = 'x'", "rules.toml: no [[rule]] tables"),
        ("rule = ['x']", "rules.toml: each rule must be a [[rule]] table"),
        (
            "free_mail_domains = 'mail.example'\n" + MATCH_BY_EMAIL_DOMAIN,
            "rules.toml: free_mail_domains must be a list of domains",
        ),
        (
            MATCH_BY_EMAIL_DOMAIN + MATCH_BY_EMAIL_DOMAIN,
            "rules.toml: rule names must be unique: ['by-domain']",
        ),
        (
            MATCH_BY_EMAIL_DOMAIN + "propety = 'email'",
            "rule 'by-domain': unknown keys ['propety']",
        ),
        (
            MATCH_BY_EMAIL_DOMAIN.replace('"match"', '"matches"'),
            "rule 'by-domain': kind must be one of match, via, reference",
        ),
        (
            MATCH_BY_EMAIL_DOMAIN.replace('from = "contact"', ""),
            "rule 'by-domain': from is required for kind 'match'",
        ),
        (
            MATCH_BY_EMAIL_DOMAIN.replace('"company"', '"firm"'),
            "rule 'by-domain': to = 'firm' is not an object type",
        ),
        (
            MATCH_BY_EMAIL_DOMAIN.replace('"company"', '"2-"'),
            "rule 'by-domain': to = '2-' is not an object type",
        ),
        (
            MATCH_BY_EMAIL_DOMAIN.replace('"email_domain"', '"domain"'),
            "rule 'by-domain': transform must be one of email_domain, url_host, "
            "lower, none",
        ),
        (
            MATCH_BY_EMAIL_DOMAIN.replace('to_property = "domain"', ""),
            "rule 'by-domain': to_property is required for kind 'match'",
        ),
        (
            MATCH_BY_EMAIL_DOMAIN.replace('property = "email"', "property = 1"),
            "rule 'by-domain': property must be a non-empty string",
        ),
        (
            MATCH_BY_EMAIL_DOMAIN + "reverse = 'yes'",
            "rule 'by-domain': reverse must be true or false",
        ),
        (
            MATCH_BY_EMAIL_DOMAIN + "primary_when_single = 1",
            "rule 'by-domain': primary_when_single must be true or false",
        ),
        (
            MATCH_BY_EMAIL_DOMAIN + "association = ''",
            "rule 'by-domain': association must be a non-empty string",
        ),
        (
            MATCH_BY_EMAIL_DOMAIN + "when = 'customer'",
            "rule 'by-domain': when must be a table of property = values",
        ),
        (
            MATCH_BY_EMAIL_DOMAIN + "when = { lifecyclestage = [] }",
            "rule 'by-domain': when.lifecyclestage must be a value or a list",
        ),
        (
            "[[rule]]\nname = 'v'\nkind = 'via'\nfrom = 'deal'\nto = 'company'",
            "rule 'v': through is required for kind 'via'",
        ),
        (
            "[[rule]]\nname = 'v'\nkind = 'via'\nfrom = 'deal'\nthrough = 'contact'"
            "\nto = 'company'\nreverse = true",
            "rule 'v': reverse applies to match rules only",
        ),
        (
            "[[rule]]\nname = 'r'\nkind = 'reference'\nfrom = 'line_item'\nto = 'deal'",
            "rule 'r': property is required for kind 'reference'",
        ),
        (
            "[[rule]]\nname = 'r'\nkind = 'reference'\nfrom = 'line_item'"
            "\nto = 'deal'\nproperty = 'deal_id'\nreverse = true",
            "rule 'r': reverse applies to match rules only",
        ),
        (
            "[[rule]]\nkind = 'via'\nfrom = 'deal'\nto = 'company'",
            "rule 'rule-1': through is required",
        ),
    ],
)
def test_a_bad_file_is_refused_with_a_message_naming_the_rule_and_field(
    rules_file, text, message
):
    path = rules_file(text)

    with pytest.raises(RulesError) as refused:
        load_rules(path)

    assert message in str(refused.value)


def test_a_missing_file_is_refused(tmp_path):
    path = tmp_path / "nowhere.toml"

    with pytest.raises(RulesError, match=r"nowhere\.toml: cannot be read"):
        load_rules(path)


def test_a_file_that_is_not_utf8_is_refused(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes("# café\n".encode("latin-1") + MATCH_BY_EMAIL_DOMAIN.encode())

    with pytest.raises(RulesError, match=r"latin1\.toml: is not UTF-8 text"):
        load_rules(path)


# -- associator rules check -----------------------------------------------------


def test_rules_check_prints_what_each_rule_does(rules_file, capsys):
    path = rules_file(
        """
        free_mail_domains = ["mail.example"]

        [[rule]]
        name = "by-domain"
        kind = "match"
        from = "contact"
        to = "companies"
        property = "email"
        transform = "email_domain"
        to_property = "domain"
        reverse = true
        reverse_property = "hs_email_domain"
        primary_when_single = true

        [[rule]]
        name = "ticket-companies"
        kind = "via"
        from = "ticket"
        through = "contact"
        to = "company"
        association = "Primary"

        [[rule]]
        name = "line-item-deal"
        kind = "reference"
        from = "line_item"
        to = "deal"
        property = "order_number"
        to_property = "order_number"
        association = "Billing"

        [[rule]]
        name = "widget-deal"
        kind = "reference"
        from = "2-123"
        to = "deal"
        property = "deal_id"

        [rule.when]
        status = ["active", "trial"]
        """
    )

    code = main(["rules", "check", str(path)])

    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out == [
        f"{path}: 4 rule(s)",
        "- by-domain (match): associates a new contact with every company where "
        "contact.email (email_domain) = company.domain, unlabeled; also when a "
        "company is created, finding each contact by contact.hs_email_domain; "
        "also Primary when the contact has no primary company and exactly one is "
        "found",
        "- ticket-companies (via): associates a new ticket with the company records "
        "of its contact records, labeled 'Primary'",
        "- line-item-deal (reference): associates a new line_item with the deal "
        "whose order_number = line_item.order_number, labeled 'Billing'",
        "- widget-deal (reference): associates a new 2-123 with the deal whose id "
        "is 2-123.deal_id, unlabeled; only when status in ['active', 'trial']",
        "free-mail domains added: mail.example",
    ]


def test_rules_check_without_a_file_prints_the_defaults(capsys):
    code = main(["rules", "check"])

    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out[0] == "built-in defaults: 2 rule(s)"
    assert out[1].startswith("- contact-company-by-email-domain (match): ")
    assert out[2].startswith("- deal-companies-via-contacts (via): ")
    assert len(out) == 3


def test_rules_check_of_a_bad_file_says_why_and_fails(rules_file, capsys):
    path = rules_file(MATCH_BY_EMAIL_DOMAIN.replace('"email_domain"', '"host"'))

    code = main(["rules", "check", str(path)])

    captured = capsys.readouterr()
    assert code == 1
    assert captured.out == ""
    assert captured.err.startswith("associator: rule 'by-domain': transform must be")
