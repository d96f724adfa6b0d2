"""Association rules: what belongs with what.

A rules file (TOML, ``ASSOCIATOR_RULES``) lists rules of three kinds:

- ``match``: a property of the new record, optionally transformed, equals a
  property of records of another type, found by search (contact ``email`` ->
  company ``domain``). With ``reverse = true`` it also runs when a record of the
  other type is created.
- ``via``: the records associated with the new record's associated records (a
  deal's contacts' companies). A change of either hop plans its records again:
  a deal that gains a contact, and the deals of a contact that gains a company.
- ``reference``: a property of the new record holds the target's id, or the value
  of a unique property of the target (a line item's ``external_deal_id``).

Associations are always written in the rule's direction, from ``from`` to ``to``.
Without a file the built-in :data:`DEFAULT_RULES` apply.
"""

import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

from workers.events import OBJECT_NAMES, OBJECT_TYPE_IDS, object_label

UNLABELED = "unlabeled"
PRIMARY = "Primary"

MATCH = "match"
VIA = "via"
REFERENCE = "reference"
KINDS = (MATCH, VIA, REFERENCE)

FREE_MAIL_DOMAINS = frozenset(
    {
        "gmail.com",
        "googlemail.com",
        "outlook.com",
        "hotmail.com",
        "live.com",
        "msn.com",
        "yahoo.com",
        "ymail.com",
        "icloud.com",
        "me.com",
        "mac.com",
        "aol.com",
        "proton.me",
        "protonmail.com",
        "gmx.com",
        "gmx.net",
        "gmx.de",
        "web.de",
        "mail.com",
        "zoho.com",
        "yandex.com",
        "yandex.ru",
        "mail.ru",
        "qq.com",
        "163.com",
        "fastmail.com",
        "hey.com",
    }
)


class RulesError(Exception):
    """A rules file or rule is invalid; the message names the rule and the field."""


def _host(value: str) -> str | None:
    value = value.strip().lower()
    if not value:
        return None
    if "://" not in value:
        value = "//" + value
    try:
        host = urlsplit(value).hostname
    except ValueError:
        return None
    if not host:
        return None
    host = host.rstrip(".")
    return host.removeprefix("www.") or None


def email_domain(value: str) -> str | None:
    """``Ann@WWW.Acme.com`` -> ``acme.com``."""
    local, at, domain = value.strip().rpartition("@")
    if not at or not local:
        return None
    return _host(domain)


def url_host(value: str) -> str | None:
    """``https://www.Acme.com/about`` or ``acme.com`` -> ``acme.com``."""
    return _host(value)


def lower(value: str) -> str | None:
    return value.strip().lower() or None


def identity(value: str) -> str | None:
    return value.strip() or None


TRANSFORMS: dict[str, Callable[[str], str | None]] = {
    "email_domain": email_domain,
    "url_host": url_host,
    "lower": lower,
    "none": identity,
}


# The plural names of HubSpot's paths: ``companies``, ``line_items``, ...
_SINGULAR_NAMES = {
    (name[:-1] + "ies" if name.endswith("y") else name + "s"): name
    for name in OBJECT_TYPE_IDS
}


def object_type_id(name: str, *, rule: str, field_name: str) -> str:
    """``contact``, ``contacts``, ``0-1`` -> ``0-1``; custom objects by id."""
    text = str(name).strip().lower()
    if text in OBJECT_NAMES:
        return text
    singular = _SINGULAR_NAMES.get(text, text)
    if singular in OBJECT_TYPE_IDS:
        return OBJECT_TYPE_IDS[singular]
    parts = text.split("-")
    if len(parts) == 2 and all(p.isdigit() for p in parts):
        return text
    raise RulesError(
        f"rule {rule!r}: {field_name} = {name!r} is not an object type "
        "(a name such as contact, or a type id such as 0-1 or 2-123)"
    )


@dataclass(frozen=True)
class Rule:
    name: str
    kind: str
    from_type: str
    to_type: str
    association: str = UNLABELED
    primary_when_single: bool = False
    # match and reference: the new record's property and how it is compared.
    property: str | None = None
    transform: str = "none"
    # match: the other type's property; reference: the target's unique property
    # (None: ``property`` holds the target's record id).
    to_property: str | None = None
    reverse: bool = False
    # match in reverse: the ``from`` type's property searched for the new record's
    # value (contacts carry ``hs_email_domain``), default ``property``.
    reverse_property: str | None = None
    # via: the type in between.
    through_type: str | None = None
    # The new record's properties must hold one of these values (case-insensitive).
    when: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def normalise(self, value) -> str | None:
        if value is None:
            return None
        return TRANSFORMS[self.transform](str(value))

    def describe(self) -> str:
        src, dst = object_label(self.from_type), object_label(self.to_type)
        label = (
            "unlabeled"
            if self.association == UNLABELED
            else f"labeled {self.association!r}"
        )
        if self.kind == MATCH:
            how = (
                f"{src}.{self.property}"
                + (f" ({self.transform})" if self.transform != "none" else "")
                + f" = {dst}.{self.to_property}"
            )
            what = f"associates a new {src} with every {dst} where {how}"
        elif self.kind == VIA:
            via = object_label(self.through_type)
            what = f"associates a new {src} with the {dst} records of its {via} records"
        elif self.to_property:
            what = (
                f"associates a new {src} with the {dst} whose "
                f"{self.to_property} = {src}.{self.property}"
            )
        else:
            what = (
                f"associates a new {src} with the {dst} whose id is "
                f"{src}.{self.property}"
            )
        what += f", {label}"
        if self.reverse:
            what += (
                f"; also when a {dst} is created, finding each {src} by "
                f"{src}.{self.reverse_property}"
            )
        if self.primary_when_single:
            what += (
                f"; also Primary when the {src} has no primary {dst} and exactly "
                "one is found"
            )
        if self.when:
            conditions = ", ".join(f"{k} in {list(v)}" for k, v in self.when.items())
            what += f"; only when {conditions}"
        return what

    def properties_of_new_record(self) -> set[str]:
        props = set(self.when)
        if self.kind in (MATCH, REFERENCE) and self.property:
            props.add(self.property)
        return props


@dataclass(frozen=True)
class RuleSet:
    rules: tuple[Rule, ...]
    free_mail_domains: frozenset[str] = FREE_MAIL_DOMAINS

    def forward(self, object_type_id: str) -> list[Rule]:
        return [r for r in self.rules if r.from_type == object_type_id]

    def reverse(self, object_type_id: str) -> list[Rule]:
        return [
            r
            for r in self.rules
            if r.kind == MATCH and r.reverse and r.to_type == object_type_id
        ]

    def replan_triggers(self, from_type: str, to_type: str) -> list[tuple[Rule, str]]:
        """Via rules that an association between these types feeds.

        Returns (rule, side): side ``from`` means the event's from-record is the
        rule's new record, ``to`` means its to-record is.
        """
        triggers = []
        for rule in self.rules:
            if rule.kind != VIA:
                continue
            if (rule.from_type, rule.through_type) == (from_type, to_type):
                triggers.append((rule, "from"))
            elif (rule.through_type, rule.from_type) == (from_type, to_type):
                triggers.append((rule, "to"))
        return triggers

    def replan_through_triggers(
        self, from_type: str, to_type: str
    ) -> list[tuple[Rule, str]]:
        """Via rules whose second hop an association between these types is.

        A contact that gains a company gives its deals another company: such a
        change re-plans the rule's records associated with the through-record.
        Returns (rule, side): side ``from`` means the event's from-record is the
        through-record, ``to`` means its to-record is.
        """
        triggers = []
        for rule in self.rules:
            if rule.kind != VIA:
                continue
            if (rule.through_type, rule.to_type) == (from_type, to_type):
                triggers.append((rule, "from"))
            elif (rule.to_type, rule.through_type) == (from_type, to_type):
                triggers.append((rule, "to"))
        return triggers


DEFAULT_RULES_TOML = """
# Built-in defaults: used when ASSOCIATOR_RULES is not set.

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
association = "unlabeled"
primary_when_single = true

[[rule]]
name = "deal-companies-via-contacts"
kind = "via"
from = "deal"
through = "contact"
to = "company"
association = "unlabeled"
primary_when_single = true
"""

_ALLOWED_KEYS = {
    "name",
    "kind",
    "from",
    "to",
    "through",
    "association",
    "primary_when_single",
    "property",
    "transform",
    "to_property",
    "reverse",
    "reverse_property",
    "when",
}


def parse_rules(text: str, *, source: str = "rules") -> RuleSet:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RulesError(f"{source}: not valid TOML: {exc}") from exc

    unknown_top = set(data) - {"rule", "free_mail_domains"}
    if unknown_top:
        raise RulesError(f"{source}: unknown keys {sorted(unknown_top)}")
    extra_free = data.get("free_mail_domains", [])
    if not isinstance(extra_free, list) or not all(
        isinstance(d, str) for d in extra_free
    ):
        raise RulesError(f"{source}: free_mail_domains must be a list of domains")

    raw_rules = data.get("rule", [])
    if not isinstance(raw_rules, list) or not raw_rules:
        raise RulesError(f"{source}: no [[rule]] tables")
    if not all(isinstance(raw, dict) for raw in raw_rules):
        raise RulesError(f"{source}: each rule must be a [[rule]] table")
    rules = [_rule(raw, index) for index, raw in enumerate(raw_rules, 1)]
    names = [r.name for r in rules]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise RulesError(f"{source}: rule names must be unique: {sorted(duplicates)}")

    return RuleSet(
        tuple(rules),
        FREE_MAIL_DOMAINS | {d.strip().lower() for d in extra_free},
    )


def _rule(raw: dict, index: int) -> Rule:
    name = str(raw.get("name") or f"rule-{index}")
    unknown = set(raw) - _ALLOWED_KEYS
    if unknown:
        raise RulesError(f"rule {name!r}: unknown keys {sorted(unknown)}")

    def need(key):
        value = raw.get(key)
        if value is None or value == "":
            raise RulesError(f"rule {name!r}: {key} is required for kind {kind!r}")
        return text(key)

    def text(key):
        value = raw.get(key)
        if value is not None and not (isinstance(value, str) and value.strip()):
            raise RulesError(f"rule {name!r}: {key} must be a non-empty string")
        return None if value is None else value.strip()

    def flag(key):
        value = raw.get(key, False)
        if not isinstance(value, bool):
            raise RulesError(f"rule {name!r}: {key} must be true or false")
        return value

    kind = raw.get("kind")
    if kind not in KINDS:
        raise RulesError(f"rule {name!r}: kind must be one of {', '.join(KINDS)}")
    from_type = object_type_id(need("from"), rule=name, field_name="from")
    to_type = object_type_id(need("to"), rule=name, field_name="to")

    transform = raw.get("transform", "none")
    if transform not in TRANSFORMS:
        raise RulesError(
            f"rule {name!r}: transform must be one of {', '.join(TRANSFORMS)}"
        )
    association = text("association") or UNLABELED
    if association.lower() == UNLABELED:
        association = UNLABELED
    elif association.lower() == PRIMARY.lower():
        association = PRIMARY

    when = raw.get("when", {})
    if not isinstance(when, dict):
        raise RulesError(f"rule {name!r}: when must be a table of property = values")
    when = {k: vs if isinstance(vs, list) else [vs] for k, vs in when.items()}
    for prop, values in when.items():
        if not values or not all(isinstance(v, str | int | bool) for v in values):
            raise RulesError(
                f"rule {name!r}: when.{prop} must be a value or a list of values"
            )
    when = {k: tuple(_when_value(v) for v in vs) for k, vs in when.items()}

    rule = Rule(
        name=name,
        kind=kind,
        from_type=from_type,
        to_type=to_type,
        association=association,
        primary_when_single=flag("primary_when_single"),
        transform=transform,
        reverse=flag("reverse"),
        when=when,
    )
    if kind == MATCH:
        rule = _replace(
            rule,
            property=need("property"),
            to_property=need("to_property"),
            reverse_property=text("reverse_property") or need("property"),
        )
    elif kind == REFERENCE:
        rule = _replace(
            rule, property=need("property"), to_property=text("to_property")
        )
        if rule.reverse:
            raise RulesError(f"rule {name!r}: reverse applies to match rules only")
    else:
        rule = _replace(
            rule,
            through_type=object_type_id(
                need("through"), rule=name, field_name="through"
            ),
        )
        if rule.reverse:
            raise RulesError(f"rule {name!r}: reverse applies to match rules only")
    return rule


def _replace(rule: Rule, **changes) -> Rule:
    return replace(rule, **changes)


def _when_value(value: str | int | bool) -> str:
    # TOML's true is HubSpot's "true", not Python's "True".
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def load_rules(path: str | Path | None) -> RuleSet:
    if path is None or str(path) == "":
        return parse_rules(DEFAULT_RULES_TOML, source="built-in defaults")
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RulesError(f"{path}: cannot be read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise RulesError(f"{path}: is not UTF-8 text") from exc
    return parse_rules(text, source=str(path))
